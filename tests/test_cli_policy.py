"""`mailrelay classify` and `mailrelay audit`, run as the operator runs them, on a real store.

classify must print the daemon's own decision (the daemon side is in test_policy_e2e.py) and
change nothing; audit must show what was decided, filtered as asked.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import ROOT, write_config

from mailrelay.cli import main
from mailrelay.cli.common import UserError
from mailrelay.cli.policy_cmds import parse_since
from mailrelay.imap.actions import apply_finding, message_key
from mailrelay.imap.detect import detect
from mailrelay.store import Store
from mailrelay.store.records import AuditRecord

SAMPLES = Path(__file__).parent / "data" / "samples"
BUYER = "k7m2p9x4t1v8c3q@marketplace.amazon.com"
BUYER_MODERN = "r4w8n2j6d1h5z9b+5b2e7c1a-9d3f-4e8a-b6c2-1f0a9e7d3c4b@marketplace.amazon.com"
OTHER_BUYER = "x5c8v2b7n4m1q3w@marketplace.amazon.de"
COLLEAGUE = "warehouse@northwind-outdoor.example"
ORDER = "113-4829371-5562918"
FEEDBACK = SAMPLES / "16-seller-feedback-request.eml"
REPLY = SAMPLES / "15-seller-reply-critical.eml"
NOT_BUYER = "not a marketplace buyer address"

# Both sample buyers opted out. (recipient, class, rule, action) per sample; the samples not
# listed are addressed to the seller or another non-buyer, and are delivered unchanged.
EXPECTED = {
    "15-seller-reply-critical.eml": (BUYER_MODERN, "critical", "builtin:address-problem",
                                     "deliver"),
    "16-seller-feedback-request.eml": (BUYER, "non-critical", "builtin:feedback-request",
                                       "reject"),
    "17-seller-delivery-issue-proactive.eml": (BUYER, "critical", "builtin:address-problem",
                                               "deliver"),
    "18-seller-marketing-newsletter.eml": (BUYER, "non-critical", "builtin:marketing", "reject"),
    "19-seller-thankyou.eml": (BUYER, "non-critical", "builtin:thank-you", "reject"),
}
LINE_RE = re.compile(r"^(?P<rcpt>\S+)\s+(?P<cls>\S+)\s+(?P<rule>\S+)\s+→ (?P<action>[a-z ]+) "
                     r"\((?P<reason>.+)\)$")

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A trial config (maildir upstream) whose database nobody else uses."""
    return write_config(tmp_path)


