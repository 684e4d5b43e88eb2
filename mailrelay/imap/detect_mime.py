"""Parse a fetched message once into the :class:`~mailrelay.imap.detectors.Mail` detectors read.

Uses the stdlib parser with ``policy=compat32`` (what mail-parser wraps): it tolerates broken
MIME and records defects instead of raising. Everything here is defensive: charsets and codec
names, header encodings and HTML come from the sender, so each helper falls back rather than
raising, and a broken part is skipped without hiding its siblings. Pure: no I/O.
"""

from __future__ import annotations

import email
import html
import re
from email.header import decode_header
from email.message import Message
from email.policy import compat32
from email.utils import getaddresses

from mailrelay.imap.detectors import Mail, Part, fold

MAX_DEPTH = 10  # MIME nesting walked; deeper parts are ignored
MAX_ATTACHED = 4  # message/rfc822 originals looked at
MAX_INLINE = 4  # inline-forwarded originals looked at
MAX_PART_BYTES = 1024 * 1024  # decoded bytes kept per text part

# -- decoding -----------------------------------------------------------------------------------

_CHARSETS = {
    "iso-2022-jp": "iso2022_jp_2",  # superset: mail labelled plain ISO-2022-JP often is not
    "csiso2022jp": "iso2022_jp_2",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "us-ascii": "utf-8",  # 8-bit text labelled ASCII is usually UTF-8
    "ascii": "utf-8",
    "punycode": "utf-8",  # not body charsets, and slow on hostile input
    "idna": "utf-8",
}


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode body or header bytes; never raises, bad bytes become U+FFFD."""
    name = (charset or "").strip().strip('"').lower()
    if not name:
        if b"\x1b$" in data or b"\x1b(" in data:  # unlabelled ISO-2022-JP (amazon.md 3.3)
            name = "iso2022_jp_2"
        else:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return data.decode("cp1252", "replace")
    try:
        return data.decode(_CHARSETS.get(name, name), "replace")
    except Exception:  # unknown or non-text codec names come from the sender
        return data.decode("utf-8", "replace")


def header_text(msg: Message, name: str) -> str:
    """A header's value with RFC 2047 words decoded and whitespace collapsed ("" if absent)."""
    try:
        value = msg.get(name)
        if value is None:
            return ""
        chunks = decode_header(value)
        text = "".join(c if isinstance(c, str) else decode_bytes(c, cs) for c, cs in chunks)
    except Exception:  # compat32 hands back odd Header objects for raw 8-bit headers
        return ""
    return " ".join(text.split())


def addresses(msg: Message, name: str) -> tuple[str, ...]:
    """The addr-specs in every ``name`` header, as written."""
    try:
        values = [str(value) for value in msg.get_all(name) or []]
        pairs = getaddresses(values)
    except Exception:
        return ()
    return tuple(addr.strip() for _, addr in pairs if "@" in addr)


# -- HTML ---------------------------------------------------------------------------------------

