"""Decide whether one outgoing message is critical or non-critical for Amazon's opt-out.

Precedence, strongest first (design.md "Decisions the relay makes"):

1. a trusted client's ``X-Mailrelay-Class`` header (validated and stripped by the caller);
2. a reply on the buyer's own thread: Amazon delivers those whatever the opt-out says;
3. the rules, config rules first then the built-ins, first match wins;
4. ``policy.default_class``.

``[Important]`` (and ``[Wichtig]``, ``[重要]``) in the subject is only noted: Amazon removed that
override (amazon.md section 2.3), so it must never make a message critical here either.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mailrelay.policy.message import MessageView, normalize_msgid
from mailrelay.policy.rules import CLASSES, Rule, first_match

OVERRIDE_HEADER = "X-Mailrelay-Class"
IMPORTANT_TAG_RE = re.compile(r"[\[［【]\s*(?:important|wichtig|重要)\s*[\]］】]", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class BuyerMessageRef:
    """A message a buyer sent the seller, as recorded by the poller: what a reply threads onto."""

    message_id: str
    buyer_key: str
    order_id: str | None
    token: str | None  # the [commMgrTok:...] value
    subject: str
    text: str  # the buyer's own question, without Amazon's footer
    received: float  # epoch seconds


@dataclass(frozen=True, slots=True)
class Verdict:
    """The class of a message and why; ``thread_ref`` is the buyer thread it belongs to."""

    cls: str
    rule: str
    reason: str
    important_tag_seen: bool
    thread_ref: BuyerMessageRef | None


def _replied_to(
    view: MessageView, buyer_messages: Sequence[BuyerMessageRef]
) -> tuple[BuyerMessageRef, str] | None:
    """The buyer message ``view`` answers, and how we know: threading headers, then token."""
    by_id = {normalize_msgid(m.message_id): m for m in buyer_messages}
    by_id.pop("", None)
    # In-Reply-To names the parent; References lists ancestors oldest first, so read it backwards.
    for msgid in (view.in_reply_to, *reversed(view.references)):
        found = by_id.get(normalize_msgid(msgid))
        if found is not None:
            return found, f"replies to buyer message {found.message_id}"
    tokens = set(view.comm_tokens)
    quoted = [m for m in buyer_messages if m.token and m.token in tokens]
    if quoted:
        newest = max(quoted, key=lambda m: m.received)
        return newest, f"quotes the buyer's thread token {newest.token}"
    return None


def pick_thread(
    view: MessageView, buyer_messages: Sequence[BuyerMessageRef]
) -> BuyerMessageRef | None:
    """The buyer message to thread ``view`` onto: the one it replies to, else the newest one
    about the same order, else None. ``buyer_messages`` are those of the recipient's buyer."""
    replied = _replied_to(view, buyer_messages)
    return replied[0] if replied is not None else _newest_same_order(view, buyer_messages)


def _newest_same_order(
    view: MessageView, buyer_messages: Sequence[BuyerMessageRef]
) -> BuyerMessageRef | None:
    orders = set(view.order_ids)
    same_order = [m for m in buyer_messages if m.order_id and m.order_id in orders]
    return max(same_order, key=lambda m: m.received) if same_order else None


def _check_class(value: str, what: str) -> None:
    if value not in CLASSES:
        raise ValueError(f"{what} must be 'critical' or 'non-critical', not {value!r}")


def classify(
    view: MessageView,
    buyer_messages: Sequence[BuyerMessageRef],
    rules: Sequence[Rule],
    default_class: str = "non-critical",
    override: str | None = None,
    override_header: str = OVERRIDE_HEADER,
) -> Verdict:
    """Classify ``view`` for one buyer; ``buyer_messages`` are that buyer's recorded messages.

    ``override_header`` names the header ``override`` came from (``policy.class_header``), so
    the rule in the audit log is the header the seller's client really set.
    """
    _check_class(default_class, "default_class")
    if override is not None:
        _check_class(override, "override")
    important = bool(IMPORTANT_TAG_RE.search(view.subject))
    replied = _replied_to(view, buyer_messages)
    thread = replied[0] if replied else _newest_same_order(view, buyer_messages)

    def verdict(cls: str, rule: str, reason: str) -> Verdict:
        return Verdict(cls, rule, reason, important, thread)

    if override is not None:
        reason = f"the sending client marked it {override}"
        return verdict(override, f"header:{override_header}", reason)
    if replied is not None:
        return verdict("critical", "thread:reply", f"reply on the buyer's thread: {replied[1]}")
    hit = first_match(rules, view)
    if hit is not None:
        rule, why = hit
        return verdict(rule.cls, rule.name, f"rule {rule.name} matched {why}")
    return verdict(default_class, "default", f"no rule matched; default class is {default_class}")
