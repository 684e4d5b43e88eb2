"""Thread tagging of critical replies: what changes, and that nothing else does."""

from __future__ import annotations

import base64
import email
import re
from email import policy as email_policy
from email.message import Message
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.policy.classify import BuyerMessageRef
from mailrelay.policy.message import view_message
from mailrelay.policy.thread import tag_reply

SAMPLES = Path(__file__).parent / "data" / "samples"
ORDER = "113-4829371-5562918"
QUESTION = "Hi, does the lantern come with batteries? I need it before Saturday."


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def buyer_ref(**changes: object) -> BuyerMessageRef:
    """Sample 13's buyer message as the poller records it (ids read from the sample itself)."""
    view = view_message(sample("13-buyer-question-en-classic-commMgrTok.eml"))
    fields = dict(message_id=view.message_id, buyer_key=view.from_addr, order_id=ORDER,
                  token=view.comm_tokens[0], subject=view.subject, text=QUESTION, received=1.0e9)
    fields.update(changes)
    return BuyerMessageRef(**fields)  # type: ignore[arg-type]


REF = buyer_ref()
TOKEN_LINE = f"[commMgrTok:{REF.token}]"
DKIM = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=northwind-outdoor.example;\r\n"
    b" s=mail; h=from:to:subject:date:message-id;\r\n"
    b" bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
    b" b=dzdVyOfAKCdLXdJOc9G2q8LoXSlEniSbav+yuU4zGeeruD00lszZVoG4ZHRNiYzR\r\n"
)
PDF = base64.encodebytes(bytes(range(256)) * 4).replace(b"\n", b"\r\n")
ATTACHMENT = (
    b"Content-Type: application/pdf; name=\"invoice.pdf\"\r\n"
    b"Content-Disposition: attachment; filename=\"invoice.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n" + PDF
)
MULTIPART = (
    b"From: \"Northwind Outdoor\" <support@northwind-outdoor.example>\r\n"
    b"To: k7m2p9x4t1v8c3q@marketplace.amazon.com\r\n"
    b"Subject: Your lantern order\r\n"
    b"Message-ID: <mp-1@northwind-outdoor.example>\r\n" + DKIM
    + b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Yes, batteries are included. Gr=C3=BC=C3=9Fe\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"<html><body><p>Yes, batteries are included. Gr=C3=BC=C3=9Fe</p></body></html>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n" + ATTACHMENT + b"--outer--\r\n"
)


def parts(raw: bytes) -> dict[str, str]:
    """Decoded text of the text/plain and text/html parts, as a mail client shows them."""
    msg = email.message_from_bytes(raw, policy=email_policy.default)
    found: dict[str, str] = {}
    for part in msg.walk():
        if part.get_content_type() in ("text/plain", "text/html") and not part.is_attachment():
            found[part.get_content_subtype()] = part.get_content().replace("\r\n", "\n")
    return found


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def field(raw: bytes, name: str) -> list[bytes]:
    """Raw header fields named ``name``, continuation lines included."""
    pattern = rb"(?im)^" + name.encode() + rb":.*\r\n(?:[ \t].*\r\n)*"
    return re.findall(pattern, header_block(raw))


def single(subject: str, body: bytes = b"Hello Jane.\r\n", *, charset: str = "us-ascii",
           cte: str = "7bit", extra: bytes = b"") -> bytes:
    return (
        b"From: shop@seller.example\r\nTo: k7m2p9x4t1v8c3q@marketplace.amazon.com\r\n"
        b"Subject: " + subject.encode("utf-8") + b"\r\n" + extra
        + f"Content-Type: text/plain; charset={charset}\r\n".encode()
        + f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode() + body
    )