_TAG_START = re.compile(r"<[/!?a-zA-Z]")  # as in browsers, "<" before anything else is text
_TAG_NAME = re.compile(r"(/?)\s*([a-z][a-z0-9]*)")
_BLOCK = frozenset(
    {"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "hr"}
)
_SKIP = frozenset({"script", "style", "title"})
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class _Renderer:
    """HTML to text with one linear scan; html.parser has quadratic cases in this Python."""

    def __init__(self, markup: str) -> None:
        self.markup = markup
        self.low = markup.translate(_ASCII_LOWER)  # same length, so indexes agree
        self.out: list[str] = []
        self.pre: list[str] | None = None  # collecting Amazon's buyer <pre>
        self.pre_text: str | None = None
        self.next_gt: int | None = None

    def run(self) -> tuple[str, str]:
        i, n = 0, len(self.markup)
        while i < n:
            found = _TAG_START.search(self.markup, i)
            lt = found.start() if found else -1
            self._text(self.markup[i : n if lt < 0 else lt])
            i = n if lt < 0 else self._tag(lt)
        if self.pre_text is None and self.pre is not None:
            self.pre_text = "".join(self.pre)
        return "".join(self.out), self.pre_text or ""

    def _text(self, raw: str) -> None:
        chunk = html.unescape(raw)
        self.out.append(chunk)
        if self.pre is not None:
            self.pre.append(chunk)

    def _close(self, lt: int) -> int:
        """The first ">" after ``lt`` (-1 if none), remembered so that "<<<<..." stays linear."""
        if self.next_gt is None or (0 <= self.next_gt <= lt):
            self.next_gt = self.markup.find(">", lt + 1)
        return self.next_gt

    def _tag(self, lt: int) -> int:
        """Handle the markup at ``lt`` (a "<") and return where scanning resumes."""
        markup, low, n = self.markup, self.low, len(self.markup)
        if markup.startswith("<!--", lt):
            end = markup.find("-->", lt + 4)
            return n if end < 0 else end + 3
        gt = self._close(lt)
        if markup.startswith(("<!", "<?"), lt):  # doctype, CDATA, processing instruction
            return n if gt < 0 else gt + 1
        match = _TAG_NAME.match(low, lt + 1, gt) if gt > 0 else None
        if match is None:  # a bare "<" in text
            self._text("<")
            return lt + 1
        closing, tag = bool(match[1]), match[2]
        if tag in _SKIP and not closing:
            end = low.find(f"</{tag}", gt + 1)
            return n if end < 0 else end
        if tag == "pre" and not closing and self.pre_text is None and "-o-pre-wrap" in low[lt:gt]:
            self.pre = []
        elif tag == "pre" and closing and self.pre is not None:
            self.pre_text, self.pre = "".join(self.pre), None
        if tag in _BLOCK:
            self.out.append("\n")
            if self.pre is not None and tag == "br":
                self.pre.append("\n")
        return gt + 1


def render_html(markup: str) -> tuple[str, str]:
    """HTML as text, plus the text of the first ``<pre>`` styled ``white-space: -o-pre-wrap``.

    That ``<pre>`` holds the buyer's own words in modern Amazon mail (amazon.md 4.2).
    """
    return _Renderer(markup).run()


# -- MIME ---------------------------------------------------------------------------------------

_REPORT_PARTS = {
    "message/delivery-status": "delivery-status",
    "message/global-delivery-status": "delivery-status",
    "message/feedback-report": "feedback-report",
    "text/rfc822-headers": "",
    "message/rfc822-headers": "",
}


class _Walk:
    """The text, reports and attached messages of one message, not descending into those."""

    def __init__(self) -> None:
        self.plain: list[str] = []
        self.html: list[str] = []
        self.report: list[str] = []
        self.report_type = ""
        self.attached: list[Message] = []

    def visit(self, part: Message, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        try:
            self._visit(part, depth)
        except Exception:  # one broken part must not hide the others
            return

    def _visit(self, part: Message, depth: int) -> None:
        ctype = part.get_content_type()
        payload = part.get_payload()
        if ctype in _REPORT_PARTS:
            self.report_type = self.report_type or _REPORT_PARTS[ctype]
            self.report.append(_report_text(part, payload))
        elif ctype in ("message/rfc822", "message/global"):
            if isinstance(payload, list):
                self.attached.extend(p for p in payload if isinstance(p, Message))
        elif isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    self.visit(sub, depth + 1)
        elif part.get_content_disposition() == "attachment":
            return
        elif ctype == "text/plain":
            self.plain.append(_part_text(part))
        elif ctype == "text/html":
            self.html.append(_part_text(part))


def _part_text(part: Message) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    return decode_bytes(data[:MAX_PART_BYTES], part.get_content_charset())


def _report_text(part: Message, payload: object) -> str:
    if isinstance(payload, list):  # compat32 parses delivery-status into header blocks
        blocks = (p for p in payload if isinstance(p, Message))
        return "\n".join(f"{k}: {v}" for block in blocks for k, v in block.items())
    return _part_text(part)


def _report_type(msg: Message, walk: _Walk) -> str:
    if msg.get("Feedback-Type") is not None:
        return "feedback-report"
    if msg.get_content_type() == "multipart/report":
        kind = str(msg.get_param("report-type", "") or "").lower()
        return "feedback-report" if kind == "feedback-report" else "delivery-status"
    return walk.report_type


_AUTOMATIC_SENDERS = frozenset({"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon"})


def _is_automatic(msg: Message, sender: str) -> bool:
    """A bounce or auto-reply (RFC 3834): what it carries was not forwarded by a person."""
    submitted = header_text(msg, "Auto-Submitted").lower()
    if submitted and not submitted.startswith(("no", "auto-forwarded")):
        return True
    local = sender.rpartition("@")[0].lower()
    return local in _AUTOMATIC_SENDERS or msg.get("X-Failed-Recipients") is not None


def _sender(msg: Message) -> str:
    found = addresses(msg, "From")
    return found[0] if len(found) == 1 else ""


def _body(walk: _Walk) -> tuple[str, str]:
    """The body text (plain parts, else rendered HTML) and Amazon's buyer ``<pre>`` text."""
    markup = "\n".join(walk.html)[:MAX_PART_BYTES]
    text, pre = render_html(markup) if markup else ("", "")
    plain = "\n".join(walk.plain)[:MAX_PART_BYTES]
    return (plain if plain.strip() else text), pre


def _part(msg: Message, via: str) -> Part:
    walk = _Walk()
    walk.visit(msg, 0)
    text, _ = _body(walk)
    return Part(via, _sender(msg), header_text(msg, "Subject"), text, fold(text))


# -- forwarded inline by a mail client ----------------------------------------------------------

# Separator lines of common clients (Gmail, Thunderbird, Outlook, Apple Mail), some localised.
_FORWARD = re.compile(
    r"^[ \t>*]*(?:-{2,}[ \t]*(?:forwarded message|original message|weitergeleitete nachricht"
    r"|urspr[üu]ngliche nachricht|message transf[ée]r[ée]|message d'origine|mensaje reenviado"
    r"|mensaje original|messaggio inoltrato|messaggio originale|mensagem encaminhada"
    r"|mensagem original|転送されたメッセージ)[ \t]*-{2,}|begin forwarded message:?)[ \t*]*$",
    re.I | re.M,
)
_FIELD = re.compile(r"^[ \t>*]*([^\W\d_][\w .'-]{0,24}?)[ \t*]*[:：][ \t*]*(.*)$")
_FROM_NAMES = ("from", "de", "von", "da", "remetente", "差出人", "送信者")
_SUBJECT_NAMES = ("subject", "objet", "betreff", "asunto", "oggetto", "assunto", "件名")
_FIELD_NAMES = {**dict.fromkeys(_FROM_NAMES, "from"), **dict.fromkeys(_SUBJECT_NAMES, "subject")}
_ADDRESS = (
    re.compile(r"<\s*([^<>\s@]+@[^<>\s]+?)\s*>"),
    re.compile(r"mailto:([^\s\]>)]+@[^\s\]>)]+)", re.I),
    re.compile(r"([^\s<>\"'\[\](),;:]+@[A-Za-z0-9.-]+)"),
)
_QUOTE = re.compile(r"^[ \t]*(?:>[ \t]?)+", re.M)


def _address_in(value: str) -> str:
    """The addr-spec in a pasted From line: angle brackets, then mailto:, then a bare one."""
    for pattern in _ADDRESS:
        match = pattern.search(value)
        if match:
            return match[1].rstrip(".")
    return ""


def inline_forwards(text: str) -> tuple[Part, ...]:
    """Originals pasted into ``text`` below a forward separator, each with its From line."""
    seps = list(_FORWARD.finditer(text, 0, MAX_PART_BYTES))[:MAX_INLINE]
    found = []
    for index, sep in enumerate(seps):
        end = seps[index + 1].start() if index + 1 < len(seps) else len(text)
        part = _forwarded(_QUOTE.sub("", text[sep.end() : end]))
        if part is not None:
            found.append(part)
    return tuple(found)


def _forwarded(block: str) -> Part | None:
    lines = block.lstrip("\r\n \t").splitlines()
    fields: dict[str, str] = {}
    count = 0
    while count < min(len(lines), 20) and (match := _FIELD.match(lines[count])) is not None:
        name = _FIELD_NAMES.get(fold(match[1]).strip())
        if name:
            fields.setdefault(name, match[2].strip())
        count += 1
    if "from" not in fields:
        return None
    body = "\n".join(lines[count:])
    return Part("inline", _address_in(fields["from"]), fields.get("subject", ""), body, fold(body))


# -- parsing ------------------------------------------------------------------------------------


def parse_mail(raw: bytes) -> Mail:
    """Parse ``raw`` once into what detectors look at. May raise on hostile input."""
    msg = email.message_from_bytes(raw, policy=compat32)
    walk = _Walk()
    walk.visit(msg, 0)
    text, pre = _body(walk)
    sender = _sender(msg)
    own = Part("direct", sender, header_text(msg, "Subject"), text, fold(text))
    attached = tuple(_part(m, "attached") for m in walk.attached[:MAX_ATTACHED])
    return Mail(
        message_id=header_text(msg, "Message-ID"),
        reply_to=addresses(msg, "Reply-To"),
        notification_type=header_text(msg, "X-Space-Notification-Type").upper(),
        report_type=_report_type(msg, walk),
        report_text="\n".join(walk.report),
        automatic=_is_automatic(msg, sender),
        html_pre=pre,
        parts=(own, *attached, *inline_forwards(text)),
    )
