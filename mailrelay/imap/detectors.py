"""What a fetched message is: one small detector per format, in one explicit ordered registry.

Modelled on flufl.bounce's ``_scan._DETECTORS`` (style.md, example 3): ``DETECTORS`` lists the
detectors most authoritative first and the first one that returns a finding wins. Detectors that
only rule things out (reports, Amazon's copies, guideline blocks, restrictions) run before the
opt-out ones, so a message that fits both is never taken for an opt-out: a wrong opt-out silences
a buyer, a missed one only costs one more bounce (corpus/README.md, "The one rule").

An opt-out needs three things at once (amazon.md sections 0.5 and 3): a sender on an Amazon-owned
domain (the fetched message's own From, or for a forward the forwarded original's From), both
halves of the notice's first sentence in one language ("we could not deliver your message" and
"because the buyer opted out of unsolicited messages"), and an order id near them.

Detectors see a :class:`Mail`, parsed once by :mod:`mailrelay.imap.detect_mime`; no I/O.
Patterns match *folded* text (:func:`fold`): NFKC, case-folded, Latin accents stripped, typographic
quotes made plain and whitespace collapsed, so patterns are written in lower-case ASCII ("kaufer",
"sollicites") and survive line wrapping, quoted-printable and HTML.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice
from typing import Protocol

from mailrelay.policy.addresses import BuyerAddress, parse_buyer_address
from mailrelay.policy.identifiers import find_comm_tokens, find_order_ids

# -- findings -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptOutNotice:
    """Amazon could not deliver a seller's message because the buyer opted out."""

    message_id: str  # Message-ID of the fetched message (the forward, when forwarded)
    order_ids: tuple[str, ...]  # the order(s) the notice names; never empty
    buyer_key: str | None  # a buyer alias named in the notice, if exactly one (rare)
    language: str  # "en", "fr", "ja", "de", "es", "it"
    detector: str  # e.g. "optout-en", "optout-en/attached", "optout-fr/inline"


class NoticeKind(StrEnum):
    """Amazon notices that are never opt-outs (amazon.md section 3.6)."""

    GUIDELINE_BLOCK = "guideline-block"
    ACCOUNT_RESTRICTED = "account-restricted"
    UNAUTHORIZED_SENDER = "unauthorized-sender"
    COPY_OF_SENT_MESSAGE = "copy-of-sent-message"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class AmazonNotice:
    """Mail from Amazon (or about Amazon relaying) that must not change any buyer's state."""

    message_id: str
    kind: str  # a NoticeKind value
    order_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BuyerMessage:
    """A buyer wrote to the seller through Amazon's relay."""

    message_id: str
    buyer_key: str  # local@domain without +case: the block-list key
    buyer_address: str  # the addr-spec as seen, with any +case suffix: where a reply must go
    order_id: str | None
    token: str | None  # the [commMgrTok:...] value, which a reply should quote back
    subject: str
    text: str  # the buyer's own words, without Amazon's header and footer
    marketplace: str  # two-letter code from the alias domain, e.g. "US"


@dataclass(frozen=True, slots=True)
class Other:
    """Anything else, including input that could not be parsed at all."""

    message_id: str
    reason: str


Finding = OptOutNotice | AmazonNotice | BuyerMessage | Other

# -- the parsed message, as detectors see it ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Part:
    """One message's sender and words: the fetched message itself or an original it forwards."""

    via: str  # "direct", "attached" (message/rfc822) or "inline" (pasted by a mail client)
    sender: str  # the From addr-spec as written, "" when absent or not exactly one
    subject: str
    text: str  # the plain-text body, else the HTML body rendered as text
    folded: str  # fold(text)


