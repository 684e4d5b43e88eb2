"""Plain records that cross the store boundary; nothing outside ``store/`` sees SQL rows."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class MessageState(enum.StrEnum):
    """Where a queued message (or one of its recipients) stands."""

    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    QUARANTINED = "quarantined"
    DROPPED = "dropped"


PENDING_STATES = (MessageState.QUEUED, MessageState.DEFERRED)
FINAL_STATES = (MessageState.SENT, MessageState.FAILED, MessageState.CANCELLED,
                MessageState.DROPPED)


@dataclass(frozen=True, slots=True)
class NewRecipient:
    rcpt: str
    state: MessageState = MessageState.QUEUED
    buyer_key: str | None = None
    cls: str | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to commit to the queue (one per distinct body of one SMTP transaction)."""

    mail_from: str
    raw: bytes
    recipients: tuple[NewRecipient, ...]
    mail_options: tuple[str, ...] = ()
    message_id: str | None = None
    auth_user: str | None = None
    peer: str | None = None
    queue_id: str | None = None  # chosen by the caller when it must know it before the commit


@dataclass(frozen=True, slots=True)
class AuditRecord:
    action: str
    at: float = 0.0
    queue_id: str | None = None
    message_id: str | None = None
    recipient: str | None = None
    buyer_key: str | None = None
    cls: str | None = None
    rule: str | None = None
    mode: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RelayedRecord:
    """A message relayed (or about to be) to a buyer: ties an order id to a buyer."""

    buyer_key: str
    order_id: str | None
    message_id: str | None
    at: float = 0.0
    queue_id: str | None = None


@dataclass(frozen=True, slots=True)
class BuyerMessageRecord:
    message_id: str
    buyer_key: str
    buyer_address: str
    order_id: str | None
    token: str | None
    subject: str
    text: str
    received: float


@dataclass(frozen=True, slots=True)
class RecipientRow:
    rcpt: str
    state: str
    buyer_key: str | None
    cls: str | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: str
    mail_from: str
    mail_options: tuple[str, ...]
    message_id: str | None
    size: int
    state: str
    attempts: int
    created: float
    next_attempt: float
    last_error: str | None
    auth_user: str | None
    recipients: tuple[RecipientRow, ...] = field(default_factory=tuple)
    raw: bytes | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one delivery attempt for one recipient."""

    rcpt: str
    outcome: str  # sent | deferred | failed
    error: str = ""


@dataclass(frozen=True, slots=True)
class BlockEntry:
    buyer_key: str
    marketplace: str
    source: str
    reason: str
    evidence: str
    first_seen: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class BlockResult:
    """What blocking a buyer did: whether it was new and which queued mail it cancelled."""

    buyer_key: str
    new: bool
    cancelled: tuple[tuple[str, str], ...] = ()  # (queue id, recipient)