def test_sample_15_on_sample_13_thread() -> None:
    """Sample 15 tagged onto sample 13's message: headers, token and quote added, rest kept."""
    raw = sample("15-seller-reply-critical.eml")
    out = tag_reply(raw, REF)
    assert field(out, "In-Reply-To") == [b"In-Reply-To: <bbc-msg-113-classic@amazon.example>\r\n"]
    assert field(out, "References") == [
        b"References: <bbc-msg-113-modern-5b2e7c1a@amazon.example>\r\n"
        b" <bbc-msg-113-classic@amazon.example>\r\n"
    ]
    assert field(out, "Subject") == field(raw, "Subject")  # already "Re: <buyer subject>"
    for name in ("From", "To", "Date", "Message-ID", "MIME-Version", "Content-Type"):
        assert field(out, name) == field(raw, name)
    body = out.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(raw.split(b"\r\n\r\n", 1)[1])  # the seller's text is untouched
    text = parts(out)["plain"]
    assert f"> {QUESTION}" in text and TOKEN_LINE in text
    assert "[commMgrTok:A2LV8N4WP6HJD]" in text  # the quote already there stays
    assert tag_reply(out, REF) == out


def test_multipart_with_attachment() -> None:
    """Both text parts get token and quote; DKIM-Signature and attachment stay byte-identical."""
    out = tag_reply(MULTIPART, REF)
    assert DKIM in header_block(out)
    assert ATTACHMENT + b"--outer--\r\n" in out
    assert out.startswith(MULTIPART.split(b"Subject:", 1)[0])
    assert field(out, "Subject") == [
        f"Subject: Re: Product details inquiry from Amazon customer Jane (Order: {ORDER})\r\n"
        .encode()
    ]
    assert field(out, "In-Reply-To") == [b"In-Reply-To: <bbc-msg-113-classic@amazon.example>\r\n"]
    assert field(out, "References") == [b"References: <bbc-msg-113-classic@amazon.example>\r\n"]
    texts = parts(out)
    assert texts["plain"].startswith("Yes, batteries are included. Grüße\n")
    assert f"> {QUESTION}" in texts["plain"] and TOKEN_LINE in texts["plain"]
    assert "<blockquote" in texts["html"] and QUESTION in texts["html"]
    assert TOKEN_LINE in texts["html"] and texts["html"].rstrip().endswith("</body></html>")
    assert b"Content-Transfer-Encoding: quoted-printable" in out.split(b"--inner--")[0]
    assert tag_reply(out, REF) == out
    assert b"\n" not in out.replace(b"\r\n", b"")


SUBJECTS = [
    ("already-re", f"Re: {REF.subject}", f"Re: {REF.subject}"),
    ("german-reply-prefix", f"AW: {REF.subject}", f"AW: {REF.subject}"),
    ("no-prefix", REF.subject, f"Re: {REF.subject}"),
    ("unrelated", "Your lantern", f"Re: {REF.subject}"),
    ("important-not-kept", "[Important] Your lantern", f"Re: {REF.subject}"),
    ("related-with-important", f"Re: [Important] {REF.subject}", f"Re: [Important] {REF.subject}"),
]


@pytest.mark.parametrize(("subject", "expected"), [s[1:] for s in SUBJECTS],
                         ids=[s[0] for s in SUBJECTS])
def test_subject_relates_to_buyer_subject(subject: str, expected: str) -> None:
    """The subject becomes "Re: <buyer subject>" unless it already relates; never Re: Re:."""
    out = tag_reply(single(subject), REF)
    assert view_message(out).subject == expected
    assert "Re: Re:" not in view_message(out).subject


def test_buyer_subject_is_cleaned_and_encoded() -> None:
    """A buyer subject's own Re:/[Important] is dropped; non-ASCII is RFC 2047 encoded."""
    subject = "商品についてのお問い合わせ (注文: 250-6627193-4401829)"
    out = tag_reply(single("Hello"), buyer_ref(subject=f"RE: [Important] {subject}"))
    assert view_message(out).subject == f"Re: {subject}"
    assert header_block(out).isascii()


def test_existing_threading_headers_are_not_duplicated() -> None:
    """A reply already naming the buyer message keeps its In-Reply-To and References as they are."""
    extra = (b"In-Reply-To: <bbc-msg-113-classic@amazon.example>\r\n"
             b"References: <a@x> <bbc-msg-113-classic@amazon.example>\r\n")
    raw = single(f"Re: {REF.subject}", extra=extra)
    out = tag_reply(raw, REF)
    assert header_block(out) == header_block(raw)


