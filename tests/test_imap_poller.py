"""The IMAP poller against a real Dovecot: opt-outs applied once, notices moved, nothing missed.

The mailbox is seeded with the Amazon samples (4 opt-out notices, 4 other Amazon notices, 3 buyer
messages, 5 seller messages) plus real bounces from the shared corpus. The store knows, from
messages "relayed" earlier, the buyers of two of the three noticed orders; the third order stays
unresolved until its buyer writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from dovecot import (  # the fixtures are imported so this file also runs without conftest.py
    DEFAULT_PASSWORD,
    DEFAULT_USER,
    DovecotServer,
    _free_port,
    dovecot_fixture,  # noqa: F401
    dovecot_tls_fixture,  # noqa: F401
)

from mailrelay.cli.poll_cmds import format_summary
from mailrelay.config import ImapAccount
from mailrelay.imap.actions import ActionResult, apply_finding, message_key
from mailrelay.imap.backoff import Backoff
from mailrelay.imap.detect import AmazonNotice, BuyerMessage, OptOutNotice, Other
from mailrelay.imap.poller import ImapPoller, PassSummary, idle_renewal, poll_once, total
from mailrelay.store import Store
from mailrelay.store.records import NewMessage, NewRecipient, RelayedRecord

pytestmark = pytest.mark.timeout(30)
integration = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(__file__).parent / "data" / "samples"
FOLDER = "Amazon/Opt-outs"
NOTICES = ("01-", "03-", "04-", "06-")
AMAZON_OTHER = ("09-", "10-", "11-", "20-")
BUYER_MESSAGES = ("13-", "14-", "21-")

ORDER_EN, ORDER_FR, ORDER_JA = "113-4829371-5562918", "403-7719204-3381547", "250-6627193-4401829"
BUYER_EN = "k7m2p9x4t1v8c3q@marketplace.amazon.com"  # wrote sample 13; mail relayed for ORDER_EN
BUYER_FR = "f8d3k2m9x1c7v4b@marketplace.amazon.fr"  # mail relayed for ORDER_FR
BUYER_JA = "j5h8g2f6d3s9a1p@marketplace.amazon.co.jp"  # writes later about ORDER_JA
NEVER_BLOCKED = ("r4w8n2j6d1h5z9b@marketplace.amazon.com",  # sample 14, same order, later
                 "m1n2b3v4c5x6z7l@marketplace.amazon.com.mx")  # sample 21, no notice
FAST = Backoff(initial=0.2, maximum=1.0, auth_initial=0.3)

CORPUS_PICKS = (  # the corpus's near misses (README "worth a close look"), then plain bounces
    "sisimai-set-of-emails/maildir/bsd/arf-12.eml", "php-bounce-handler/eml/arf2.txt",
    "sisimai-set-of-emails/maildir/bsd/arf-26.eml",
    "mail-deliverystatus-bounceparser/t/corpus/spam-bogus-email-in-report.msg",
    "sisimai-set-of-emails/maildir/bsd/lhost-amazonses-01.eml",
    "sisimai-set-of-emails/maildir/bsd/lhost-amazonworkmail-01.eml",
    "sisimai-set-of-emails/maildir/bsd/lhost-amavis-03.eml",
    "sisimai-set-of-emails/maildir/bsd/lhost-exchange2007-05.eml",
    *(f"flufl.bounce/data/dsn_{n:02d}.txt" for n in range(1, 9)),
    "flufl.bounce/data/aol_01.txt", "flufl.bounce/data/bounce_01.txt",
    "flufl.bounce/data/bounce_02.txt", "flufl.bounce/data/bounce_03.txt",
)


# ----- helpers --------------------------------------------------------------------------------


def sample(prefix: str) -> bytes:
    return next(SAMPLES.glob(f"{prefix}*.eml")).read_bytes()


def corpus_dir() -> Path:
    for base in (ROOT.parent, Path("/work")):
        candidate = base / "shared" / "corpus" / "bounces"
        if candidate.is_dir():
            return candidate
    pytest.fail("bounce corpus not found: expected ../shared/corpus/bounces next to the clone")


def corpus_noise() -> list[bytes]:
    """20 real bounces, without the mbox 'From ' separator line some of them start with."""
    raws = [(corpus_dir() / name).read_bytes().lstrip(b"\r\n") for name in CORPUS_PICKS]
    return [raw.split(b"\n", 1)[1] if raw.startswith(b"From ") else raw for raw in raws]


def late_buyer_message() -> bytes:
    """Sample 13 rewritten: another buyer writes about the order nobody could resolve."""
    return (sample("13-").replace(ORDER_EN.encode(), ORDER_JA.encode())
            .replace(BUYER_EN.encode(), BUYER_JA.encode())
            .replace(b"<bbc-msg-113-classic@", b"<bbc-msg-250-late@"))


def message_id(raw: bytes) -> str:
    for line in raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].split(b"\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


def seed(server: DovecotServer, noise: bool = True) -> list[bytes]:
    raws = [p.read_bytes() for p in sorted(SAMPLES.glob("*.eml"))]
    raws += corpus_noise() if noise else []
    for raw in raws:
        server.append(DEFAULT_USER, raw)
    return raws


def make_account(server: DovecotServer, tmp_path: Path, *, password: str = DEFAULT_PASSWORD,
                 **overrides: Any) -> ImapAccount:
    secret = tmp_path / f"imap-{abs(hash(password))}.password"
    secret.write_text(password + "\n")
    settings: dict[str, Any] = {
        "name": "shop", "host": server.host, "port": server.port, "tls": "off",
        "username": DEFAULT_USER, "password_file": str(secret), "mailboxes": ["INBOX"],
        "idle": True, "poll_interval": 60, "timeout": 2, "after_notice": f"move:{FOLDER}",
    }
    return ImapAccount.model_validate({**settings, **overrides})


async def remember_relayed(store: Store) -> None:
    """Mail the seller sent through the relay earlier: ties ORDER_EN and ORDER_FR to buyers."""
    def to_buyer(n: int, cls: str) -> NewMessage:
        raw = f"From: shop@example.com\r\nSubject: {cls} {n}\r\n\r\nhello\r\n".encode()
        return NewMessage("shop@example.com", raw,
                          (NewRecipient(BUYER_EN, buyer_key=BUYER_EN, cls=cls),),
                          message_id=f"<relayed{n}@example.com>")

    await store.queue.enqueue(
        [to_buyer(1, "non-critical"), to_buyer(2, "critical")],
        relayed=[RelayedRecord(BUYER_EN, ORDER_EN, "<relayed1@example.com>", 1.0, "#0"),
                 RelayedRecord(BUYER_FR, ORDER_FR, "<relayed0@example.com>", 1.0)],
        now=1.0,
    )


async def blocked(store: Store) -> set[str]:
    return {e.buyer_key for e in await store.optout.entries()}


async def audit_count(store: Store) -> int:
    return len(await store.audit_log(limit=100_000))


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float) -> float:
    """Wait until ``check()`` is true; return how long it took (fails after ``within`` s)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"condition not met within {within} s")