@pytest.fixture
def run(config: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """``mailrelay ARGS -c CONFIG`` through the console script's main(): (status, out, err)."""

    def invoke(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([*args, "-c", str(config)])
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def in_store(config: Path, work: Callable[[Store], Any]) -> Any:
    """Run ``work(store)`` on the config's database, as the daemon or the poller would."""

    async def go() -> Any:
        store = await Store.open(config.parent / "mailrelay.db")
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


async def record_questions(store: Store) -> None:
    """What the IMAP poller stores when the buyers' questions (samples 13, 14) come in."""
    for name in ("13-buyer-question-en-classic-commMgrTok.eml",
                 "14-buyer-question-en-modern-pluscase.eml"):
        raw = (SAMPLES / name).read_bytes()
        finding = detect(raw)
        assert (await apply_finding(store, finding, message_key(finding, raw), 1.0)).recorded


def classify_json(run: Run, *args: str) -> list[dict[str, Any]]:
    code, out, err = run("classify", *args, "--json")
    assert code == 0, err
    return json.loads(out)


# -- classify ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", sorted(SAMPLES.glob("*.eml")), ids=lambda p: p.name[:2])
def test_every_sample_prints_its_decision_in_one_readable_line(run: Run, sample: Path) -> None:
    """Each sample gives exactly one line: recipient, class, rule, → action (reason)."""
    assert run("blocklist", "add", BUYER, BUYER_MODERN)[0] == 0

    code, out, err = run("classify", str(sample))

    assert (code, err) == (0, "")
    (line,) = out.splitlines()
    match = LINE_RE.match(line)
    assert match, line
    if sample.name in EXPECTED:
        assert (match["rcpt"], match["cls"], match["rule"], match["action"]) == \
            EXPECTED[sample.name]
        assert "buyer opted out" in match["reason"]
    else:
        assert "@marketplace.amazon." not in match["rcpt"]
        assert (match["cls"], match["rule"], match["action"], match["reason"]) == (
            "-", "-", "deliver", NOT_BUYER)


def test_installed_command_reads_a_file_or_standard_input(config: Path) -> None:
    """`python -m mailrelay classify` prints the same line for a file and for `-` (stdin)."""

    def classify(*args: str, stdin: bytes | None = None) -> str:
        done = subprocess.run([sys.executable, "-m", "mailrelay", "classify", *args,
                               "-c", str(config)], input=stdin, capture_output=True,
                              timeout=60, cwd=ROOT, check=True)
        return done.stdout.decode()

    from_file = classify(str(FEEDBACK))
    assert from_file == classify("-", stdin=FEEDBACK.read_bytes())
    assert from_file.count("\n") == 1
    assert from_file.startswith(f"{BUYER}  non-critical  builtin:feedback-request  → deliver (")


def test_json_per_recipient_and_mixed_recipients(run: Run) -> None:
    """--json gives one object per recipient; with a colleague too, the opted-out buyer's
    reject becomes a discard, because the message is accepted for the colleague."""
    run("blocklist", "add", BUYER)

    (alone,) = classify_json(run, str(FEEDBACK))
    mixed = classify_json(run, str(FEEDBACK), "--to", COLLEAGUE, "--to", BUYER)

    assert alone == {
        "recipient": BUYER, "buyer_key": BUYER, "class": "non-critical",
        "rule": "builtin:feedback-request", "action": "reject", "would_action": "reject",
        "mode": "enforce",
        "reason": 'buyer opted out of non-critical messages: rule builtin:feedback-request '
                  'matched subject "how was your order"',
    }
    assert [(r["recipient"], r["action"]) for r in mixed] == [(COLLEAGUE, "deliver"),
                                                             (BUYER, "discard")]
    assert mixed[0]["reason"] == NOT_BUYER and mixed[0]["class"] is None
    assert mixed[1]["reason"].startswith(alone["reason"] + "; discarded, not rejected")


@pytest.mark.parametrize(("policy", "opted_out", "action", "would"), [
    ({"on_drop": "reject"}, True, "reject", "reject"),
    ({"on_drop": "discard"}, True, "discard", "discard"),
    ({"on_drop": "quarantine"}, True, "quarantine", "quarantine"),
    ({"mode": "monitor", "on_drop": "reject"}, True, "deliver", "reject"),
    ({"mode": "monitor", "on_drop": "quarantine"}, True, "deliver", "quarantine"),
    ({"on_drop": "reject"}, False, "deliver", "deliver"),
    ({"default_class": "critical", "on_drop": "reject"}, True, "reject", "reject"),
])
def test_decision_follows_the_policy_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            policy: dict[str, str], opted_out: bool,
                                            action: str, would: str) -> None:
    """policy.mode, policy.on_drop and the opt-out give the action; monitor names the would-be."""
    config = write_config(tmp_path, policy=policy)
    if opted_out:
        assert main(["blocklist", "add", BUYER, "-c", str(config)]) == 0
    capsys.readouterr()

    assert main(["classify", str(FEEDBACK), "--json", "-c", str(config)]) == 0

    (row,) = json.loads(capsys.readouterr().out)
    assert (row["action"], row["would_action"], row["mode"]) == (
        action, would, policy.get("mode", "enforce"))
    if policy.get("mode") == "monitor":
        assert row["reason"].startswith(f"monitor mode, would {would}; ")


def test_reply_is_put_on_the_buyers_thread(run: Run, config: Path) -> None:
    """With the buyers' questions recorded, sample 15 is tagged onto its own buyer's thread
    (a thread reply) and, sent to the other buyer, onto theirs (same order, critical rule)."""
    in_store(config, record_questions)
    run("blocklist", "add", BUYER, BUYER_MODERN)

    (own,) = classify_json(run, str(REPLY))
    (other,) = classify_json(run, str(REPLY), "--to", BUYER)

    assert (own["recipient"], own["class"], own["rule"], own["action"]) == (
        BUYER_MODERN, "critical", "thread:reply", "tag_and_deliver")
    assert "<bbc-msg-113-modern-5b2e7c1a@amazon.example>" in own["reason"]
    assert (other["class"], other["rule"], other["action"]) == (
        "critical", "builtin:address-problem", "tag_and_deliver")
    _, out, _ = run("classify", str(REPLY))
    assert "→ tag and deliver (buyer opted out, but critical: reply on the buyer's thread" in out


@pytest.mark.parametrize(("class_header", "field", "cls", "rule"), [
    (None, "X-Mailrelay-Class: critical", "critical", "header:X-Mailrelay-Class"),
    (None, "x-mailrelay-class:  Critical ", "critical", "header:X-Mailrelay-Class"),
    (None, "X-Mailrelay-Class: urgent", "non-critical", "builtin:feedback-request"),
    ("X-Seller-Class", "X-Seller-Class: critical", "critical", "header:X-Seller-Class"),
    ("X-Seller-Class", "X-Mailrelay-Class: critical", "non-critical", "builtin:feedback-request"),
])
def test_class_header_from_the_sellers_client_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], class_header: str | None, field: str,
    cls: str, rule: str,
) -> None:
    """The configured class header (a valid value, any case) decides the class; others do not."""
    policy = {"class_header": class_header} if class_header else {}
    config = write_config(tmp_path, policy=policy)
    eml = tmp_path / "marked.eml"
    raw = FEEDBACK.read_bytes()
    eml.write_bytes(raw.replace(b"\r\n", b"\r\n" + field.encode() + b"\r\n", 1))

    assert main(["classify", str(eml), "--json", "-c", str(config)]) == 0

    (row,) = json.loads(capsys.readouterr().out)
    assert (row["class"], row["rule"]) == (cls, rule)


