"""Build an RFC 3464 delivery status notification (bounce) for permanently failed recipients.

Pure: time, identifiers and host names come from the caller, and the output is the same
bytes for the same input (boundary and Message-ID are derived from the input), so a retried
bounce is identical and the format is testable. The caller sends the result with an empty
envelope sender (``MAIL FROM:<>``, RFC 5321 section 4.5.5) so that a bounce never bounces.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime

#: (recipient, SMTP reply code or None when no upstream answered, reply text or error)
Failure = tuple[str, int | None, str]

# Status fields are parsed by programs: do not fold them at 78 columns (the stdlib would
# even fold right after "Diagnostic-Code:"), only at SMTP's hard limit of 998.
_POLICY = policy.SMTP.clone(max_line_length=998)
_MAX_TEXT = 500
_ENHANCED_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_UNSAFE_RE = re.compile(r"[^\x20-\x7e]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


def build_dsn(
    reporting_mta: str,
    original_mail_from: str,
    queue_id: str,
    failures: Sequence[Failure],
    original_headers: bytes,
    now: float,
) -> bytes:
    """Return the DSN for ``failures`` as CRLF bytes ready to send to ``original_mail_from``.

    Raises ValueError when the original sender is empty: a bounce of a bounce is never sent.
    When the sender or a recipient address is not ASCII, the headers are written as UTF-8
    (RFC 6532) and the caller must send the DSN with SMTPUTF8.
    """
    if original_mail_from in ("", "<>"):  # aiosmtpd reports MAIL FROM:<> as "<>"
        raise ValueError("no DSN for a message with an empty envelope sender")
    if not failures:
        raise ValueError("no failures to report")
    seed = hashlib.sha256(repr((queue_id, now, list(failures))).encode()).hexdigest()
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{_clean(reporting_mta)}>"
    msg["To"] = _clean_address(original_mail_from)
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = f"<dsn.{_clean(queue_id)}.{seed[:16]}@{_clean(reporting_mta)}>"
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/report"
    msg.set_param("report-type", "delivery-status")
    msg.set_boundary(f"dsn-{seed[16:48]}")
    msg.attach(_human_part(reporting_mta, failures))
    msg.attach(_status_part(reporting_mta, queue_id, failures, now))
    msg.attach(_headers_part(original_headers))
    utf8 = not (original_mail_from.isascii() and all(rcpt.isascii() for rcpt, _, _ in failures))
    return msg.as_bytes(policy=_POLICY.clone(utf8=True) if utf8 else _POLICY)


def status_for(code: int | None, message: str) -> str:
    """The RFC 3463 status for a failure: the upstream's enhanced code when it gave one.

    Otherwise 5.0.0 for a 5xx reply, and 4.4.7 (delivery time expired) for a recipient that
    failed because it stayed deferred (4xx or no answer) until the queue lifetime ran out.
    """
    found = _ENHANCED_RE.search(message)
    if found and (code is None or code // 100 == int(found.group(1))):
        return ".".join(found.groups())
    if code is not None and 500 <= code < 600:
        return "5.0.0"
    return "4.4.7"


def _human_part(reporting_mta: str, failures: Sequence[Failure]) -> MIMEPart:
    """The text a person reads first: which recipients failed and what the server said."""
    lines = [
        f"This is the mail system at host {_clean(reporting_mta)}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below (headers only).",
        "",
    ]
    for rcpt, code, text in failures:
        said = f"{code} {_clean(text)}" if code is not None else _clean(text)
        lines.append(f"<{_clean_address(rcpt)}>: {said}")
    return _text_part("\n".join(lines) + "\n", "plain")


def _status_part(
    reporting_mta: str, queue_id: str, failures: Sequence[Failure], now: float
) -> MIMEPart:
    """The machine-readable message/delivery-status: one per-message block, one per rcpt."""
    per_message = Message(policy=_POLICY)
    per_message["Reporting-MTA"] = f"dns; {_clean(reporting_mta)}"
    per_message["X-Mailrelay-Queue-ID"] = _clean(queue_id)
    blocks = [per_message]
    for rcpt, code, text in failures:
        block = Message(policy=_POLICY)
        address = _clean_address(rcpt)
        address_type = "rfc822" if address.isascii() else "utf-8"  # RFC 6533
        block["Final-Recipient"] = f"{address_type}; {address}"
        block["Action"] = "failed"
        block["Status"] = status_for(code, text)
        if code is not None:
            block["Diagnostic-Code"] = f"smtp; {code} {_clean(text)}"
        else:
            block["Diagnostic-Code"] = f"X-mailrelay; {_clean(text)}"
        block["Last-Attempt-Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
        blocks.append(block)
    part = MIMEPart(policy=_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


def _headers_part(original_headers: bytes) -> MIMEPart:
    """The original header block as text/rfc822-headers, 7-bit safe (8-bit bytes become U+FFFD).

    Only the headers are returned, never the body: the sender has the body, and returning it
    would bounce attachments and personal data back through the mail system.
    """
    header_block = original_headers.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    text = header_block.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return _text_part(text.rstrip("\n") + "\n", "rfc822-headers")


def _text_part(text: str, subtype: str) -> MIMEPart:
    """A text part that stays 7-bit (quoted-printable if needed): no 8BITMIME needed to send."""
    part = MIMEPart(policy=_POLICY)
    short = all(len(line) <= _MAX_TEXT * 2 for line in text.splitlines())
    cte = "7bit" if text.isascii() and short else "quoted-printable"
    part.set_content(text, subtype=subtype, cte=cte)
    return part


def _clean(value: str) -> str:
    """One short printable-ASCII line: server replies can be long, multi-line, any bytes."""
    text = _UNSAFE_RE.sub(" ", value).strip()
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def _clean_address(address: str) -> str:
    """An address without control characters; non-ASCII (SMTPUTF8) addresses stay intact."""
    return _CONTROL_RE.sub("", address).strip()
