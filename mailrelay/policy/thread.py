"""Put a critical reply on the buyer's Amazon thread, changing as few bytes as possible.

Amazon delivers a reply to an opted-out buyer when it stays on the buyer's thread and includes
the buyer's original message (amazon.md sections 2.2 and 4.3). How Amazon ties the reply to the
thread is undocumented, so :func:`tag_reply` does all three things that can: In-Reply-To and
References naming the buyer message, ``Re: <buyer subject>``, and the quoted question with its
``[commMgrTok:...]`` line in the text and HTML bodies.

Everything else stays byte-identical (DKIM-Signature, attachments, other parts): headers are
spliced as bytes and only the text parts that change are decoded and re-encoded, in their own
charset and transfer encoding when that can carry the new text (libraries.md section 3: never
re-serialise a whole relayed message).
"""

from __future__ import annotations

import base64
import codecs
import html
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import Header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from mailrelay.policy.classify import IMPORTANT_TAG_RE, BuyerMessageRef
from mailrelay.policy.identifiers import find_comm_tokens
from mailrelay.policy.message import (
    codec_for,
    decode_header_value,
    html_to_text,
    msgid_list,
    normalize_msgid,
)

_MAX_DEPTH = 20
_LINE_END_RE = re.compile(rb"\r\n|\r|\n")  # what the email parser treats as line ends
_FIELD_NAME_RE = re.compile(rb"([!-9;-~]+)[ \t]*:")
_REPLY_PREFIX_RE = re.compile(
    r"^\s*(?:(?:re|aw|sv|vs|antw|odp|res|r|réf|rif|回复|答复|返信)\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*)+",
    re.IGNORECASE,
)
_CHARSET_PARAM_RE = re.compile(rb'charset\s*=\s*(?:"[^"\r\n]*"|[^;\s]*)', re.IGNORECASE)
_QUOTE_MARK_RE = re.compile(r"(?m)^[ \t]*(?:>[ \t]?)+")
_BLOCKQUOTE = '<blockquote type="cite" style="margin:0 0 0 .8ex;border-left:1px solid #ccc;' \
    'padding-left:1ex">'


@dataclass(frozen=True, slots=True)
class _Leaf:
    """A single-part entity inside the message: ``data[start:end]``."""

    start: int
    end: int
    headers: Message


# ---- header block as a list of raw fields -------------------------------------------------


def _split_entity(data: bytes) -> tuple[bytes, bytes | None]:
    """(header block ending in CRLF or empty, body); body None when there is no blank line."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    cut = data.find(b"\r\n\r\n")
    if cut < 0:
        return data, None
    return data[: cut + 2], data[cut + 4 :]


def _fields(head: bytes) -> list[bytes]:
    """Raw header fields, each with its continuation lines and final CRLF."""
    fields: list[bytes] = []
    if not head:
        return fields
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def _name(field: bytes) -> str:
    match = _FIELD_NAME_RE.match(field)
    return match.group(1).decode("ascii").lower() if match else ""


def _value(field: bytes) -> str:
    return decode_header_value(field.split(b":", 1)[1].decode("utf-8", "surrogateescape"))


def _replace(fields: list[bytes], name: str, new: bytes | None) -> list[bytes]:
    """``fields`` with every ``name`` field gone and ``new`` at the first one's place (or last)."""
    out: list[bytes] = []
    placed = new is None
    for field in fields:
        if _name(field) != name:
            out.append(field)
        elif not placed:
            out.append(new)  # type: ignore[arg-type]  # placed is False only when new is bytes
            placed = True
    if not placed:
        out.append(new)  # type: ignore[arg-type]
    return out


# ---- threading headers and subject ---------------------------------------------------------


def _bare_subject(subject: str) -> str:
    return _REPLY_PREFIX_RE.sub("", IMPORTANT_TAG_RE.sub("", subject)).strip()


def _subject_field(fields: list[bytes], ref_subject: str) -> bytes | None:
    """The Subject field to write, or None to keep the current one."""
    base = " ".join(_bare_subject(ref_subject).split())
    if not base:
        return None
    current = next((f for f in fields if _name(f) == "subject"), None)
    if current is not None:
        text = _value(current)
        if base.casefold() in " ".join(_bare_subject(text).split()).casefold():
            if _REPLY_PREFIX_RE.match(text):
                return None
            head, rest = current.split(b":", 1)
            return head + b": Re:" + (rest if rest[:1] in (b" ", b"\t") else b" " + rest)
    new = "Re: " + base
    if new.isascii() and len(new) < 990:
        return b"Subject: " + new.encode("ascii") + b"\r\n"
    encoded = Header(new, "utf-8", header_name="Subject").encode(linesep="\r\n")
    return b"Subject: " + encoded.encode("ascii") + b"\r\n"