def test_opted_out_order_counts_and_classify_changes_nothing(run: Run, config: Path) -> None:
    """Mail naming an order Amazon reported opted out is dropped for a buyer not on the
    blocklist; classifying (even mail that the daemon would relay) queues, audits and
    resolves nothing."""
    order = "402-7777777-1234567"

    async def notice(store: Store) -> None:
        assert await store.optout.apply_notice(order, "<n@amazon.com>", None, 1.0) == []

    in_store(config, notice)
    feedback = config.parent / "feedback.eml"
    feedback.write_bytes(FEEDBACK.read_bytes().replace(ORDER.encode(), order.encode()))
    critical = config.parent / "critical.eml"
    critical.write_bytes((SAMPLES / "17-seller-delivery-issue-proactive.eml").read_bytes()
                         .replace(ORDER.encode(), order.encode()))

    (dropped,) = classify_json(run, str(feedback), "--to", OTHER_BUYER)
    (relayed,) = classify_json(run, str(critical), "--to", OTHER_BUYER)

    assert dropped["action"] == "reject"
    assert f"names opted-out order {order}" in dropped["reason"]
    assert relayed["action"] == "deliver"

    async def state(store: Store) -> tuple[Any, ...]:
        return (await store.queue.list(), await store.audit_log(),
                await store.optout.unresolved_orders(), await store.optout.entries(),
                await store.optout.buyers_for_order(order))

    assert in_store(config, state) == ([], [], [order], [], [])


def test_line_endings_and_mbox_separator_do_not_change_the_decision(
    run: Run, tmp_path: Path
) -> None:
    """An LF-only file, or one saved with an mbox "From " line, classifies like the CRLF one."""
    raw = FEEDBACK.read_bytes()
    lf = tmp_path / "lf.eml"
    lf.write_bytes(raw.replace(b"\r\n", b"\n"))
    mbox = tmp_path / "mbox.eml"
    mbox.write_bytes(b"From support@northwind-outdoor.example Tue Jun 18 10:02:10 2024\n" + raw)

    outputs = {run("classify", str(path))[1] for path in (FEEDBACK, lf, mbox)}

    assert len(outputs) == 1


@pytest.mark.parametrize(("make", "extra", "message"), [
    (lambda d: d / "missing.eml", (), "cannot read"),
    (lambda d: d, (), "cannot read"),
    (lambda d: _write(d / "empty.eml", b""), (), "is empty"),
    (lambda d: _write(d / "blank.eml", b"\r\n\r\n  \n"), (), "is empty"),
    (lambda d: _write(d / "png.eml", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), (), "not a mail message"),
    (lambda d: _write(d / "text.eml", b"just some words\n"), (), "not a mail message"),
    (lambda d: _write(d / "nobody.eml", b"Subject: hi\r\n\r\nbody\r\n"), (), "no To or Cc"),
    (lambda d: FEEDBACK, ("--to", "nobody"), "is not a mail address"),
])
def test_bad_input_exits_1_with_one_line(run: Run, tmp_path: Path,
                                         make: Callable[[Path], Path], extra: tuple[str, ...],
                                         message: str) -> None:
    """A file that is no message, or no recipient, is one line on stderr and exit status 1."""
    code, out, err = run("classify", str(make(tmp_path)), *extra)

    assert (code, out) == (1, "")
    (line,) = err.splitlines()
    assert line.startswith("mailrelay: ") and message in line


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- audit ---------------------------------------------------------------------------------------

