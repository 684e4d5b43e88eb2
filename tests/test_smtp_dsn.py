"""RFC 3464 bounces built by mailrelay.smtp.dsn, parsed back with the stdlib email package."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from mailrelay.smtp.dsn import build_dsn, status_for

ORIGINAL = (
    b"From: Seller <seller@shop.example>\r\n"
    b"To: buyer@marketplace.amazon.de\r\n"
    b"Subject: Your order 303-1234567-1234567\r\n"
    b"Message-ID: <orig@shop.example>\r\n"
    b"\r\n"
    b"Secret body text\r\n"
)
FAILURES = [
    ("gone@x.example", 550, "5.1.1 <gone@x.example>: Recipient address rejected\nUser unknown"),
    ("slow@y.example", 451, "4.7.1 greylisted"),
    ("down@z.example", None, "Error connecting to mx.z.example on port 25: Connection refused"),
]
NOW = 1_700_000_000.0


def _build(**overrides) -> bytes:
    args = {
        "reporting_mta": "relay.shop.example",
        "original_mail_from": "seller@shop.example",
        "queue_id": "Q42",
        "failures": FAILURES,
        "original_headers": ORIGINAL,
        "now": NOW,
    }
    args.update(overrides)
    return build_dsn(**args)


def _parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(raw)


def test_dsn_structure() -> None:
    """multipart/report with text, delivery-status and the original headers, in that order."""
    msg = _parse(_build())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert str(msg["From"]) == "Mail Delivery System <MAILER-DAEMON@relay.shop.example>"
    assert str(msg["To"]) == "seller@shop.example"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert "Return-Path" not in msg  # the envelope carries the null sender, not a header
    assert msg["Date"].datetime.timestamp() == NOW


def test_delivery_status_fields_per_recipient() -> None:
    """One block per failed recipient with Final-Recipient, Action, Status, Diagnostic-Code."""
    status = list(_parse(_build()).iter_parts())[1]
    per_message, *per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.shop.example"
    fields = [
        (b["Final-Recipient"], b["Action"], b["Status"], b["Diagnostic-Code"]) for b in per_rcpt
    ]
    assert fields == [
        (
            "rfc822; gone@x.example",
            "failed",
            "5.1.1",
            "smtp; 550 5.1.1 <gone@x.example>: Recipient address rejected User unknown",
        ),
        ("rfc822; slow@y.example", "failed", "4.7.1", "smtp; 451 4.7.1 greylisted"),
        (
            "rfc822; down@z.example",
            "failed",
            "4.4.7",
            "X-mailrelay; Error connecting to mx.z.example on port 25: Connection refused",
        ),
    ]


def test_human_part_and_original_headers() -> None:
    """The text names each recipient and reply; only the original headers come back."""
    text, _, headers = _parse(_build()).iter_parts()
    body = text.get_content()
    assert "<gone@x.example>: 550 5.1.1" in body
    assert "<down@z.example>: Error connecting" in body
    returned = headers.get_content()
    assert "Subject: Your order 303-1234567-1234567" in returned
    assert "Message-ID: <orig@shop.example>" in returned
    assert "Secret body text" not in returned


def test_dsn_is_7bit_crlf_and_deterministic() -> None:
    """8-bit original headers are encoded; output is CRLF, 7-bit, and stable for a retry."""
    raw = _build(original_headers=b"Subject: caf\xc3\xa9 \xff\r\n\r\nbody")
    assert raw.isascii()
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert raw == _build(original_headers=b"Subject: caf\xc3\xa9 \xff\r\n\r\nbody")
    headers = list(_parse(raw).iter_parts())[2].get_content()
    assert "café" in headers


def test_reply_text_cannot_inject_headers() -> None:
    """CR/LF in a server reply or address stays inside one field."""
    raw = _build(failures=[("a@x.example\r\nBcc: evil@x", 550, "no\r\nX-Evil: 1")])
    status = list(_parse(raw).iter_parts())[1]
    block = status.get_payload()[1]
    assert "X-Evil" not in block
    assert "Bcc" not in block
    assert "Bcc" not in _parse(raw)


@pytest.mark.parametrize("sender", ["", "<>"])
def test_no_dsn_for_null_sender(sender: str) -> None:
    """A bounce is never bounced (RFC 5321 section 4.5.5)."""
    with pytest.raises(ValueError):
        _build(original_mail_from=sender)


@pytest.mark.parametrize(
    ("code", "message", "status"),
    [
        (550, "5.1.1 user unknown", "5.1.1"),
        (554, "rejected", "5.0.0"),
        (550, "4.1.1 inconsistent enhanced code", "5.0.0"),
        (451, "4.7.1 try later", "4.7.1"),
        (451, "try later", "4.4.7"),
        (None, "timed out", "4.4.7"),
    ],
)
def test_status_for(code: int | None, message: str, status: str) -> None:
    """The upstream's enhanced code when consistent, else a class default."""
    assert status_for(code, message) == status


def test_long_reply_is_not_folded_and_is_bounded() -> None:
    """A huge upstream reply gives one unfolded, truncated Diagnostic-Code line."""
    raw = _build(failures=[("a@x.example", 550, "5.7.1 " + "blocked " * 500)])
    line = next(x for x in raw.split(b"\r\n") if x.startswith(b"Diagnostic-Code:"))
    assert line.startswith(b"Diagnostic-Code: smtp; 550 5.7.1 blocked")
    assert line.endswith(b"...")
    assert len(line) < 998


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    """An SMTPUTF8 recipient is reported as utf-8 (RFC 6533) with UTF-8 headers (RFC 6532)."""
    raw = _build(failures=[("jürgen@x.example", 550, "5.1.1 unknown")])
    block = list(_parse(raw).iter_parts())[1].get_payload()[1]
    assert block["Final-Recipient"] == "utf-8; jürgen@x.example"