@dataclass(frozen=True, slots=True)
class Mail:
    """A fetched message, parsed once."""

    message_id: str
    reply_to: tuple[str, ...]
    notification_type: str  # X-Space-Notification-Type, upper case, "" when absent
    report_type: str  # "delivery-status", "feedback-report" or "" (not a report)
    report_text: str  # delivery-status fields and returned headers of a report
    automatic: bool  # a bounce or auto-reply: its attachments are not forwards by a person
    html_pre: str  # text of Amazon's <pre style="...-o-pre-wrap..."> block, "" when none
    parts: tuple[Part, ...]  # parts[0] is the message itself, then the originals it forwards

    @property
    def own(self) -> Part:
        """The fetched message itself."""
        return self.parts[0]


class Detector(Protocol):
    """One format: returns a finding, or None to let the next detector try."""

    @property
    def name(self) -> str: ...  # read-only, so frozen dataclasses satisfy it

    def __call__(self, mail: Mail) -> Finding | None: ...


# -- text folding and senders -------------------------------------------------------------------

FOLD_LIMIT = 256 * 1024  # characters folded per part; Amazon notices are a few KB
_INVISIBLE = re.compile("[\u00ad\u200b-\u200d\u2060\ufeff]")
_MARKS = re.compile("[\u0300-\u036f]")  # Latin combining accents only: keeps Japanese dakuten
_SPACE = re.compile(r"\s+")
_PUNCT = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u00b4": "'", "`": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    }
)  # fmt: skip


def fold(text: str) -> str:
    """Fold ``text`` for matching: see the module docstring."""
    text = unicodedata.normalize("NFKC", _INVISIBLE.sub("", text[:FOLD_LIMIT])).casefold()
    text = unicodedata.normalize("NFC", _MARKS.sub("", unicodedata.normalize("NFD", text)))
    return _SPACE.sub(" ", text.translate(_PUNCT))


#: Retail TLDs of Amazon's marketplaces (addresses.MARKETPLACE_DOMAINS plus cn, co.za, com.ng).
AMAZON_TLDS = frozenset(
    {
        "com", "ca", "com.mx", "com.br", "co.uk", "de", "fr", "it", "es", "nl", "se", "pl",
        "com.be", "ie", "com.tr", "ae", "sa", "eg", "in", "co.jp", "com.au", "sg", "cn", "co.za",
        "com.ng",
    }
)  # fmt: skip
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)


def is_amazon_domain(domain: str) -> bool:
    """True for ``amazon.<tld>`` and its subdomains, except buyer relays (``marketplace.``).

    Look-alikes are not Amazon: ``amazon.com.evil.example``, ``amazon-sellers.com``,
    ``amazonses.com`` (SES infrastructure, not marketplace mail).
    """
    labels = domain.strip().lower().rstrip(".").split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return False
    for index, label in enumerate(labels):
        if label == "amazon" and ".".join(labels[index + 1 :]) in AMAZON_TLDS:
            return "marketplace" not in labels[:index]
    return False


def is_amazon_sender(address: str) -> bool:
    """True when the addr-spec ``address`` is on an Amazon-owned domain."""
    local, at, domain = address.rpartition("@")
    return bool(local and at) and is_amazon_domain(domain)


def buyer_of(mail: Mail) -> tuple[str, BuyerAddress] | None:
    """The buyer alias in From, else in Reply-To: the address as written and its parse."""
    for address in (mail.own.sender, *mail.reply_to):
        parsed = parse_buyer_address(address) if address else None
        if parsed is not None:
            return address, parsed
    return None


def notice_sources(mail: Mail) -> Iterator[Part]:
    """The parts that speak for Amazon: the message if Amazon sent it, then forwarded originals.

    None when a buyer alias is in From or Reply-To: the words are the buyer's, whatever domain
    relayed them, and a buyer could paste a fake notice to silence other buyers. Forwarded
    originals count only when a person (or a mail rule) forwarded them, not inside a bounce or
    an auto-reply.
    """
    if buyer_of(mail) is not None:
        return
    if is_amazon_sender(mail.own.sender):
        yield mail.own
    if not mail.automatic:
        yield from (part for part in mail.parts[1:] if is_amazon_sender(part.sender))