def test_references_appended_after_other_ids() -> None:
    """The buyer id is appended to an existing References list, once."""
    out = tag_reply(single("x", extra=b"References: <a@x>\r\n <b@x>\r\n"), REF)
    assert field(out, "References") == [
        b"References: <a@x>\r\n <b@x>\r\n <bbc-msg-113-classic@amazon.example>\r\n"]


ENCODINGS = [
    ("qp-stays-qp", "utf-8", "quoted-printable", "Grüße aus Köln.\n", "quoted-printable",
     "utf-8", "Funktioniert das Gerät?"),
    ("base64-stays-base64", "utf-8", "base64", "Grüße aus Köln.\n", "base64", "utf-8",
     "Funktioniert das Gerät?"),
    ("iso-2022-jp-stays", "iso-2022-jp", "7bit", "お問い合わせありがとうございます。\n", "7bit",
     "iso-2022-jp", "電池は付属していますか？"),
    ("ascii-to-utf8-qp", "us-ascii", "7bit", "Thanks for asking.\n", "quoted-printable", "utf-8",
     "電池は付属していますか？"),
    ("shift-jis-8bit", "shift_jis", "8bit", "ご連絡ありがとうございます。\n", "8bit", "shift_jis",
     "電池は付属していますか？"),
]


@pytest.mark.parametrize(("charset", "cte", "body", "new_cte", "new_charset", "question"),
                         [e[1:] for e in ENCODINGS], ids=[e[0] for e in ENCODINGS])
def test_changed_part_keeps_its_encoding(charset: str, cte: str, body: str, new_cte: str,
                                         new_charset: str, question: str) -> None:
    """A changed part is re-encoded in its own charset and CTE when they can carry the quote."""
    payload = body.replace("\n", "\r\n").encode(charset)
    if cte == "base64":
        payload = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    elif cte == "quoted-printable":
        payload = payload.replace("ü".encode(), b"=C3=BC").replace("ö".encode(), b"=C3=B6")
        payload = payload.replace("ß".encode(), b"=C3=9F")
    out = tag_reply(single("Re: x", payload, charset=charset, cte=cte), buyer_ref(text=question))
    msg = email.message_from_bytes(out, policy=email_policy.default)
    assert msg["Content-Transfer-Encoding"] == new_cte
    assert msg.get_content_charset() == new_charset
    text = msg.get_content().replace("\r\n", "\n")
    assert text.startswith(body) and f"> {question}" in text and TOKEN_LINE in text


@pytest.mark.parametrize(("add_token", "quote"), [(False, True), (True, False), (False, False)])
def test_options_turn_off_token_or_quote(add_token: bool, quote: bool) -> None:
    """threading.add_token and threading.quote_original are honoured."""
    out = tag_reply(single("Re: x"), REF, add_token=add_token, quote_original=quote)
    text = parts(out)["plain"]
    assert (TOKEN_LINE in text) is add_token
    assert (QUESTION in text) is quote
    assert field(out, "In-Reply-To")  # headers are added either way


def test_existing_wrapped_quote_is_recognised() -> None:
    """A quote the client already wrapped over several "> " lines is not added again."""
    body = (b"Yes.\r\n\r\n> Hi, does the lantern come with\r\n> batteries? I need it before"
            b"\r\n>   Saturday.\r\n")
    out = tag_reply(single("Re: x", body), REF)
    text = parts(out)["plain"]
    assert text.count("Saturday") == 1 and text.rstrip().endswith(TOKEN_LINE)