def ids_in(server: DovecotServer, mailbox: str = "INBOX") -> list[str]:
    return sorted(message_id(raw) for _uid, _flags, raw in server.fetch_all(DEFAULT_USER, mailbox))


def inbox_flags_and_bytes(server: DovecotServer) -> list[tuple[set[str], bytes]]:
    """INBOX without its UIDs (which a UIDVALIDITY change renumbers) or session-only \\Recent."""
    return [(flags - {"\\Recent"}, raw) for _uid, flags, raw in server.fetch_all(DEFAULT_USER)]


def deliver_to_maildir(server: DovecotServer, raw: bytes) -> None:
    """Drop a message into Maildir/new as an MDA does while IMAP is down."""
    new = server.root / "mail" / DEFAULT_USER / "Maildir" / "new"
    path = new / f"{time.time_ns()}.M1P{os.getpid()}.mailrelay-test"
    path.write_bytes(raw.replace(b"\r\n", b"\n"))
    shutil.chown(path, "dovecot", "dovecot")


@contextlib.contextmanager
def running(task: asyncio.Task[None]) -> Iterator[asyncio.Task[None]]:
    try:
        yield task
    finally:
        task.cancel()


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel the supervisor; it must end by cancellation, never by an exception of its own."""
    assert not task.done(), "run_forever returned or raised on its own"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    db = await Store.open(tmp_path / "mailrelay.db")
    yield db
    await db.close()


# ----- pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "rand", "auth", "expected"),
    [(1, 0.5, False, 1.0), (2, 0.5, False, 2.0), (4, 0.5, False, 8.0), (9, 0.5, False, 256.0),
     (10, 0.5, False, 300.0), (10_000, 1.0, False, 300.0), (1, 0.0, False, 0.75),
     (1, 1.0, False, 1.25), (1, 0.5, True, 30.0), (3, 0.5, True, 120.0), (5, 0.5, True, 300.0)],
)
def test_backoff_schedule(failures: int, rand: float, auth: bool, expected: float) -> None:
    """Reconnects wait 1 s doubling to 5 min (+-25 % jitter); a refused login starts at 30 s."""
    assert Backoff().delay(failures, rand, auth=auth) == pytest.approx(expected)


@pytest.mark.parametrize(("poll_interval", "renewal"),
                         [(60, 300), (0.1, 1), (600, 1500), (3600, 1500)])
def test_idle_renewal_stays_under_rfc_limit(poll_interval: float, renewal: float) -> None:
    """IDLE is re-issued every 5 poll intervals, never later than 25 min (RFC 2177: 29)."""
    assert idle_renewal(poll_interval) == renewal


def test_summary_line_and_total() -> None:
    """The poll-once line counts what an operator cares about; total adds up the mailboxes."""
    one = PassSummary("shop", "INBOX", seen=12, notices=2, blocked=1, unresolved=1,
                      buyer_messages=1, cancelled=2)
    both = total([one, PassSummary("shop", "Support", seen=3, errors=1)])
    assert (both.seen, both.notices, both.errors) == (15, 2, 1)
    assert format_summary(one) == ("12 messages, 2 opt-out notices, 1 buyer blocked, "
                                   "1 order unresolved, 1 buyer message recorded, "
                                   "2 queued messages cancelled, 0 errors")


@pytest.mark.parametrize(
    ("finding", "expected"),
    [
        (OptOutNotice("<n1@amazon.com>", (ORDER_EN,), None, "en", "optout-en"),
         ActionResult("optout", blocked=(BUYER_EN,), cancelled=1)),
        (OptOutNotice("<n2@amazon.com>", (ORDER_JA, ORDER_FR), None, "en", "optout-en"),
         ActionResult("optout", blocked=(BUYER_FR,), unresolved=(ORDER_JA,))),
        (BuyerMessage("<b1@amazon>", BUYER_JA, BUYER_JA, ORDER_JA, "TOK", "s", "t", "JP"),
         ActionResult("buyer", recorded=True)),
        (AmazonNotice("<a1@amazon.com>", "guideline-block", (ORDER_EN,)), ActionResult("amazon")),
        (Other("", "unrecognised"), ActionResult("other")),
    ],
)
async def test_apply_finding(store: Store, finding: Any, expected: ActionResult) -> None:
    """Notices block their order's known buyers; other findings never touch the blocklist."""
    await remember_relayed(store)
    assert await apply_finding(store, finding, message_key(finding, b"raw"), 5.0) == expected
    assert await blocked(store) == set(expected.blocked)


