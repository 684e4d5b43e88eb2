"""What an IMAP-fetched message is: opt-out notices, other Amazon notices, buyer messages, other.

Table-driven over every sample (tests/data/samples) and every constructed notice
(tests/data/notices), plus the real-world bounce corpus (none of it may ever be an opt-out) and
property tests on arbitrary input. Everything is pure: no sockets, no event loop.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.imap.detect import (
    DETECTORS,
    AmazonNotice,
    BuyerMessage,
    Finding,
    NoticeKind,
    OptOutNotice,
    Other,
    detect,
)
from mailrelay.imap.detectors import OptOutDetector, is_amazon_domain
from mailrelay.policy.addresses import parse_buyer_address
from mailrelay.policy.identifiers import ORDER_ID_RE

DATA = Path(__file__).parent / "data"
CORPUS_NAMES = ("shared", "corpus", "bounces")
NOT_MAIL = {"SOURCE.md", "LICENSE", "COPYING.LESSER", "gnu-COPYING-GPL"}


def case(name: str, expected: object) -> object:
    return pytest.param(name, expected, id=Path(name).stem)


def opt(order: str, language: str, via: str = "", key: str | None = None) -> OptOutNotice:
    detector = f"optout-{language}/{via}" if via else f"optout-{language}"
    return OptOutNotice("", (order,), key, language, detector)


def notice(kind: NoticeKind, *orders: str) -> AmazonNotice:
    return AmazonNotice("", kind, orders)


def buyer(
    address: str, order: str | None, token: str | None, subject: str, text: str
) -> BuyerMessage:
    parsed = parse_buyer_address(address)
    assert parsed is not None
    return BuyerMessage("", parsed.key, address, order, token, subject, text, parsed.marketplace)


K = NoticeKind
UNRECOGNISED = Other("", "unrecognised")
ORDER = "113-4829371-5562918"  # the order of the shared samples
SUBJECT = f"Product details inquiry from Amazon customer Jane (Order: {ORDER})"
PASTED = (
    "Look what I got:\n\n---------- Forwarded message ---------\n"
    "From: Amazon.com <donotreply@amazon.com>\n"
    "Subject: Your message to a buyer could not be delivered\n\n"
    "We were unable to deliver the message you sent for order [113-7777777-8888888] because the "
    "buyer has chosen to opt out of receiving unsolicited messages from sellers."
)

CASES = [
    # -- the shared samples ---------------------------------------------------------------------
    case("samples/01-optout-bounce-en-2017.eml", opt(ORDER, "en")),
    case("samples/03-optout-bounce-fr.eml", opt("403-7719204-3381547", "fr")),
    case("samples/04-optout-bounce-ja-iso2022jp.eml", opt("250-6627193-4401829", "ja")),
    case("samples/06-optout-bounce-forwarded-as-attachment.eml", opt(ORDER, "en", "attached")),
    case("samples/09-dsn-unauthorized-sender-5.7.1.eml", notice(K.UNAUTHORIZED_SENDER, ORDER)),
    case("samples/10-rejection-guidelines-links.eml", notice(K.GUIDELINE_BLOCK, ORDER)),
    case("samples/11-rejection-account-restricted.eml", notice(K.ACCOUNT_RESTRICTED, ORDER)),
    case(
        "samples/13-buyer-question-en-classic-commMgrTok.eml",
        buyer(
            "k7m2p9x4t1v8c3q@marketplace.amazon.com",
            ORDER,
            "A3QX7RZ2M9KT5",
            SUBJECT,
            "Hi, does the lantern come with batteries? I need it before Saturday.",
        ),
    ),
    case(
        "samples/14-buyer-question-en-modern-pluscase.eml",
        buyer(
            "r4w8n2j6d1h5z9b+5b2e7c1a-9d3f-4e8a-b6c2-1f0a9e7d3c4b@marketplace.amazon.com",
            ORDER,
            "A2LV8N4WP6HJD",
            SUBJECT,
            'Hi, the tracking says "delivery attempted" but nobody came. Can you check the '
            "address? It should be Apt 4B, not 48.",
        ),
    ),
    case("samples/15-seller-reply-critical.eml", UNRECOGNISED),
    case("samples/16-seller-feedback-request.eml", UNRECOGNISED),
    case("samples/17-seller-delivery-issue-proactive.eml", UNRECOGNISED),
    case("samples/18-seller-marketing-newsletter.eml", UNRECOGNISED),
    case("samples/19-seller-thankyou.eml", UNRECOGNISED),
    case("samples/20-amazon-copy-confirmation.eml", notice(K.COPY_OF_SENT_MESSAGE, ORDER)),
    case(
        "samples/21-buyer-message-es-mx.eml",
        buyer(
            "m1n2b3v4c5x6z7l@marketplace.amazon.com.mx",
            "701-3302918-8810274",
            "A5MX9QW2ER7TY",
            "Consulta sobre detalles del producto del cliente de Amazon María "
            "(Pedido: 701-3302918-8810274)",
            "Hola, ¿la linterna incluye pilas? La necesito para el fin de semana.",
        ),
    ),
    # -- constructed opt-out notices: each language, encoding and way of forwarding -------------
    case("notices/en-important-8bit.eml", opt("205-3392017-6617352", "en")),
    case("notices/en-html-only.eml", opt("112-0045871-2201946", "en")),
    case("notices/en-base64-subdomain.eml", opt("114-7730021-0091846", "en")),
    case("notices/en-mbox-crlf-qp.eml", opt("702-5519930-3318425", "en")),
    case(
        "notices/en-names-buyer-alias.eml",
        opt("113-2200418-9930112", "en", key="q8w2e4r6t1y3u5i@marketplace.amazon.com"),
    ),
    case("notices/fr-html-base64.eml", opt("171-9924410-3356210", "fr")),
    case("notices/ja-utf8-base64.eml", opt("503-1184420-7729014", "ja")),
    case("notices/ja-iso2022jp-fullwidth-order.eml", opt("503-2294510-6618327", "ja")),
    case("notices/de-latin1-qp.eml", opt("302-6617720-1184933", "de")),
    case("notices/de-variant-8bit.eml", opt("304-1120458-9917736", "de")),
    case("notices/es-qp.eml", opt("406-2281194-5561820", "es")),
    case("notices/es-variant-html.eml", opt("701-4471120-2290015", "es")),
    case("notices/it-qp.eml", opt("403-5512098-7740016", "it")),
    case("notices/it-variant-base64.eml", opt("404-9981204-1120837", "it")),
    case("notices/fwd-inline-gmail.eml", opt("111-8854021-3367190", "en", "inline")),
    case("notices/fwd-inline-thunderbird-fr.eml", opt("402-3318820-6619043", "fr", "inline")),
    case("notices/fwd-inline-apple-ja.eml", opt("249-7716630-1128804", "ja", "inline")),
    case("notices/fwd-inline-outlook-quoted-de.eml", opt("303-8841120-5527719", "de", "inline")),
    case("notices/fwd-attached-ja-iso2022jp.eml", opt("250-3309921-7781046", "ja", "attached")),
    case("notices/auto-forwarded-resent.eml", opt("113-6650021-4438217", "en")),
    # -- never opt-outs -------------------------------------------------------------------------
    case("notices/neg-lookalike-amazon-com-evil.eml", UNRECOGNISED),
    case("notices/neg-lookalike-amazon-sellers.eml", UNRECOGNISED),
    case("notices/neg-lookalike-amazonses.eml", UNRECOGNISED),
    case("notices/neg-lookalike-display-name.eml", UNRECOGNISED),
    case("notices/neg-missing-order-id.eml", notice(K.OTHER)),
    case(
        "notices/neg-guidelines-and-optout-wording.eml",
        notice(K.GUIDELINE_BLOCK, "113-7710042-3389120"),
    ),
    case("notices/neg-amazonses-dsn.eml", Other("", "delivery-status")),
    case("notices/neg-amazon-domain-dsn.eml", Other("", "delivery-status")),
    case("notices/neg-arf-optout-from-amazon.eml", Other("", "feedback-report")),
    case("notices/neg-fwd-inline-lookalike.eml", UNRECOGNISED),
    case("notices/neg-bounce-of-forward.eml", UNRECOGNISED),
    case("notices/neg-seller-reply-quoting-notice.eml", UNRECOGNISED),
    case(
        "notices/neg-buyer-pastes-notice.eml",
        buyer(
            "m4l0r7y2b9x5c3v@marketplace.amazon.com",
            "113-2323232-4545454",
            "AMALLORY12345",
            "Message from Amazon customer Mallory (Order: 113-2323232-4545454)",
            PASTED,
        ),
    ),
    case(
        "notices/neg-amazon-relay-buyer-replyto-optout-words.eml",
        buyer(
            "w3e5r7t9y1u3i5o@marketplace.amazon.com",
            "113-5050505-6060606",
            None,
            "Message from Amazon customer Max (Order: 113-5050505-6060606)",
            "We were unable to deliver the message you sent for order [113-4040404-3030303] "
            "because the buyer has chosen to opt out of receiving unsolicited messages from "
            "sellers. This message was not sent as it did not meet the Buyer-Seller Messaging "
            "communication guidelines.",
        ),
    ),
    case(
        "notices/buyer-mentions-optout-wording.eml",
        buyer(
            "q8w2e4r6t1y3u5i@marketplace.amazon.com",
            None,
            None,
            "Why did I get this?",
            PASTED.split("\n\n")[-1].replace("113-7777777-8888888", "113-0000111-2223334"),
        ),
    ),
    # -- other Amazon notices ---------------------------------------------------------------------
    case(
        "notices/amazon-unauthorized-sender.eml",
        notice(K.UNAUTHORIZED_SENDER, "113-3141592-6535897"),
    ),
    case(
        "notices/amazon-restricted-temporarily-html.eml",
        notice(K.ACCOUNT_RESTRICTED, "204-1414213-5623730"),
    ),
    case("notices/amazon-return-request.eml", notice(K.OTHER, "113-2718281-8284590")),
    case(
        "notices/amazon-copy-confirmation-pt-br.eml",
        notice(K.COPY_OF_SENT_MESSAGE, "701-1122334-5566778"),
    ),
    case(
        "notices/amazon-copy-2016-plain.eml", notice(K.COPY_OF_SENT_MESSAGE, "113-1618033-9887498")
    ),
    # -- buyer messages -------------------------------------------------------------------------
    case(
        "notices/buyer-replyto-only-pt-html.eml",
        buyer(
            "n340cj40yxfjsq4+0c6d1b2e-3f4a-4b5c-8d9e-0f1a2b3c4d5e@marketplace.amazon.com.br",
            "701-9988776-6554433",
            "ABRBUYER12345",
            "Detalhes do produto Amazon Ana pergunta do cliente",
            "Olá, a lanterna é à prova d'água?",
        ),
    ),
    case(
        "notices/buyer-es-html-pre.eml",
        buyer(
            "b9h2fb3jc5m9lb2@marketplace.amazon.es",
            "405-1029384-7561029",
            "AESPRE1234567",
            "Consulta sobre detalles del producto del cliente de Amazon Lucía "
            "(Pedido: 405-1029384-7561029)",
            "Hola,\n¿la linterna incluye pilas?\nGracias & saludos",
        ),
    ),
    case(
        "notices/buyer-es-iniciar-mensaje.eml",
        buyer(
            "5qlgtdx4557tnyn@marketplace.amazon.es",
            "406-5647382-9102837",
            "AESINI1234567",
            "Solicitud de cancelacion de pedido del cliente de Amazon",
            "Quiero cancelar el pedido, por favor.\n"
            "Mi otro pedido 406-1111111-2222222 sí lo quiero.",
        ),
    ),
    case(
        "notices/buyer-pt-markers-plain.eml",
        buyer(
            "g7bncrz9n1mbhd5@marketplace.amazon.com.br",
            "701-5544332-2110099",
            None,
            "Pergunta do cliente",
            "Bom dia!\nQuando chega?",
        ),
    ),
]
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(\S+)", re.I | re.M)


@pytest.mark.parametrize(("name", "expected"), CASES)
def test_detect_classifies_each_file(name: str, expected: Finding) -> None:
    """Each sample and constructed message is classified exactly as its table row says."""
    raw = (DATA / name).read_bytes()
    finding = detect(raw)
    header = _MESSAGE_ID.search(raw)
    assert header is not None
    assert finding.message_id == header[1].decode()
    assert replace(finding, message_id="") == expected


def test_every_data_file_has_a_row() -> None:
    """Every file under samples/ and notices/ is in the table, so a new file needs a row."""
    on_disk = {f"{d}/{p.name}" for d in ("samples", "notices") for p in (DATA / d).iterdir()}
    in_table = {case.values[0] for case in CASES}
    assert on_disk == in_table


def test_each_language_has_an_optout_detector_and_a_notice() -> None:
    """EN, FR, JA, DE, ES and IT each have a detector and at least one notice in the table."""
    languages = {d.language for d in DETECTORS if isinstance(d, OptOutDetector)}
    found = [c.values[1] for c in CASES]
    covered = {f.language for f in found if isinstance(f, OptOutNotice)}
    assert languages == covered == {"en", "fr", "ja", "de", "es", "it"}


def test_registry_rules_out_before_it_rules_in() -> None:
    """Reports and non-opt-out notices run before every opt-out detector; names are unique."""
    names = [d.name for d in DETECTORS]
    first_optout = min(i for i, d in enumerate(DETECTORS) if isinstance(d, OptOutDetector))
    assert len(set(names)) == len(names)
    assert names[:first_optout] == [
        "report", "copy-of-sent-message", "guideline-block", "account-restricted",
        "unauthorized-sender",
    ]  # fmt: skip
    assert names[-2:] == ["buyer-message", "amazon-other"]


@pytest.mark.parametrize(
    ("domain", "owned"),
    [
        ("amazon.com", True),
        ("bounces.amazon.com", True),
        ("amazon.co.jp", True),
        ("AMAZON.DE.", True),
        ("email.amazon.com.br", True),
        ("marketplace.amazon.com", False),
        ("marketplace.amazon.co.uk", False),
        ("x.marketplace.amazon.de", False),
        ("amazon.com.evil.example", False),
        ("amazon-sellers.com", False),
        ("amazonses.com", False),
        ("email.amazonses.com", False),
        ("evilamazon.com", False),
        ("amazon.evil", False),
        ("amazon..com", False),
        ("", False),
    ],
)
def test_amazon_owned_domains(domain: str, owned: bool) -> None:
    """Only amazon.<tld> and its subdomains count as Amazon; buyer relays and look-alikes do not."""
    assert is_amazon_domain(domain) is owned


SAMPLE_01 = (DATA / "samples" / "01-optout-bounce-en-2017.eml").read_bytes()
NOTICE_BODY = SAMPLE_01.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
NOTICE_HEAD = (
    "From: Amazon <donotreply@{domain}>\nTo: s@seller.example\nSubject: x\nMessage-ID: <m@x>\n"
    "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: quoted-printable\n\n"
)
LABELS = st.sampled_from([
    "amazon", "marketplace", "amazonses", "amazon-sellers", "evil", "bounces", "com", "co", "jp",
    "de", "example", "amaz0n",
])  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(LABELS, min_size=1, max_size=5).map(".".join))
def test_optout_only_from_amazon_owned_domains(domain: str) -> None:
    """The same notice is an opt-out exactly when its sender's domain is Amazon-owned."""
    raw = NOTICE_HEAD.format(domain=domain).encode() + NOTICE_BODY
    assert isinstance(detect(raw), OptOutNotice) is is_amazon_domain(domain)


