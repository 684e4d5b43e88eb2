"""A read-only, decoded view of one mail message, for classification and thread matching.

Classification needs the words a buyer would read (subject and body text in whatever charset
and transfer encoding the seller's client chose) and the threading headers. This module turns raw
bytes into exactly that and nothing more. It never raises: a message the relay cannot parse is
still a message it must decide about, so a broken one yields a view with whatever could be read
(libraries.md section 3: mail-parser for reading, raw bytes stay the source of truth).
"""

from __future__ import annotations

import codecs
import contextlib
import email
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy as email_policy
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses, parseaddr
from html.parser import HTMLParser

import mailparser

from mailrelay.policy.identifiers import find_comm_tokens, find_order_ids

#: ``MessageView.text`` keeps this many characters: rules cost about 1 ms per 1,000 characters
#: and what decides a seller message's topic is near its top. Ids are read from all of it.
MAX_TEXT_CHARS = 200_000
_MAX_DEPTH = 30

# Charset labels that Python either lacks or decodes too strictly for real mail.
_CHARSET_ALIASES = {
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932",
    "windows-31j": "cp932", "iso-2022-jp": "iso2022_jp_ext", "csiso2022jp": "iso2022_jp_ext",
    "gb2312": "gb18030", "gbk": "gb18030", "ks_c_5601-1987": "cp949", "euc-kr": "cp949",
    "us-ascii": "utf-8", "ascii": "utf-8", "iso-8859-1": "cp1252", "latin1": "cp1252",
    "unknown-8bit": "utf-8", "x-unknown": "utf-8",
}
_MSGID_RE = re.compile(r"<[^<>\s]+>")
_FOLD_RE = re.compile(r"\r?\n[ \t]*")


@dataclass(frozen=True, slots=True)
class MessageView:
    """What the policy reads from a message: decoded text and threading identifiers.

    Message ids keep their angle brackets as written (``<x@y>``); compare them with
    :func:`normalize_msgid`.
    """

    subject: str
    from_addr: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    message_id: str
    in_reply_to: str  # the parent's id, or ""
    references: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    text: str
    order_ids: tuple[str, ...]
    comm_tokens: tuple[str, ...]

    def header(self, name: str) -> tuple[str, ...]:
        """All decoded values of header ``name`` (case-insensitive), in message order."""
        wanted = name.lower()
        return tuple(value for key, value in self.headers if key.lower() == wanted)


def normalize_msgid(value: str) -> str:
    """A Message-ID without angle brackets and surrounding space, for comparisons."""
    return value.strip().strip("<>").strip()


def msgid_list(value: str) -> list[str]:
    """Message ids in a References/In-Reply-To value, in order, brackets kept."""
    found = _MSGID_RE.findall(value or "")
    if found:
        return found
    return [f"<{part}>" for part in (value or "").split() if "@" in part]


def codec_for(charset: str | None) -> str | None:
    """The Python codec to read a MIME charset label with, or None when Python has none."""
    label = (charset or "us-ascii").strip().strip('"').lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def decode_bytes(payload: bytes, charset: str | None) -> str:
    """Decode a body with its declared charset, falling back rather than failing.

    A wrong or missing charset label is common in seller tools; UTF-8 then Windows-1252 are the
    likeliest truths, and ``replace`` keeps whatever else readable enough for keyword rules.
    """
    label = codec_for(charset) or "utf-8"
    for candidate in (label, "utf-8"):
        try:
            return payload.decode(candidate)
        except UnicodeDecodeError:
            continue
    if label == "utf-8":  # undeclared or mislabelled 8-bit text is most often Windows-1252
        return payload.decode("cp1252", errors="replace")
    return payload.decode(label, errors="replace")


def decode_header_value(value: object) -> str:
    """A header value as readable text: RFC 2047 words decoded, raw 8-bit taken as UTF-8."""
    text = str(value)
    with contextlib.suppress(Exception):  # malformed encoded words: keep the raw text
        text = str(make_header(decode_header(text)))
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _FOLD_RE.sub(" ", text).strip()