async def test_notice_then_buyer_message_resolves_the_order(store: Store) -> None:
    """A notice for an order nobody is known for blocks its buyer as soon as the buyer writes."""
    notice = OptOutNotice("<n@amazon.co.jp>", (ORDER_JA,), None, "ja", "optout-ja")
    assert (await apply_finding(store, notice, "k", 1.0)).unresolved == (ORDER_JA,)
    late = BuyerMessage("<b@amazon>", BUYER_JA, BUYER_JA, ORDER_JA, None, "s", "t", "JP")
    result = await apply_finding(store, late, "k2", 2.0)
    assert (result.recorded, result.blocked) == (True, (BUYER_JA,))
    assert message_key(Other("", "unparseable"), b"x").startswith("sha256:")


# ----- one pass against Dovecot ---------------------------------------------------------------


@integration
async def test_poll_once_blocks_exactly_the_right_buyers(
    dovecot: DovecotServer, store: Store, tmp_path: Path
) -> None:
    """One pass blocks the resolvable buyers only, moves only notices, keeps all unread."""
    raws = seed(dovecot)
    await remember_relayed(store)
    [summary] = await poll_once(store, [make_account(dovecot, tmp_path)])
    assert summary == PassSummary("shop", "INBOX", seen=len(raws), notices=4, blocked=2,
                                  unresolved=1, buyer_messages=3, cancelled=1)
    assert await blocked(store) == {BUYER_EN, BUYER_FR}
    assert await store.optout.unresolved_orders() == [ORDER_JA]
    notice_ids = sorted(message_id(sample(p)) for p in NOTICES)
    assert ids_in(dovecot, FOLDER) == notice_ids
    assert ids_in(dovecot) == sorted(message_id(r) for r in raws if message_id(r) not in notice_ids)
    for box in ("INBOX", FOLDER):
        assert all("\\Seen" not in flags for _u, flags, _r in dovecot.fetch_all(DEFAULT_USER, box))
    buyer_ids = [message_id(sample(p)) for p in BUYER_MESSAGES]
    assert len(await store.optout.buyer_messages_by_id(buyer_ids)) == 3
    queued = {m.message_id: m.state for m in await store.queue.list(limit=10)}
    assert queued == {"<relayed1@example.com>": "cancelled", "<relayed2@example.com>": "queued"}