def _thread_fields(fields: list[bytes], ref: BuyerMessageRef) -> list[bytes]:
    parent = normalize_msgid(ref.message_id)
    if not parent or any(ch.isspace() or ch in "<>" for ch in parent):
        return fields
    want = f"<{parent}>".encode("utf-8", "surrogateescape")
    replying = [f for f in fields if _name(f) == "in-reply-to"]
    if not any(parent in map(normalize_msgid, msgid_list(_value(f))) for f in replying):
        fields = _replace(fields, "in-reply-to", b"In-Reply-To: " + want + b"\r\n")
    refs = [f for f in fields if _name(f) == "references"]
    known = {normalize_msgid(i) for f in refs for i in msgid_list(_value(f))}
    if not refs:
        fields = [*fields, b"References: " + want + b"\r\n"]
    elif parent not in known:
        first = refs[0]
        longer = first.rstrip(b"\r\n") + b"\r\n " + want + b"\r\n"
        fields = [longer if field is first else field for field in fields]
    return fields


def _tag_headers(data: bytes, ref: BuyerMessageRef) -> bytes:
    head, body = _split_entity(data)
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"
    fields = _thread_fields(_fields(head), ref)
    subject = _subject_field(fields, ref.subject)
    if subject is not None:
        fields = _replace(fields, "subject", subject)
    new_head = b"".join(fields)
    return new_head if body is None else new_head + b"\r\n" + body


# ---- body parts ----------------------------------------------------------------------------


def _leaves(data: bytes, start: int, end: int, depth: int = 0) -> Iterator[_Leaf]:
    """Single-part entities of ``data[start:end]``; message/* and broken multiparts are leaves."""
    head, body = _split_entity(data[start:end])
    headers = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n")
    boundary = headers.get_boundary() if headers.get_content_maintype() == "multipart" else None
    if body is None or not boundary or depth >= _MAX_DEPTH:
        yield _Leaf(start, end, headers)
        return
    body_start = end - len(body)
    marker = re.escape(boundary.encode("utf-8", "surrogateescape"))
    delimiter = re.compile(rb"\r\n--" + marker + rb"(--)?[ \t]*(?=\r\n|$)")
    marks = list(delimiter.finditer(data, body_start - 2, end))
    for this, after in zip(marks, [*marks[1:], None], strict=True):
        if this.group(1):
            return
        part_start, part_end = this.end() + 2, after.start() if after else end
        if part_start <= part_end:
            yield from _leaves(data, part_start, part_end, depth + 1)


def _is_text_body(headers: Message) -> str | None:
    """"plain" or "html" for an inline text body part, else None."""
    if headers.get_content_maintype() != "text" or headers.get_content_subtype() not in (
        "plain", "html"
    ):
        return None
    if headers.get_content_disposition() == "attachment" or headers.get_filename() is not None:
        return None
    return headers.get_content_subtype()


def _decoded(entity: bytes) -> tuple[Message, str] | None:
    """The part and its text, or None when it cannot be read back exactly (then leave it)."""
    head, body = _split_entity(entity)
    part = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n")
    part.set_payload(body or b"")
    cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    codec = codec_for(part.get_content_charset())
    if cte not in ("7bit", "8bit", "binary", "quoted-printable", "base64") or codec is None:
        return None
    try:
        if cte == "base64":
            payload = base64.b64decode(body or b"")
        elif cte == "quoted-printable":
            payload = quopri.decodestring(body or b"")
        else:
            payload = body or b""
        text = payload.decode(codec)
    except ValueError:  # bad base64 or bytes the charset does not allow
        return None
    return part, text.replace("\r\n", "\n").replace("\r", "\n")


def _normalized(text: str) -> str:
    return " ".join(_QUOTE_MARK_RE.sub("", text).split()).casefold()


def _needs(
    texts: list[str], ref: BuyerMessageRef, add_token: bool, quote: bool
) -> tuple[bool, bool]:
    """(token missing, quote missing) across all texts of one kind."""
    joined = "\n".join(texts)
    token = bool(add_token and ref.token and ref.token not in find_comm_tokens(joined))
    wanted = _normalized(ref.text) if quote else ""
    return token, bool(wanted and wanted not in _normalized(joined))


def _plain_addition(ref: BuyerMessageRef, token: bool, quote: bool) -> str:
    lines: list[str] = []
    if quote:
        lines += ["", *(f"> {line}".rstrip() for line in ref.text.strip("\n").split("\n"))]
    if token:
        lines += ["", f"[commMgrTok:{ref.token}]"]
    return "\n".join(lines) + "\n"


def _html_addition(ref: BuyerMessageRef, token: bool, quote: bool) -> str:
    parts = []
    if quote:
        quoted = html.escape(ref.text.strip("\n"), quote=False).replace("\n", "<br>\n")
        parts.append(f"<br>\n{_BLOCKQUOTE}{quoted}</blockquote>\n")
    if token:
        parts.append(f"<p>[commMgrTok:{ref.token}]</p>\n")
    return "".join(parts)