def _corpus_dir() -> Path:
    for base in (Path(__file__).resolve().parents[2], Path("/work")):
        candidate = base.joinpath(*CORPUS_NAMES)
        if candidate.is_dir():
            return candidate
    pytest.fail("bounce corpus not found: expected ../shared/corpus/bounces next to the clone")


def _looks_like_mail(raw: bytes) -> bool:
    lines = raw.lstrip(b"\r\n").splitlines()
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]
    return bool(lines) and b":" in lines[0] and not lines[0][:1].isspace()


def test_no_message_in_the_bounce_corpus_is_an_optout() -> None:
    """None of the ~1,100 real bounces, DSNs, ARF reports and auto-replies is an opt-out."""
    files = [p for p in _corpus_dir().rglob("*") if p.is_file() and p.name not in NOT_MAIL]
    mails = [p for p in files if _looks_like_mail(p.read_bytes())]
    assert len(mails) >= 1000
    wrong = [str(p) for p in mails if isinstance(detect(p.read_bytes()), OptOutNotice)]
    assert wrong == []


def _check_invariants(finding: object) -> None:
    assert isinstance(finding, OptOutNotice | AmazonNotice | BuyerMessage | Other)
    if isinstance(finding, OptOutNotice):
        assert finding.order_ids
        assert all(ORDER_ID_RE.fullmatch(order) for order in finding.order_ids)
    if isinstance(finding, BuyerMessage):
        assert parse_buyer_address(finding.buyer_address) is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    """Any bytes at all give a finding, never an exception."""
    _check_invariants(detect(raw))