@integration
async def test_second_pass_changes_nothing_and_late_buyer_resolves(
    dovecot: DovecotServer, store: Store, tmp_path: Path
) -> None:
    """A second pass is a no-op; a later buyer message for the unresolved order blocks its buyer."""
    seed(dovecot, noise=False)
    await remember_relayed(store)
    account = make_account(dovecot, tmp_path)
    await poll_once(store, [account])
    entries, audits = await store.optout.entries(), await audit_count(store)
    [again] = await poll_once(store, [account])
    assert again == PassSummary("shop", "INBOX")
    assert (await store.optout.entries(), await audit_count(store)) == (entries, audits)

    dovecot.append(DEFAULT_USER, late_buyer_message())
    [late] = await poll_once(store, [account])
    assert (late.seen, late.buyer_messages, late.blocked, late.notices) == (1, 1, 1, 0)
    assert await blocked(store) == {BUYER_EN, BUYER_FR, BUYER_JA}
    assert await store.optout.unresolved_orders() == []
    assert not await blocked(store) & set(NEVER_BLOCKED)


@integration
@pytest.mark.parametrize("after_notice", [f"move:{FOLDER}", "keep", "flag"])
async def test_uidvalidity_change_handles_nothing_twice(
    dovecot: DovecotServer, store: Store, tmp_path: Path, after_notice: str
) -> None:
    """A rebuilt mailbox (new UIDVALIDITY) is rescanned, but nothing is applied or moved twice."""
    raws = seed(dovecot, noise=False)
    await remember_relayed(store)
    account = make_account(dovecot, tmp_path, after_notice=after_notice)
    [first] = await poll_once(store, [account])
    assert first.notices == 4
    entries, audits = await store.optout.entries(), await audit_count(store)
    moved = after_notice.startswith("move:")
    inbox, folder = inbox_flags_and_bytes(dovecot), ids_in(dovecot, FOLDER) if moved else []
    old_validity = (await store.imap_state("shop", "INBOX"))[0]  # type: ignore[index]

    await asyncio.to_thread(dovecot.change_uidvalidity, DEFAULT_USER)
    [second] = await poll_once(store, [account])
    left = len(raws) - (4 if moved else 0)
    assert second == PassSummary("shop", "INBOX", seen=left, skipped=left)
    assert (await store.optout.entries(), await audit_count(store)) == (entries, audits)
    assert inbox_flags_and_bytes(dovecot) == inbox
    if moved:
        assert ids_in(dovecot, FOLDER) == folder
    state = await store.imap_state("shop", "INBOX")
    assert state is not None and state[0] != old_validity