def orders_in(part: Part) -> tuple[str, ...]:
    """Every order id in a part's subject and text, subject first."""
    return tuple(dict.fromkeys(find_order_ids(fold(part.subject)) + find_order_ids(part.folded)))


_ALIAS_DOMAIN = re.compile(
    r"@marketplace\.amazon\.(?:[a-z]{2,3}\.)?[a-z]{2,3}(?!\.?[a-z0-9-])", re.I
)
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-")


def buyer_keys_in(text: str) -> tuple[str, ...]:
    """Keys of the (first 20) buyer aliases written in ``text``.

    Finds the domain first and walks back over the local part, which stays linear on hostile
    text where a regex for the whole address would retry at every character.
    """
    keys: dict[str, None] = {}
    for match in islice(_ALIAS_DOMAIN.finditer(text), 20):
        begin, floor = match.start(), max(0, match.start() - 100)
        while begin > floor and text[begin - 1] in _LOCAL_CHARS:
            begin -= 1
        buyer = parse_buyer_address(text[begin : match.end()])
        if buyer is not None:
            keys[buyer.key] = None
    return tuple(keys)


def _label(name: str, part: Part) -> str:
    return name if part.via == "direct" else f"{name}/{part.via}"


# -- detectors ----------------------------------------------------------------------------------

_DSN_UNAUTHORIZED = re.compile(
    r"\bnot (?:authori[sz]ed|approved|permitted|allowed) to send\b"
    r"|\bunauthori[sz]ed sender\b|\bsender (?:address )?(?:is )?not (?:authori[sz]ed|approved)\b"
)


@dataclass(frozen=True, slots=True)
class ReportDetector:
    """DSNs and ARF reports are machine reports, never opt-outs, whatever they quote.

    The one Amazon-related DSN is the seller's own MTA reporting that Amazon refused a sender
    address for a buyer alias (sample 09): that is an unauthorized-sender notice.
    """

    name: str = "report"

    def __call__(self, mail: Mail) -> Finding | None:
        if not mail.report_type:
            return None
        if mail.report_type == "delivery-status":
            evidence = f"{mail.report_text}\n{mail.own.text}"
            if buyer_keys_in(evidence) and _DSN_UNAUTHORIZED.search(fold(evidence)):
                orders = find_order_ids(fold(f"{mail.own.subject}\n{evidence}"))
                return AmazonNotice(mail.message_id, NoticeKind.UNAUTHORIZED_SENDER, tuple(orders))
        return Other(mail.message_id, mail.report_type)


@dataclass(frozen=True, slots=True)
class NoticeDetector:
    """An Amazon notice recognised by one phrase of its text."""

    name: str
    kind: NoticeKind
    pattern: re.Pattern[str]

    def __call__(self, mail: Mail) -> Finding | None:
        for part in notice_sources(mail):
            if self.pattern.search(part.folded):
                return AmazonNotice(mail.message_id, self.kind, orders_in(part))
        return None


CONFIRMATION_TYPE = "BBC_MESSAGE_CONFIRMATION_TO_MERCHANT"


@dataclass(frozen=True, slots=True)
class CopyDetector:
    """Amazon's copy of a message the seller sent: quotes seller text, so it goes first."""

    name: str = "copy-of-sent-message"

    def __call__(self, mail: Mail) -> Finding | None:
        relayed = is_amazon_sender(mail.own.sender) or buyer_of(mail) is not None
        if mail.notification_type == CONFIRMATION_TYPE and relayed:
            kind = NoticeKind.COPY_OF_SENT_MESSAGE
            return AmazonNotice(mail.message_id, kind, orders_in(mail.own))
        return _COPY_TEXT(mail)


_COPY_TEXT = NoticeDetector(
    "copy-of-sent-message",
    NoticeKind.COPY_OF_SENT_MESSAGE,
    re.compile(r"\bhere is a copy of the e-?mail (?:that )?you sent\b"),
)