def test_only_last_inline_text_part_is_changed() -> None:
    """With several inline text/plain parts the addition goes once, into the last one."""
    raw = (b"Subject: Re: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
           b"--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"iVBORw0K\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nsecond\r\n--b--\r\n")
    out = tag_reply(raw, REF)
    assert b"--b\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--b" in out
    assert b"iVBORw0K\r\n--b" in out
    assert out.count(TOKEN_LINE.encode()) == 1


BROKEN = [
    ("no-closing-boundary", b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
     b"--b\r\nContent-Type: text/plain\r\n\r\ntruncated"),
    ("bad-base64-text", b"Subject: x\r\nContent-Type: text/plain\r\n"
     b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64===\r\n"),
    ("unknown-charset", b"Subject: x\r\nContent-Type: text/plain; charset=x-klingon\r\n\r\n"
     b"qapla\r\n"),
    ("no-body", b"Subject: x\r\nX-Nothing: here"),
    ("garbage", b"\x00\xff\xfe binary \x80 junk"),
    ("multipart-without-boundary", b"Subject: x\r\nContent-Type: multipart/mixed\r\n\r\nhello\r\n"),
]


@pytest.mark.parametrize("raw", [b[1] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_mime_still_gets_headers(raw: bytes) -> None:
    """Malformed input never raises: threading headers are added, idempotently."""
    out = tag_reply(raw, REF)
    assert b"In-Reply-To: <bbc-msg-113-classic@amazon.example>\r\n" in out
    assert tag_reply(out, REF) == out


def test_undecodable_part_is_left_alone() -> None:
    """A text part that cannot be decoded exactly is kept byte for byte."""
    body = b"!!!not base64===\r\n"
    raw = single("Re: x", body, cte="base64")
    assert tag_reply(raw, REF).endswith(b"\r\n\r\n" + body)


def test_bare_lf_input_gives_crlf_output() -> None:
    """Bare LF line endings come out as CRLF."""
    out = tag_reply(single("Re: x").replace(b"\r\n", b"\n"), REF)
    assert b"\n" not in out.replace(b"\r\n", b"") and TOKEN_LINE.encode() in out


def test_html_without_body_tag_gets_addition_at_end() -> None:
    """An HTML part without </body> gets the quote and token appended."""
    raw = (b"Subject: Re: x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Yes.</p>\r\n")
    out = tag_reply(raw, REF)
    html = parts(out)["html"]
    assert html.startswith("<p>Yes.</p>") and "<blockquote" in html and TOKEN_LINE in html


def test_ref_without_token_or_text() -> None:
    """A buyer message with no token and no text gives only the threading headers."""
    raw = single("Re: x")
    out = tag_reply(raw, buyer_ref(token=None, text=""))
    assert out.split(b"\r\n\r\n", 1)[1] == raw.split(b"\r\n\r\n", 1)[1]
    assert field(out, "References")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_tag_reply_never_raises(raw: bytes) -> None:
    """Arbitrary bytes: no exception, CRLF only, and tagging twice changes nothing more."""
    out = tag_reply(raw, REF)
    assert b"\n" not in out.replace(b"\r\n", b"")
    assert tag_reply(out, REF) == out


MIME_BITS = st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: text/plain\r\n",
    b"Content-Type: text/html; charset=iso-2022-jp\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n", b"\r\n", b"--b\r\n", b"--b--\r\n",
    b"Subject: Re: x\r\n", b"hello =C3=BC\r\n", b"</body>\r\n", b"[commMgrTok:A3QX7RZ2M9KT5]\r\n",
    b"Content-Disposition: attachment\r\n", b"\x1b$B$3$s\x1b(B\r\n", b"aGVsbG8=\r\n",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(MIME_BITS, max_size=30))
def test_tag_reply_on_mime_shaped_input(bits: list[bytes]) -> None:
    """MIME-shaped fragments in any order: no exception, idempotent."""
    out = tag_reply(b"".join(bits), REF)
    assert tag_reply(out, REF) == out


def _walk_types(raw: bytes) -> list[str]:
    msg: Message = email.message_from_bytes(raw)
    return [part.get_content_type() for part in msg.walk()]


def test_structure_is_unchanged() -> None:
    """Tagging keeps the MIME tree: same parts, same types, same order."""
    assert _walk_types(tag_reply(MULTIPART, REF)) == _walk_types(MULTIPART)