@integration
@pytest.mark.parametrize(("after_notice", "flagged"), [("flag", True), ("delete", False)])
async def test_after_notice_flag_or_delete(
    dovecot: DovecotServer, store: Store, tmp_path: Path, after_notice: str, flagged: bool
) -> None:
    """after_notice flag marks just the notices \\Flagged; delete removes just the notices."""
    raws = [sample(p) for p in (*NOTICES, *BUYER_MESSAGES)]
    for raw in raws:
        dovecot.append(DEFAULT_USER, raw)
    await poll_once(store, [make_account(dovecot, tmp_path, after_notice=after_notice)])
    left = {message_id(raw): flags for _u, flags, raw in dovecot.fetch_all(DEFAULT_USER)}
    notice_ids = {message_id(sample(p)) for p in NOTICES}
    assert {k for k, f in left.items() if "\\Flagged" in f} == (notice_ids if flagged else set())
    assert len(left) == len(raws) - (0 if flagged else 4)


@integration
async def test_refused_move_is_an_error_not_a_stop(
    dovecot: DovecotServer, store: Store, tmp_path: Path
) -> None:
    """A folder the server refuses to create: the block still holds, the notice stays, counted."""
    dovecot.append(DEFAULT_USER, sample("03-"))
    await remember_relayed(store)
    account = make_account(dovecot, tmp_path, after_notice="move:Bad.Name")  # Maildir++: no "."
    with structlog.testing.capture_logs() as logs:
        [summary] = await poll_once(store, [account])
    assert (summary.ok, summary.notices, summary.blocked, summary.errors) == (True, 1, 1, 1)
    assert ids_in(dovecot) == [message_id(sample("03-"))]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["imap_after_notice_failed"]
    [again] = await poll_once(store, [account])
    assert again == PassSummary("shop", "INBOX")  # handled once: no retry loop on every pass


@integration
async def test_poll_once_over_implicit_tls(
    dovecot_tls: DovecotServer, store: Store, tmp_path: Path
) -> None:
    """Implicit TLS (port 993 style) with the server's CA trusted through ssl_context."""
    dovecot_tls.append(DEFAULT_USER, sample("03-"))
    await remember_relayed(store)
    context = ssl.create_default_context()
    dovecot_tls.ca.configure_trust(context)  # type: ignore[attr-defined]
    account = make_account(dovecot_tls, tmp_path, tls="implicit", port=dovecot_tls.tls_port)
    [summary] = await poll_once(store, [account], ssl_context=context)
    assert (summary.ok, summary.notices, summary.blocked) == (True, 1, 1)
    [untrusted] = await poll_once(store, [account])
    assert "CERTIFICATE_VERIFY_FAILED" in (untrusted.failure or "")


# ----- the supervisor -------------------------------------------------------------------------