@dataclass(frozen=True, slots=True)
class OptOutDetector:
    """One language of the opt-out notice: both halves of its first sentence plus an order id."""

    name: str
    language: str
    failure: re.Pattern[str]  # "we could not deliver the message you sent for order ..."
    reason: re.Pattern[str]  # "... because the buyer opted out of unsolicited messages"

    def __call__(self, mail: Mail) -> Finding | None:
        for part in notice_sources(mail):
            hit = self.failure.search(part.folded)
            if hit is None or self.reason.search(part.folded) is None:
                continue
            near = part.folded[max(0, hit.start() - 300) : hit.end() + 400]
            orders = find_order_ids(near) or find_order_ids(fold(part.subject))
            if orders:
                keys = buyer_keys_in(part.text)
                key = keys[0] if len(keys) == 1 else None
                label = _label(self.name, part)
                return OptOutNotice(mail.message_id, tuple(orders), key, self.language, label)
        return None


# Amazon's markers around the buyer's words (amazon.md section 4.2). EN/ES/PT are verified; the
# FR/DE/IT ones are guesses [I] that cost nothing when absent.
_START = re.compile(
    r"^[ \t]*-{3,}[ \t]*(?:begin message|message:|mensaje:|iniciar mensaje|mensagem:"
    r"|iniciar mensagem|d[ée]but du message|nachricht:|messaggio:|inizio messaggio)"
    r"[ \t]*-{3,}[ \t]*$",
    re.I | re.M,
)
_END = re.compile(
    r"^[ \t]*-{3,}[ \t]*(?:end message|end of message|finalizar mensaje|fin del mensaje"
    r"|encerrar mensagem|mensagem final|fim da mensagem|fin du message|ende der nachricht"
    r"|nachricht beenden|fine messaggio|fine del messaggio)[ \t]*-{3,}[ \t]*$",
    re.I | re.M,
)


def buyer_words(mail: Mail) -> tuple[str, str]:
    """The buyer's own words and the text around them (Amazon's header and footer).

    Markers in the text come first, then the HTML ``<pre>`` block; with neither, the whole
    body is the buyer's (a bare reply) and nothing is around it.
    """
    text = mail.own.text.replace("\r\n", "\n")
    start = _START.search(text)
    end = _END.search(text, start.end()) if start else None
    if start and end:
        return text[start.end() : end.start()].strip(), text[: start.start()] + text[end.end() :]
    if mail.html_pre.strip():
        return mail.html_pre.strip(), text.replace(mail.html_pre.strip(), " ")
    return text.strip(), ""


@dataclass(frozen=True, slots=True)
class BuyerDetector:
    """From (or Reply-To) is a buyer alias: the buyer wrote, through Amazon's relay."""

    name: str = "buyer-message"

    def __call__(self, mail: Mail) -> Finding | None:
        found = buyer_of(mail)
        if found is None:
            return None
        address, buyer = found
        words, around = buyer_words(mail)
        orders = find_order_ids(fold(mail.own.subject)) or find_order_ids(fold(around))
        tokens = find_comm_tokens(around) or find_comm_tokens(mail.own.text)  # Amazon's first
        return BuyerMessage(
            message_id=mail.message_id,
            buyer_key=buyer.key,
            buyer_address=address,
            order_id=orders[0] if orders else None,
            token=tokens[0] if tokens else None,
            subject=mail.own.subject,
            text=words,
            marketplace=buyer.marketplace,
        )


@dataclass(frozen=True, slots=True)
class AmazonFallback:
    """Anything else Amazon sent (returns, refunds, claims...): a notice of kind "other"."""

    name: str = "amazon-other"

    def __call__(self, mail: Mail) -> Finding | None:
        for part in notice_sources(mail):
            return AmazonNotice(mail.message_id, NoticeKind.OTHER, orders_in(part))
        return None