def test_never_raises_on_non_bytes_or_deep_nesting() -> None:
    """A str, None, or MIME nested thousands deep is Other, not an exception."""
    deep = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(3000)
    )
    assert detect("text") == Other("", "not-bytes")  # type: ignore[arg-type]
    assert detect(None) == Other("", "not-bytes")  # type: ignore[arg-type]
    assert isinstance(detect(b"From: a@amazon.com\n" + deep), Other)


FROMS = st.sampled_from([
    "Amazon <donotreply@amazon.com>", "k7m2p9x4t1v8c3q@marketplace.amazon.com",
    "MAILER-DAEMON@amazonses.com", "=?utf-8?b?w6k=?= <a@b.example>", "<>", "@@", "\udcff",
])  # fmt: skip
CTYPES = st.sampled_from([
    "text/plain", "text/html", "message/rfc822", "message/delivery-status",
    "message/feedback-report", "text/rfc822-headers", "application/octet-stream", "bogus",
])  # fmt: skip
CHARSETS = st.sampled_from([
    "utf-8", "iso-2022-jp", "shift_jis", "x-unknown", "punycode", "zlib", "utf-16", "idna", "",
])  # fmt: skip
ENCODINGS = st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "bogus"])
SNIPPETS = st.sampled_from([
    NOTICE_BODY, b"<pre style='white-space: -o-pre-wrap'>x", b"<!--", b"<script>", b"&#xffffff;",
    b"---------- Forwarded message ---------\nFrom: a <donotreply@amazon.com>\n\n",
    b"------------- Begin message -------------\n", b"\x1b$B", b"=?", b"113-4829371-5562918",
])  # fmt: skip
BODIES = st.lists(st.one_of(SNIPPETS, st.binary(max_size=200)), max_size=4).map(b"".join)


def _leaf(ctype: str, charset: str, cte: str, body: bytes) -> bytes:
    head = f"Content-Type: {ctype}; charset={charset}\nContent-Transfer-Encoding: {cte}\n\n"
    return head.encode() + body


LEAVES = st.builds(_leaf, CTYPES, CHARSETS, ENCODINGS, BODIES)


def _multipart(parts: list[bytes]) -> bytes:
    out = b'Content-Type: multipart/mixed; boundary="zz"\n\n'
    return out + b"".join(b"--zz\n" + p + b"\n" for p in parts) + b"--zz--\n"


MIME = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=3).map(_multipart), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FROMS, FROMS, st.binary(max_size=40), MIME)
def test_never_raises_on_random_mime(sender: str, reply_to: str, junk: bytes, mime: bytes) -> None:
    """Random MIME trees with hostile charsets, encodings, headers and HTML never raise."""
    head = f"From: {sender}\nReply-To: {reply_to}\nSubject: ".encode("utf-8", "surrogateescape")
    raw = head + junk.replace(b"\n", b" ") + b"\nMessage-ID: <r@x>\nMIME-Version: 1.0\n" + mime
    _check_invariants(detect(raw))
