"""What the relay does with one message for one recipient, given the class and the opt-out.

Pure: the caller looks up the opt-out and classifies; this only applies design.md's decision
table. Decisions are per recipient, so a message to an opted-out buyer and to a colleague still
reaches the colleague. In monitor mode nothing is dropped; ``would_action`` records what enforce
mode would have done, so a roll-out can be judged from the audit log.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from mailrelay.policy.classify import Verdict

MODES = ("enforce", "monitor")
DROP_ACTIONS = ("reject", "discard", "quarantine")
_REPLY_LIMIT = 400  # SMTP reply lines must stay under 512 octets including the code


class Action(enum.StrEnum):
    """What happens to the message for one recipient (``str()`` gives the audit-log word)."""

    DELIVER = "deliver"
    TAG_AND_DELIVER = "tag_and_deliver"  # add thread headers, token and quote, then deliver
    REJECT = "reject"
    DISCARD = "discard"
    QUARANTINE = "quarantine"


@dataclass(frozen=True, slots=True)
class Decision:
    """The relay's decision for one recipient, with enough context for the audit log."""

    recipient: str
    buyer_key: str | None
    action: Action
    cls: str | None
    rule: str | None
    reason: str
    enforced: bool  # False in monitor mode: ``action`` never drops, ``would_action`` might
    would_action: Action


def _deliver_action(verdict: Verdict) -> Action:
    """Deliver; tag first when critical and a buyer thread is known (it keeps it deliverable)."""
    if verdict.cls == "critical" and verdict.thread_ref is not None:
        return Action.TAG_AND_DELIVER
    return Action.DELIVER


def decide(
    recipient: str,
    buyer_key: str | None,
    opted_out: bool,
    verdict: Verdict | None,
    mode: str,
    on_drop: str,
) -> Decision:
    """Apply the decision table. ``verdict`` may be None only for a recipient who is no buyer or
    has not opted out (the caller may skip classifying then); raises ValueError otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'enforce' or 'monitor', not {mode!r}")
    if on_drop not in DROP_ACTIONS:
        raise ValueError(f"on_drop must be one of {', '.join(DROP_ACTIONS)}, not {on_drop!r}")
    enforced = mode == "enforce"

    def decision(action: Action, reason: str, would: Action | None = None) -> Decision:
        cls = verdict.cls if verdict else None
        rule = verdict.rule if verdict else None
        return Decision(recipient, buyer_key, action, cls, rule, reason, enforced, would or action)

    if buyer_key is None:
        return decision(Action.DELIVER, "not a marketplace buyer address")
    if verdict is None:
        if opted_out:
            raise ValueError("a verdict is required for a buyer who opted out")
        return decision(Action.DELIVER, "buyer has not opted out")
    action = _deliver_action(verdict)
    if not opted_out:
        return decision(action, f"buyer has not opted out; {verdict.cls}: {verdict.reason}")
    if verdict.cls == "critical":
        return decision(action, f"buyer opted out, but critical: {verdict.reason}")
    drop = Action(on_drop)
    reason = f"buyer opted out of non-critical messages: {verdict.reason}"
    if enforced:
        return decision(drop, reason)
    return decision(Action.DELIVER, f"monitor mode, would {drop.value}; {reason}", drop)


def _ascii_line(text: str) -> str:
    """One printable ASCII line: SMTP replies carry no raw 8-bit or line breaks."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in " ".join(text.split()))
    return clean if len(clean) <= _REPLY_LIMIT else clean[: _REPLY_LIMIT - 3] + "..."


def reject_reply(decisions: Sequence[Decision]) -> str | None:
    """The ``550 5.7.1`` reply when every recipient is rejected, naming buyers and rules; else None.

    When only some recipients are rejected the message is accepted for the others, and the
    rejected ones are handled like ``discard`` by the caller (one reply covers the whole DATA).
    """
    if not decisions or any(d.action is not Action.REJECT for d in decisions):
        return None
    buyers = ", ".join(dict.fromkeys(d.recipient for d in decisions))
    rules = ", ".join(dict.fromkeys(d.rule or "default" for d in decisions))
    text = (
        f"Not sent: {buyers} opted out of non-critical seller messages and this message is "
        f"non-critical (rule {rules}). Reply on the buyer's own message thread or send only "
        "order-critical content."
    )
    return "550 5.7.1 " + _ascii_line(text)
