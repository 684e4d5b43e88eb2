"""Tell what an IMAP-fetched message is: ``detect(raw) -> Finding``. Pure: no I/O, no clock.

The message is parsed once (:func:`~mailrelay.imap.detect_mime.parse_mail`, stdlib parser with
``policy=compat32``); then the detectors in :data:`DETECTORS` run in order and the first finding
wins. ``detect`` never raises: input that cannot be parsed, or a detector that fails, gives
:class:`Other`, which changes nothing (a wrong opt-out would silence a buyer).

``Other.reason`` is one of "unrecognised", "delivery-status" (a DSN), "feedback-report" (ARF),
"not-bytes", "unparseable: <exception>" or "detector-failed: <name>: <exception>".
"""

from __future__ import annotations

import re

from mailrelay.imap.detect_mime import parse_mail
from mailrelay.imap.detectors import (
    AmazonFallback,
    AmazonNotice,
    BuyerDetector,
    BuyerMessage,
    CopyDetector,
    Detector,
    Finding,
    NoticeDetector,
    NoticeKind,
    OptOutDetector,
    OptOutNotice,
    Other,
    ReportDetector,
)

__all__ = [
    "DETECTORS",
    "AmazonNotice",
    "BuyerMessage",
    "Finding",
    "NoticeKind",
    "OptOutNotice",
    "Other",
    "detect",
    "parse_mail",
]

# -- the registry -------------------------------------------------------------------------------


def _rx(*phrasings: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in phrasings))


