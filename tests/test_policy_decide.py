"""The per-recipient decision table and the SMTP reject reply."""

from __future__ import annotations

import pytest

from mailrelay.policy.classify import BuyerMessageRef, Verdict
from mailrelay.policy.decide import Action, Decision, decide, reject_reply

BUYER = "k7m2p9x4t1v8c3q@marketplace.amazon.com"
REF = BuyerMessageRef("<b1@amazon.example>", BUYER, "113-4829371-5562918", "A3QX7RZ2M9KT5",
                      "Product details inquiry", "Batteries included?", 1.0)
CRIT = Verdict("critical", "builtin:address-problem", "rule matched", False, None)
CRIT_THREAD = Verdict("critical", "thread:reply", "reply on the buyer's thread", False, REF)
NONCRIT = Verdict("non-critical", "builtin:feedback-request", "rule matched", False, None)
NONCRIT_THREAD = Verdict("non-critical", "builtin:feedback-request", "rule matched", False, REF)

D, T, R, X, Q = (Action.DELIVER, Action.TAG_AND_DELIVER, Action.REJECT, Action.DISCARD,
                 Action.QUARANTINE)

# (id, buyer_key, opted_out, verdict, mode, on_drop, action, would_action)
TABLE = [
    ("not-buyer", None, False, None, "enforce", "reject", D, D),
    ("not-buyer-even-if-flagged", None, True, NONCRIT, "enforce", "reject", D, D),
    ("buyer-not-opted-out-unclassified", BUYER, False, None, "enforce", "reject", D, D),
    ("buyer-not-opted-out-noncritical", BUYER, False, NONCRIT_THREAD, "enforce", "reject", D, D),
    ("buyer-not-opted-out-critical-no-thread", BUYER, False, CRIT, "enforce", "reject", D, D),
    ("buyer-not-opted-out-critical-thread", BUYER, False, CRIT_THREAD, "enforce", "reject", T, T),
    ("opted-out-critical-thread", BUYER, True, CRIT_THREAD, "enforce", "reject", T, T),
    ("opted-out-critical-no-thread", BUYER, True, CRIT, "enforce", "discard", D, D),
    ("opted-out-noncritical-reject", BUYER, True, NONCRIT, "enforce", "reject", R, R),
    ("opted-out-noncritical-discard", BUYER, True, NONCRIT, "enforce", "discard", X, X),
    ("opted-out-noncritical-quarantine", BUYER, True, NONCRIT, "enforce", "quarantine", Q, Q),
    ("opted-out-noncritical-thread-not-tagged", BUYER, True, NONCRIT_THREAD, "enforce",
     "discard", X, X),
    ("monitor-reject", BUYER, True, NONCRIT, "monitor", "reject", D, R),
    ("monitor-quarantine", BUYER, True, NONCRIT, "monitor", "quarantine", D, Q),
    ("monitor-critical-still-tagged", BUYER, True, CRIT_THREAD, "monitor", "reject", T, T),
]


COLUMNS = ("buyer_key", "opted_out", "verdict", "mode", "on_drop", "action", "would")


@pytest.mark.parametrize(COLUMNS, [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_decision_table(buyer_key: str | None, opted_out: bool, verdict: Verdict | None,
                        mode: str, on_drop: str, action: Action, would: Action) -> None:
    """Each recipient gets design.md's action; monitor mode only records the drop."""
    decision = decide(f"{buyer_key or 'colleague@seller.example'}", buyer_key, opted_out, verdict,
                      mode, on_drop)
    assert (decision.action, decision.would_action) == (action, would)
    assert decision.enforced is (mode == "enforce")
    assert decision.cls == (verdict.cls if verdict else None)
    assert decision.rule == (verdict.rule if verdict else None)
    assert decision.reason


def test_reasons_say_why() -> None:
    """The reason names the opt-out and the verdict; monitor mode says what it would do."""
    decision = decide(BUYER, BUYER, True, NONCRIT, "monitor", "quarantine")
    assert "would quarantine" in decision.reason and "opted out" in decision.reason
    assert "not a marketplace buyer" in decide("a@b.example", None, False, None, "enforce",
                                               "reject").reason


def test_action_strings_are_audit_words() -> None:
    """str(Action) is the plain word used in the audit log and CLI output."""
    assert [str(a) for a in Action] == ["deliver", "tag_and_deliver", "reject", "discard",
                                        "quarantine"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((BUYER, BUYER, True, NONCRIT, "dry-run", "reject"), "mode"),
        ((BUYER, BUYER, True, NONCRIT, "enforce", "bounce"), "on_drop"),
        ((BUYER, BUYER, True, None, "enforce", "reject"), "verdict is required"),
    ],
)
def test_bad_arguments_raise(args: tuple, message: str) -> None:
    """Invalid mode/on_drop, or no verdict for an opted-out buyer, is a caller error."""
    with pytest.raises(ValueError, match=message):
        decide(*args)


def rejected(recipient: str, rule: str = "builtin:feedback-request") -> Decision:
    verdict = Verdict("non-critical", rule, "rule matched", False, None)
    return decide(recipient, recipient, True, verdict, "enforce", "reject")


def test_reject_reply_names_buyers_and_rules() -> None:
    """When every recipient is rejected, one 550 5.7.1 line names the buyers and the rules."""
    second = "a1b2c3d4e5f6g7h@marketplace.amazon.de"
    reply = reject_reply([rejected(BUYER), rejected(second, "builtin:marketing")])
    assert reply is not None and reply.startswith("550 5.7.1 ")
    assert BUYER in reply and second in reply
    assert "builtin:feedback-request" in reply and "builtin:marketing" in reply
    assert reply.isascii() and "\r" not in reply and "\n" not in reply and len(reply) < 512


@pytest.mark.parametrize(
    "decisions",
    [[], [rejected(BUYER), decide("me@seller.example", None, False, None, "enforce", "reject")],
     [decide(BUYER, BUYER, True, NONCRIT, "enforce", "discard")]],
    ids=["none", "colleague-still-gets-it", "discarded"],
)
def test_no_reject_reply_unless_all_rejected(decisions: list[Decision]) -> None:
    """No SMTP rejection when any recipient is still delivered or the drop is not a reject."""
    assert reject_reply(decisions) is None


def test_reject_reply_is_clean_ascii_and_bounded() -> None:
    """Non-ASCII rule names and very many buyers still give one short printable line."""
    many = [rejected(f"{i:015d}@marketplace.amazon.de", "seller:rückruf\r\nX") for i in range(60)]
    reply = reject_reply(many)
    assert reply is not None and reply.isascii() and len(reply) <= 420
    assert "\r" not in reply and "\n" not in reply and reply.endswith("...")
