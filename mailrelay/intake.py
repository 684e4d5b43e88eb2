"""From an accepted SMTP envelope to what gets queued: the policy applied per recipient.

The decisions themselves are pure (``policy/``); this module gathers what they need from the
store (blocklist, opted-out orders, the buyers' stored messages), then groups recipients by the
body they get: unchanged, thread-tagged, quarantined, or none (rejected or discarded). Mail with
no buyer among its recipients takes a fast path that parses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mailrelay.config import Policy
from mailrelay.policy.addresses import BuyerAddress, parse_buyer_address
from mailrelay.policy.classify import BuyerMessageRef, Verdict, classify
from mailrelay.policy.decide import Action, Decision, decide, reject_reply
from mailrelay.policy.message import MessageView, view_message
from mailrelay.policy.rules import BUILTIN_RULES, Rule, compile_rule
from mailrelay.policy.thread import tag_reply
from mailrelay.smtp.headers import header_values, remove_headers
from mailrelay.store import Store
from mailrelay.store.records import (
    AuditRecord,
    BuyerMessageRecord,
    MessageState,
    NewRecipient,
    RelayedRecord,
)

CLASSES = ("critical", "non-critical")


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes  # CRLF line endings, no Received: yet
    mail_options: tuple[str, ...] = ()
    trusted: bool = False  # authenticated, or from an allowed network
    auth_user: str | None = None
    peer: str | None = None


@dataclass(frozen=True)
class Variant:
    """One body and the recipients that get it."""

    raw: bytes
    recipients: tuple[NewRecipient, ...]


@dataclass
class IntakePlan:
    variants: list[Variant] = field(default_factory=list)
    audits: list[AuditRecord] = field(default_factory=list)
    relayed: list[RelayedRecord] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    reject: str | None = None  # an SMTP reply when the whole message is refused
    message_id: str | None = None

    def bind_queue_id(self, index: int, queue_id: str) -> None:
        """Name the queue id of variant ``index`` in the audit and relayed records it concerns."""
        recipients = self.variants[index].recipients
        rcpts = {r.rcpt for r in recipients}
        keys = {r.buyer_key for r in recipients if r.buyer_key}
        self.audits = [replace(a, queue_id=queue_id) if a.recipient in rcpts else a
                       for a in self.audits]
        self.relayed = [replace(r, queue_id=queue_id) if r.buyer_key in keys else r
                        for r in self.relayed]


def compile_rules(policy: Policy) -> tuple[Rule, ...]:
    """Config rules first (they override), then the built-in ones."""
    custom = tuple(
        compile_rule(r.name, r.class_, subject=r.subject, body=r.body, header=r.header or None)
        for r in policy.rules
    )
    return custom + tuple(BUILTIN_RULES)


def to_ref(record: BuyerMessageRecord) -> BuyerMessageRef:
    return BuyerMessageRef(
        message_id=record.message_id, buyer_key=record.buyer_key, order_id=record.order_id,
        token=record.token, subject=record.subject, text=record.text, received=record.received,
    )


class Intake:
    """Applies the policy to each accepted message; holds the compiled rules (reloadable)."""

    def __init__(self, store: Store, policy: Policy) -> None:
        self.store = store
        self.reload(policy)

    def reload(self, policy: Policy) -> None:
        self.policy = policy
        self.rules = compile_rules(policy)
        self.extra_domains = frozenset(policy.buyer_domains)
        self.internal_headers = frozenset({policy.class_header.lower()})

    async def plan(self, envelope: Envelope, now: float) -> IntakePlan:
        """What to queue (and audit) for ``envelope``; reads the store, writes nothing."""
        raw = remove_headers(envelope.raw, self.internal_headers)
        buyers = {r: parse_buyer_address(r, self.extra_domains) for r in envelope.rcpt_tos}
        message_ids = header_values(envelope.raw, "message-id")
        plan = IntakePlan(message_id=message_ids[0] if message_ids else None)
        if not any(buyers.values()):
            plan.variants.append(Variant(raw, tuple(NewRecipient(r) for r in envelope.rcpt_tos)))
            return plan
        view = await asyncio.to_thread(view_message, envelope.raw)
        opted_orders = await self.store.optout.opted_out_orders(view.order_ids)
        decided = await self._decide(envelope, buyers, view, opted_orders)
        unchanged: list[NewRecipient] = []
        tagged: dict[str, tuple[BuyerMessageRef, list[NewRecipient]]] = {}
        held: list[NewRecipient] = []
        for rcpt in envelope.rcpt_tos:
            if rcpt not in decided:
                unchanged.append(NewRecipient(rcpt))
                continue
            decision, verdict = decided[rcpt]
            plan.decisions.append(decision)
            plan.audits.append(self._audit(decision, verdict, opted_orders, plan, now))
            recipient = NewRecipient(rcpt, buyer_key=decision.buyer_key, cls=verdict.cls)
            self._route(decision, verdict, recipient, unchanged, tagged, held)
            if decision.action in (Action.DELIVER, Action.TAG_AND_DELIVER):
                plan.relayed.append(RelayedRecord(
                    recipient.buyer_key or "", view.order_ids[0] if view.order_ids else None,
                    plan.message_id, now))
        self._assemble(plan, raw, unchanged, tagged, held)
        plan.reject = reject_reply(plan.decisions) if not plan.variants else None
        return plan

    async def _decide(self, envelope: Envelope, buyers: dict[str, BuyerAddress | None],
                      view: MessageView, opted_orders: set[str],
                      ) -> dict[str, tuple[Decision, Verdict]]:
        """The decision and verdict for every buyer recipient, keyed by recipient."""
        keys = {b.key for b in buyers.values() if b}
        blocked = await self.store.optout.blocked(keys)
        records = await self.store.optout.buyer_messages(keys)
        records += await self.store.optout.buyer_messages_by_id(
            [*view.references, *([view.in_reply_to] if view.in_reply_to else [])])
        override = self._override(view, envelope.trusted)
        decided: dict[str, tuple[Decision, Verdict]] = {}
        for rcpt, buyer in buyers.items():
            if buyer is None:
                continue
            refs = [to_ref(r) for r in records if r.buyer_key == buyer.key]
            verdict = classify(view, refs, self.rules, self.policy.default_class, override,
                               self.policy.class_header)
            opted_out = buyer.key in blocked or bool(opted_orders)
            decided[rcpt] = decide(rcpt, buyer.key, opted_out, verdict, self.policy.mode,
                                   self.policy.on_drop), verdict
        everyone = len(decided) == len(envelope.rcpt_tos) and all(
            d.would_action is Action.REJECT for d, _ in decided.values())
        if not everyone:
            decided = {r: (_reject_as_discard(d), v) for r, (d, v) in decided.items()}
        return decided

    def _override(self, view: MessageView, trusted: bool) -> str | None:
        if not trusted:
            return None
        for name, value in view.headers:
            if name.lower() == self.policy.class_header.lower():
                candidate = value.strip().lower()
                return candidate if candidate in CLASSES else None
        return None

    @staticmethod
    def _route(decision: Decision, verdict: Verdict, recipient: NewRecipient,
               unchanged: list[NewRecipient],
               tagged: dict[str, tuple[BuyerMessageRef, list[NewRecipient]]],
               held: list[NewRecipient]) -> None:
        if decision.action == Action.TAG_AND_DELIVER and verdict.thread_ref is not None:
            ref = verdict.thread_ref
            tagged.setdefault(ref.message_id, (ref, []))[1].append(recipient)
        elif decision.action in (Action.DELIVER, Action.TAG_AND_DELIVER):
            unchanged.append(recipient)
        elif decision.action == Action.QUARANTINE:
            held.append(NewRecipient(recipient.rcpt, MessageState.QUARANTINED,
                                     recipient.buyer_key, recipient.cls))

    def _assemble(self, plan: IntakePlan, raw: bytes, unchanged: Sequence[NewRecipient],
                  tagged: dict[str, tuple[BuyerMessageRef, list[NewRecipient]]],
                  held: Sequence[NewRecipient]) -> None:
        if unchanged:
            plan.variants.append(Variant(raw, tuple(unchanged)))
        threading = self.policy.threading
        for ref, recipients in tagged.values():
            body = tag_reply(raw, ref, add_token=threading.add_token,
                             quote_original=threading.quote_original)
            plan.variants.append(Variant(body, tuple(recipients)))
        if held:
            plan.variants.append(Variant(raw, tuple(held)))

    def _audit(self, decision: Decision, verdict: Verdict, opted_orders: set[str],
               plan: IntakePlan, now: float) -> AuditRecord:
        notes = [decision.reason]
        if opted_orders:
            notes.append(f"names opted-out order {', '.join(sorted(opted_orders))}")
        if verdict.important_tag_seen:
            notes.append("[Important]-style subject tag seen (it overrides nothing)")
        return AuditRecord(
            action=str(decision.action), at=now, message_id=plan.message_id,
            recipient=decision.recipient, buyer_key=decision.buyer_key, cls=verdict.cls,
            rule=verdict.rule, mode=self.policy.mode, reason="; ".join(n for n in notes if n),
        )


_NOT_ALONE = "the message also goes to other recipients, and a 550 would refuse it for them too"


def _reject_as_discard(decision: Decision) -> Decision:
    """A reject when not every recipient is rejected: one SMTP reply covers the whole DATA, so
    the message is accepted for the others and dropped for this one, i.e. discarded. Saying so
    keeps the audit log and ``mailrelay classify`` true to what happens."""
    if decision.would_action is not Action.REJECT:
        return decision
    if decision.action is Action.REJECT:
        return replace(decision, action=Action.DISCARD, would_action=Action.DISCARD,
                       reason=f"{decision.reason}; discarded, not rejected: {_NOT_ALONE}")
    return replace(decision, would_action=Action.DISCARD,
                   reason=f"{decision.reason}; enforce would discard, not reject: {_NOT_ALONE}")