#: Most authoritative first; the first finding wins. Patterns match folded text (see fold()).
#: Opt-out phrasings: EN, FR and JA follow Amazon's text as quoted by sellers (amazon.md 3.1-3.3);
#: DE, ES and IT are built from the same sentence, as no verbatim copy exists, and accept the
#: variants shown in the comments. Each opt-out detector needs both patterns plus an order id.
DETECTORS: tuple[Detector, ...] = (
    ReportDetector(),
    CopyDetector(),
    NoticeDetector(
        "guideline-block",
        NoticeKind.GUIDELINE_BLOCK,
        _rx(r"\bdid not meet (?:the )?(?:amazon )?buyer-seller messaging communication guidelines"),
    ),
    NoticeDetector(
        "account-restricted",
        NoticeKind.ACCOUNT_RESTRICTED,
        _rx(r"\baccount (?:was|is|has been) (?:temporarily )?restricted from sending proactive"),
    ),
    NoticeDetector(
        "unauthorized-sender",
        NoticeKind.UNAUTHORIZED_SENDER,
        _rx(
            r"\b(?:not (?:an? )?(?:authori[sz]ed|approved)|unauthori[sz]ed|unapproved)"
            r" (?:sender|e-?mail address|sender address)\b",
            r"\benable the e-?mail address you want to use\b",
        ),
    ),
    # "We were unable to deliver the message you sent for order [X] because the buyer has
    # chosen to opt out of receiving unsolicited messages from sellers." (2017 and later);
    # also "We could not deliver the message you sent to the buyer regarding order X ... the
    # customer has opted out of unsolicited seller messages".
    OptOutDetector(
        "optout-en",
        "en",
        _rx(
            r"\b(?:we were|we are|we're) (?:unable|not able) to deliver (?:the|your) message"
            r" (?:that )?you sent (?:to (?:the|a) (?:buyer|customer) )?"
            r"(?:for|regarding|about|on|concerning) (?:the |your )?order\b",
            r"\bwe (?:could not|couldn't) deliver (?:the|your) message (?:that )?you sent"
            r" (?:to (?:the|a) (?:buyer|customer) )?(?:for|regarding|about|on|concerning)"
            r" (?:the |your )?order\b",
        ),
        _rx(
            r"\b(?:buyer|customer)\b.{0,60}?\bopt(?:ed)?[ -]?out of (?:receiving )?"
            r"(?:unsolicited|non-critical) (?:seller )?messages\b"
        ),
    ),
    # "Nous ne sommes pas parvenus à transmettre votre message au sujet de la commande X, car
    # l'acheteur a choisi de ne pas recevoir de messages non sollicités de la part des vendeurs."
    # Also "Nous n'avons pas pu remettre/livrer/délivrer votre message ...".
    OptOutDetector(
        "optout-fr",
        "fr",
        _rx(
            r"\bnous (?:ne sommes pas parvenus a|n'avons pas pu) (?:transmettre|remettre|livrer"
            r"|delivrer|envoyer|distribuer) (?:le|votre) message\b"
        ),
        _rx(r"\b(?:acheteur|client)\b.{0,80}?\bmessages non (?:sollicites|desires)\b"),
    ),
    # "購入者が出品者からの未承諾広告メールを受信しないように設定しているため、注文 X に関する
    # メッセージを送信できませんでした。"; also 未承諾…を受け取らない / の受信を拒否.
    OptOutDetector(
        "optout-ja",
        "ja",
        _rx(r"メッセージを(?:送信|配信|お届け)(?:することが)?できませんでした"),
        _rx(r"未承諾.{0,20}?(?:受信しない|受け取らない|受信を拒否|受信拒否|受信を希望しない)"),
    ),
    # "Wir konnten die Nachricht, die Sie für die Bestellung X gesendet haben, nicht zustellen,
    # da der Käufer sich entschieden hat, keine unaufgeforderten Nachrichten von Verkäufern zu
    # erhalten."; also "Ihre Nachricht zur Bestellung X konnte nicht zugestellt werden, weil der
    # Käufer den Erhalt unerwünschter Nachrichten von Verkäufern deaktiviert hat."
    OptOutDetector(
        "optout-de",
        "de",
        _rx(
            r"\bwir konnten (?:ihre|die) nachricht\b.{0,160}?\bnicht (?:zustellen|ubermitteln"
            r"|senden|versenden)\b",
            r"\b(?:ihre|die) nachricht\b.{0,160}?\bkonnte nicht (?:zugestellt|ubermittelt"
            r"|gesendet|versendet) werden\b",
        ),
        _rx(
            r"\b(?:kaufer|kunde|kundin)\b.{0,120}?\b(?:unaufgefordert|unerwunscht|unverlangt)\w*"
            r" nachrichten\b"
        ),
    ),
    # "No pudimos entregar el mensaje que enviaste para el pedido X porque el comprador ha
    # elegido no recibir mensajes no solicitados de vendedores."; also "No hemos podido
    # enviar/No se ha podido entregar su mensaje ... dejar de recibir mensajes no deseados".
    OptOutDetector(
        "optout-es",
        "es",
        _rx(
            r"\bno (?:pudimos|hemos podido|se ha podido|se pudo|fue posible|ha sido posible)"
            r" (?:entregar|enviar|transmitir|remitir) (?:el|tu|su) mensaje\b"
        ),
        _rx(r"\b(?:comprador|cliente)\b.{0,100}?\bmensajes no (?:solicitados|deseados)\b"),
    ),
    # "Non siamo riusciti a consegnare il messaggio che hai inviato per l'ordine X perché
    # l'acquirente ha scelto di non ricevere messaggi non richiesti dai venditori."; also "Non è
    # stato possibile recapitare il tuo messaggio ... messaggi indesiderati".
    OptOutDetector(
        "optout-it",
        "it",
        _rx(
            r"\bnon (?:siamo riusciti a|e stato possibile|abbiamo potuto|e possibile)"
            r" (?:consegnare|recapitare|inviare|trasmettere) (?:il tuo |il suo |il )?messaggio\b"
        ),
        _rx(
            r"\b(?:acquirente|cliente)\b.{0,100}?\bmessaggi (?:non richiesti|indesiderati"
            r"|non sollecitati)\b"
        ),
    ),
    BuyerDetector(),
    AmazonFallback(),
)


def detect(raw: bytes) -> Finding:
    """What ``raw`` (one message as fetched over IMAP) is. Never raises: worst case ``Other``."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        return Other("", "not-bytes")
    try:
        mail = parse_mail(bytes(raw))
    except Exception as exc:  # hostile MIME can still break the stdlib parser (deep nesting)
        return Other("", f"unparseable: {type(exc).__name__}")
    for detector in DETECTORS:
        try:
            finding = detector(mail)
        except Exception as exc:  # stop here: a later, weaker detector must not decide instead
            return Other(mail.message_id, f"detector-failed: {detector.name}: {type(exc).__name__}")
        if finding is not None:
            return finding
    return Other(mail.message_id, "unrecognised")