@integration
async def test_notice_during_idle_is_applied_within_seconds(
    dovecot: DovecotServer, store: Store, tmp_path: Path
) -> None:
    """With IDLE (and a 5-minute renewal), a new notice is applied about a second after arrival."""
    await remember_relayed(store)
    passes: list[PassSummary] = []
    poller = ImapPoller(store, make_account(dovecot, tmp_path), "INBOX", on_pass=passes.append)
    task = asyncio.create_task(poller.run_forever())
    with running(task):
        await eventually(lambda: poller.state == "idle", 5)
        await asyncio.to_thread(dovecot.append, DEFAULT_USER, sample("03-"))
        took = await eventually(lambda: poller.last_pass and passes[-1].notices == 1, 5)
        assert took < 3
        assert await blocked(store) == {BUYER_FR}
        assert ids_in(dovecot, FOLDER) == [message_id(sample("03-"))]
        await stop(task)
    assert poller.state == "stopped"


@integration
async def test_reconnects_after_crash_and_misses_nothing(
    dovecot: DovecotServer, store: Store, tmp_path: Path
) -> None:
    """Dovecot killed mid-IDLE: the poller backs off, reconnects, applies what came meanwhile."""
    await remember_relayed(store)
    poller = ImapPoller(store, make_account(dovecot, tmp_path), "INBOX", backoff=FAST)
    task = asyncio.create_task(poller.run_forever())
    with running(task), structlog.testing.capture_logs() as logs:
        await eventually(lambda: poller.state == "idle", 5)
        await asyncio.to_thread(dovecot.kill)
        await eventually(lambda: poller.state in ("backoff", "connecting") and poller.failures, 5)
        deliver_to_maildir(dovecot, sample("03-"))
        await asyncio.sleep(0.5)  # a few refused reconnects
        await asyncio.to_thread(dovecot.start)
        await eventually(lambda: blocked(store), 10)
        assert await blocked(store) == {BUYER_FR}
        await eventually(lambda: poller.state == "idle" and poller.failures == 0, 5)
        await stop(task)
    events = [e["event"] for e in logs]
    assert "imap_connection_failed" in events
    assert events.count("imap_connected") >= 2


@integration
async def test_hung_server_is_detected_and_recovered(
    dovecot: DovecotServer, store: Store, tmp_path: Path
) -> None:
    """A server that stops answering mid-IDLE is given up on and reconnected after it resumes."""
    await remember_relayed(store)
    account = make_account(dovecot, tmp_path, poll_interval=0.3, timeout=0.5)  # IDLE renews 1.5 s
    poller = ImapPoller(store, account, "INBOX", backoff=FAST)
    task = asyncio.create_task(poller.run_forever())
    with running(task):
        await eventually(lambda: poller.state == "idle", 5)
        dovecot.pause()
        try:
            await eventually(lambda: poller.failures >= 1, 6)
        finally:
            dovecot.resume()
        await asyncio.to_thread(dovecot.append, DEFAULT_USER, sample("03-"))
        await eventually(lambda: blocked(store), 8)
        await stop(task)


@integration
async def test_wrong_password_retries_with_backoff_and_never_raises(
    dovecot: DovecotServer, store: Store, tmp_path: Path
) -> None:
    """A refused login is logged clearly and retried with backoff; fixing it on the server heals."""
    account = make_account(dovecot, tmp_path, password="not-the-password")
    poller = ImapPoller(store, account, "INBOX", backoff=FAST)
    task = asyncio.create_task(poller.run_forever())
    with running(task), structlog.testing.capture_logs() as logs:
        await eventually(lambda: poller.failures >= 1, 5)
        assert poller.state in ("auth-failed", "connecting")
        refused = [e for e in logs if e["event"] == "imap_login_refused"]
        assert refused[0]["log_level"] == "error"
        assert refused[0]["error"].startswith(f"login refused for '{DEFAULT_USER}'")
        assert "not-the-password" not in repr(logs)
        # The operator fixes the server side; the next retry logs in. Dovecot's auth penalty
        # holds each retry from this IP for about 4.5 s (as a real server would).
        dovecot.add_user(DEFAULT_USER, "not-the-password")
        await eventually(lambda: poller.state == "idle", 10)
        assert poller.failures == 0 and poller.last_error is None
        await stop(task)


