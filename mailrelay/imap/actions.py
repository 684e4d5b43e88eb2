"""Apply one detected message to the store: what the poller does with a finding, without IMAP.

Kept apart from the poller so the rules "a notice blocks its order's buyers, a buyer message is
kept for threading, everything else changes nothing" can be read (and tested) without a server.
Every store call here is idempotent (an order noticed twice, a buyer blocked twice, a buyer message
stored twice are no-ops apart from a ``last_seen`` time), which is what lets the poller redo a
batch after a lost connection.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from mailrelay.imap.detect import AmazonNotice, BuyerMessage, Finding, OptOutNotice
from mailrelay.store import Store
from mailrelay.store.records import BlockResult, BuyerMessageRecord

Kind = Literal["optout", "buyer", "amazon", "other"]


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What applying one finding changed."""

    kind: Kind
    blocked: tuple[str, ...] = ()  # buyers blocked now that were not blocked before
    already_blocked: tuple[str, ...] = ()  # buyers the notice resolved to, blocked before
    unresolved: tuple[str, ...] = ()  # opted-out orders kept until their buyer is known
    cancelled: int = 0  # queued non-critical recipients cancelled by the blocks
    recorded: bool = False  # a buyer message stored for the first time


def kind_of(finding: Finding) -> Kind:
    """The short name a finding is logged and marked handled under."""
    if isinstance(finding, OptOutNotice):
        return "optout"
    if isinstance(finding, BuyerMessage):
        return "buyer"
    return "amazon" if isinstance(finding, AmazonNotice) else "other"


def message_key(finding: Finding, raw: bytes) -> str:
    """The id a message is handled once under: its Message-ID, else a hash of its bytes.

    Message-IDs survive a UIDVALIDITY change (UIDs do not), so a rescanned mailbox is recognised.
    """
    if finding.message_id:
        return finding.message_id
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _tally(kind: Kind, results: list[BlockResult], unresolved: tuple[str, ...] = (),
           recorded: bool = False) -> ActionResult:
    return ActionResult(
        kind=kind,
        blocked=tuple(r.buyer_key for r in results if r.new),
        already_blocked=tuple(r.buyer_key for r in results if not r.new),
        unresolved=unresolved,
        cancelled=sum(len(r.cancelled) for r in results),
        recorded=recorded,
    )


async def apply_finding(store: Store, finding: Finding, key: str, now: float) -> ActionResult:
    """Record ``finding`` (of the message handled under ``key``) in ``store``.

    An opt-out notice blocks the buyer(s) each of its orders resolves to and cancels their queued
    non-critical mail, or keeps the order as unresolved until its buyer becomes known. A buyer
    message is stored for threading and may resolve such an order. Amazon's other notices and
    anything else change nothing: a wrong opt-out would silence a buyer.
    """
    if isinstance(finding, OptOutNotice):
        results: list[BlockResult] = []
        unresolved: list[str] = []
        for order_id in dict.fromkeys(finding.order_ids):
            found = await store.optout.apply_notice(
                order_id, finding.message_id or key, finding.buyer_key, now
            )
            results.extend(found)
            if not found:
                unresolved.append(order_id)
        return _tally("optout", results, unresolved=tuple(unresolved))
    if isinstance(finding, BuyerMessage):
        record = BuyerMessageRecord(
            message_id=finding.message_id or key,
            buyer_key=finding.buyer_key,
            buyer_address=finding.buyer_address,
            order_id=finding.order_id,
            token=finding.token,
            subject=finding.subject,
            text=finding.text,
            received=now,
        )
        new, block = await store.optout.record_buyer_message(record)
        return _tally("buyer", [block] if block else [], recorded=new)
    return ActionResult(kind_of(finding))