NOW = time.time()
AUDITS = [
    AuditRecord("deliver", NOW - 3 * 86400, "Q1", "<m1@x>", BUYER, BUYER, "critical",
                "builtin:address-problem", "enforce", "buyer has not opted out"),
    AuditRecord("reject", NOW - 2 * 3600, None, "<m2@x>", BUYER, BUYER, "non-critical",
                "builtin:feedback-request", "enforce", "buyer opted out of non-critical\nmail"),
    AuditRecord("deliver", NOW - 600, "Q3", "<m3@x>", OTHER_BUYER, OTHER_BUYER.lower(),
                "non-critical", "builtin:thank-you", "monitor", "monitor mode, would reject"),
]


@pytest.fixture
def audited(config: Path) -> Path:
    """Three decisions: three days, two hours and ten minutes old."""

    async def fill(store: Store) -> None:
        await store.audit(AUDITS)

    in_store(config, fill)
    return config


def test_audit_table_has_every_column(run: Run, audited: Path) -> None:
    """The table: time, queue id, Message-ID, recipient, class, rule, action, mode, reason."""
    code, out, err = run("audit")

    assert (code, err) == (0, "")
    header, *rows, total = out.splitlines()
    assert header.split() == ["time", "queue", "id", "message-id", "recipient", "class", "rule",
                              "action", "mode", "reason"]
    assert total == "3 record(s)"
    assert rows[1].split() == [
        datetime.fromtimestamp(NOW - 7200, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "<m2@x>", BUYER,
        "non-critical", "builtin:feedback-request", "reject", "enforce", "buyer", "opted", "out",
        "of", "non-critical", "mail"]  # no queue id: a rejected message is never queued


@pytest.mark.parametrize(("args", "message_ids"), [
    ((), ["<m1@x>", "<m2@x>", "<m3@x>"]),
    (("--since", "1h"), ["<m3@x>"]),
    (("--since", "1d"), ["<m2@x>", "<m3@x>"]),
    (("--since", datetime.fromtimestamp(NOW - 86400, UTC).isoformat()), ["<m2@x>", "<m3@x>"]),
    (("--buyer", "K7M2P9X4T1V8C3Q+case-1@marketplace.amazon.com"), ["<m1@x>", "<m2@x>"]),
    (("--buyer", BUYER, "--since", "1d"), ["<m2@x>"]),
    (("--limit", "2"), ["<m2@x>", "<m3@x>"]),
])
def test_audit_json_filters(run: Run, audited: Path, args: tuple[str, ...],
                            message_ids: list[str]) -> None:
    """--since (duration or ISO time), --buyer (any alias of the buyer) and --limit (newest N)."""
    code, out, err = run("audit", *args, "--json")

    assert code == 0, err
    records = json.loads(out)
    assert [r["message_id"] for r in records] == message_ids
    newest = records[-1]
    assert set(newest) == {"time", "at", "queue_id", "message_id", "recipient", "buyer_key",
                           "class", "rule", "action", "mode", "reason"}


def test_audit_shows_blocklist_changes_and_an_empty_log(run: Run) -> None:
    """An empty log says so; a `blocklist add` shows up as a block record for the buyer."""
    assert run("audit")[1] == "0 record(s)\n"
    run("blocklist", "add", BUYER, "--reason", "asked by phone")

    (record,) = json.loads(run("audit", "--json")[1])

    assert (record["action"], record["buyer_key"], record["reason"]) == (
        "block", BUYER, "manual: asked by phone")


@pytest.mark.parametrize(("args", "status", "message"), [
    (("--since", "yesterday"), 1, "--since 'yesterday'"),
    (("--buyer", COLLEAGUE), 1, "is not a marketplace buyer address"),
    (("--limit", "0"), 2, "must be at least 1"),
])
def test_audit_bad_options(run: Run, args: tuple[str, ...], status: int, message: str) -> None:
    """A bad filter is refused with a message (exit 1, or 2 for usage)."""
    code, out, err = run("audit", *args)

    assert (code, out) == (status, "")
    assert message in err.splitlines()[-1]


@pytest.mark.parametrize(("value", "expected"), [
    ("90s", 1_000_000.0 - 90),
    ("2d", 1_000_000.0 - 2 * 86400),
    ("2024-06-18T10:00:00Z", 1718704800.0),
    ("2024-06-18T10:00:00", 1718704800.0),
    ("2024-06-18T12:00:00+02:00", 1718704800.0),
    ("2024-06-18", 1718668800.0),
])
def test_parse_since(value: str, expected: float) -> None:
    """Durations count back from now; ISO times without a zone are UTC."""
    assert parse_since(value, 1_000_000.0) == expected


def test_parse_since_refuses_words() -> None:
    """Anything else is a user error naming the option."""
    with pytest.raises(UserError, match="--since"):
        parse_since("last tuesday", 0.0)