@integration
@pytest.mark.parametrize("why", ["server-lacks-idle", "idle-disabled"])
async def test_poll_mode_picks_up_new_notice(
    dovecot: DovecotServer, store: Store, tmp_path: Path, why: str
) -> None:
    """Without IDLE (server or config), a new notice is applied within one poll interval."""
    if why == "server-lacks-idle":
        await asyncio.to_thread(dovecot.set_idle_support, False)
    await remember_relayed(store)
    account = make_account(dovecot, tmp_path, poll_interval=0.5, idle=why != "idle-disabled")
    poller = ImapPoller(store, account, "INBOX")
    task = asyncio.create_task(poller.run_forever())
    with running(task):
        await eventually(lambda: poller.state == "polling", 5)
        await asyncio.to_thread(dovecot.append, DEFAULT_USER, sample("03-"))
        assert await eventually(lambda: blocked(store), 3) < 0.5 + 1.0
        await stop(task)


# ----- the command line -----------------------------------------------------------------------


def write_config(tmp_path: Path, server: DovecotServer, password: str) -> Path:
    secret = tmp_path / "imap.password"
    secret.write_text(password + "\n")
    path = tmp_path / "config.yaml"
    path.write_text(
        f"database: {tmp_path / 'mailrelay.db'}\nupstream:\n  maildir: {tmp_path / 'outbox'}\n"
        f"log: {{format: json, level: info}}\n"
        f"imap:\n  accounts:\n    - name: shop\n      host: {server.host}\n"
        f"      port: {server.port}\n      tls: off\n      username: {DEFAULT_USER}\n"
        f"      password_file: {secret}\n      timeout: 5s\n"
        f"      after_notice: move:{FOLDER}\n",
        encoding="utf-8",
    )
    return path


def poll_cli(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "mailrelay", "poll-once", "-c", str(config),
                           *extra], capture_output=True, text=True, env=env, timeout=30,
                          check=False, cwd=config.parent)


@integration
async def test_poll_once_command(dovecot: DovecotServer, tmp_path: Path) -> None:
    """`mailrelay poll-once` prints a summary and exits 0; a wrong password exits 1, one line."""
    seed(dovecot, noise=False)
    ok = await asyncio.to_thread(poll_cli, write_config(tmp_path, dovecot, DEFAULT_PASSWORD))
    assert ok.returncode == 0, ok.stderr
    assert ("shop/INBOX: 16 messages, 4 opt-out notices, 1 buyer blocked, 2 orders unresolved, "
            "3 buyer messages recorded, 0 errors") in ok.stdout
    assert "total: 16 messages" in ok.stdout
    with contextlib.closing(sqlite3.connect(tmp_path / "mailrelay.db")) as db:
        assert db.execute("SELECT count(*) FROM optout_orders").fetchone()[0] == 3

    bad = await asyncio.to_thread(poll_cli, write_config(tmp_path, dovecot, "wrong"))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"mailrelay: cannot poll shop/INBOX: login refused for '{DEFAULT_USER}': "
        "[AUTHENTICATIONFAILED] Authentication failed."
    ]
    unknown = await asyncio.to_thread(poll_cli, write_config(tmp_path, dovecot, "x"), "--account",
                                      "nope")
    assert (unknown.returncode, unknown.stderr.strip()) == (
        1, "mailrelay: no IMAP account named 'nope' in the config")


async def test_poll_once_unreachable_server(store: Store, tmp_path: Path) -> None:
    """Nothing listening: poll_once reports a failed summary instead of raising."""
    secret = tmp_path / "pw"
    secret.write_text("pw")
    account = ImapAccount.model_validate({
        "name": "down", "host": "127.0.0.1", "port": _free_port(), "tls": "off",
        "username": "u", "password_file": str(secret), "timeout": 2})
    [summary] = await poll_once(store, [account])
    assert not summary.ok and "Connect call failed" in (summary.failure or "")
    with pytest.raises(ValueError, match="no IMAP account named 'x'"):
        await poll_once(store, [account], "x")