def _with_addition(kind: str, text: str, addition: str) -> str:
    if kind == "plain":
        return text + ("" if not text or text.endswith("\n") else "\n") + addition
    lower = text.lower()
    at = lower.rfind("</body>")
    at = at if at >= 0 else lower.rfind("</html>")
    return text + addition if at < 0 else text[:at] + addition + text[at:]


def _encode_body(text: str, part: Message) -> tuple[bytes, str | None, str | None]:
    """(body bytes, new charset or None, new CTE or None) for ``text`` in ``part``'s encoding."""
    label = (part.get_content_charset() or "us-ascii").lower()
    charset = None
    try:
        codec = codecs.lookup(label).name
        # UTF-16/32 bytes hold 0x0A inside characters: re-encoded with line breaks (7bit, QP)
        # they would be corrupted, so such a part is rewritten in UTF-8 instead.
        if "\r\n".encode(codec) != b"\r\n":
            raise LookupError(codec)
        raw = text.encode(codec)
    except (LookupError, UnicodeEncodeError):
        raw, charset = text.encode("utf-8"), "utf-8"
    cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    new_cte = None
    too_long = any(len(line) > 998 for line in raw.split(b"\n"))
    if cte in ("7bit", "8bit", "binary") and (too_long or (cte == "7bit" and not raw.isascii())):
        cte = new_cte = "quoted-printable"
    if cte == "base64":
        body = base64.encodebytes(raw)
    elif cte == "quoted-printable":
        body = quopri.encodestring(raw)
    else:
        body = raw
    return body.replace(b"\n", b"\r\n"), charset, new_cte


def _retag_leaf(entity: bytes, kind: str, text: str, part: Message, addition: str) -> bytes:
    body, charset, cte = _encode_body(_with_addition(kind, text, addition), part)
    head, old_body = _split_entity(entity)
    if old_body is not None and not old_body.endswith(b"\r\n") and body.endswith(b"\r\n"):
        body = body[:-2]
    fields = _fields(head)
    if charset:
        ctype = next((f for f in fields if _name(f) == "content-type"), None)
        if ctype is None:
            new = f"Content-Type: text/{kind}; charset=\"utf-8\"\r\n".encode()
        elif _CHARSET_PARAM_RE.search(ctype):
            new = _CHARSET_PARAM_RE.sub(b'charset="utf-8"', ctype, count=1)
        else:
            new = ctype.rstrip(b"\r\n") + b'; charset="utf-8"\r\n'
        fields = _replace(fields, "content-type", new)
    if cte:
        fields = _replace(fields, "content-transfer-encoding",
                          b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n")
    return b"".join(fields) + b"\r\n" + body


def _tag_bodies(data: bytes, ref: BuyerMessageRef, add_token: bool, quote: bool) -> bytes:
    """Add the quote and token to the last text/plain and last text/html body part, if missing."""
    if _split_entity(data)[1] is None:
        return data
    found: dict[str, list[tuple[_Leaf, Message, str]]] = {"plain": [], "html": []}
    for leaf in _leaves(data, 0, len(data)):
        kind = _is_text_body(leaf.headers)
        decoded = _decoded(data[leaf.start : leaf.end]) if kind else None
        if kind and decoded:
            found[kind].append((leaf, *decoded))
    edits: list[tuple[_Leaf, bytes]] = []
    for kind, entries in found.items():
        if not entries:
            continue
        texts = [t if kind == "plain" else html_to_text(t) for _l, _p, t in entries]
        token, quoted = _needs(texts, ref, add_token, quote)
        if token or quoted:
            leaf, part, text = entries[-1]
            add = (_plain_addition if kind == "plain" else _html_addition)(ref, token, quoted)
            edits.append((leaf, _retag_leaf(data[leaf.start : leaf.end], kind, text, part, add)))
    for leaf, new in sorted(edits, key=lambda edit: edit[0].start, reverse=True):
        data = data[: leaf.start] + new + data[leaf.end :]
    return data


def tag_reply(
    raw: bytes, ref: BuyerMessageRef, add_token: bool = True, quote_original: bool = True
) -> bytes:
    """``raw`` put on ``ref``'s thread; CRLF line endings; idempotent; never raises.

    Adds In-Reply-To/References, ``Re: <buyer subject>`` unless the subject already relates to
    it (never ``Re: Re:``, never ``[Important]``), and, when missing, the quoted question and the
    token line in the last inline text/plain and text/html part. A body too broken to decode
    exactly is left alone and only the headers change.
    """
    data = _LINE_END_RE.sub(b"\r\n", raw)
    try:
        data = _tag_bodies(data, ref, add_token, quote_original)
    except Exception:  # malformed MIME: headers alone still help Amazon thread it
        data = _LINE_END_RE.sub(b"\r\n", raw)
    try:
        return _tag_headers(data, ref)
    except Exception:  # cannot happen for bytes input, but a reply must never be lost
        return data