class _HtmlText(HTMLParser):
    """Visible text of an HTML body: scripts and styles dropped, blocks become line breaks."""

    _BLOCKS = frozenset(
        ["br", "p", "div", "tr", "li", "pre", "blockquote", "table", "hr", "title"]
        + [f"h{level}" for level in range(1, 7)]
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head"):
            self._skip = max(0, self._skip - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Readable text of an HTML document; never raises."""
    parser = _HtmlText()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # HTMLParser can choke on pathological input
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))
    text = "".join(parser.parts)
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", text)


def _is_attachment(part: Message) -> bool:
    try:
        return part.get_content_disposition() == "attachment" or part.get_filename() is not None
    except Exception:  # a broken header makes it unreadable anyway
        return True


def _text_parts(msg: Message, depth: int = 0) -> Iterator[tuple[str, str]]:
    """(subtype, decoded text) of every inline text/plain and text/html part.

    Attached and forwarded messages (message/*) are not entered: their words are not the
    seller's, and a forwarded opt-out notice must not make a reply look like a notice.
    """
    if depth > _MAX_DEPTH or msg.get_content_maintype() == "message":
        return
    if msg.is_multipart():
        for sub in msg.get_payload() or []:
            if isinstance(sub, Message):
                yield from _text_parts(sub, depth + 1)
        return
    if msg.get_content_maintype() != "text" or _is_attachment(msg):
        return
    subtype = msg.get_content_subtype()
    if subtype not in ("plain", "html"):
        return
    payload = msg.get_payload(decode=True)
    if isinstance(payload, bytes):
        yield subtype, decode_bytes(payload, msg.get_content_charset())


def _parse(raw: bytes) -> Message:
    """mail-parser's compat32 message, or the stdlib's when mail-parser fails on this input."""
    try:
        return mailparser.parse_from_bytes(raw).message
    except Exception:  # mail-parser regressions must not lose a message
        return email.message_from_bytes(raw, policy=email_policy.compat32)


def _addresses(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(addr for _name, addr in getaddresses(list(values)) if addr)


def _build(msg: Message) -> MessageView:
    headers = tuple((str(k), decode_header_value(v)) for k, v in msg.items())
    plain: list[str] = []
    markup: list[str] = []
    with contextlib.suppress(Exception):  # keep what was read before a broken part
        for subtype, body in _text_parts(msg):
            (plain if subtype == "plain" else markup).append(body)
    html_text = "\n".join(html_to_text(m) for m in markup)
    full_text = ("\n".join(plain) if plain else html_text).replace("\r\n", "\n")

    def first(name: str) -> str:
        return next((v for k, v in headers if k.lower() == name), "")

    def every(name: str) -> tuple[str, ...]:
        return tuple(v for k, v in headers if k.lower() == name)

    subject = first("subject")
    return MessageView(
        subject=subject,
        from_addr=parseaddr(first("from"))[1],
        to=_addresses(every("to")),
        cc=_addresses(every("cc")),
        message_id=(msgid_list(first("message-id")) or [""])[0],
        in_reply_to=(msgid_list(first("in-reply-to")) or [""])[0],
        references=tuple(msgid_list(" ".join(every("references")))),
        headers=headers,
        text=full_text[:MAX_TEXT_CHARS],
        order_ids=tuple(find_order_ids(f"{subject}\n{full_text}")),
        comm_tokens=tuple(find_comm_tokens(f"{subject}\n{full_text}\n{html_text}")),
    )


def view_message(raw: bytes) -> MessageView:
    """Parse ``raw`` into a :class:`MessageView`; never raises, whatever the bytes are."""
    with contextlib.suppress(Exception):  # e.g. RecursionError on absurd nesting
        return _build(_parse(raw))
    try:
        head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        return _build(email.message_from_bytes(head + b"\r\n\r\n", policy=email_policy.compat32))
    except Exception:  # nothing readable at all
        return MessageView("", "", (), (), "", "", (), (), "", (), ())
