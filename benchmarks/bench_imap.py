"""IMAP: scanning a big mailbox in a real Dovecot, and how fast IDLE turns a notice into a block.

1. Scan: a maildir of N messages (default 10,000, 5 % Amazon opt-out notices, the rest buyer
   messages and other mail from tests/data/samples with unique Message-IDs and orders) is
   written straight into Dovecot's maildir before Dovecot starts. Then ``ImapPoller.run_once``
   (what ``mailrelay poll-once`` runs) handles it: cold (Dovecot builds its index on SELECT,
   mailrelay's database is new), again with Dovecot's index warm and a new database, and a
   third no-op pass (nothing new). The default after_notice action (move to a folder) is on.
2. IDLE delay: the poller runs for ever in IDLE; a notice for an order whose buyer is known is
   APPENDed; the time until that buyer is on the blocklist is measured (median of --trials).

Prints figures, asserts nothing. Needs Dovecot (apt-get install dovecot-imapd) and root.
Usage: python benchmarks/bench_imap.py [-n 10000] [--notices 0.05] [--trials 10]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from dovecot import DEFAULT_PASSWORD, DEFAULT_USER, DovecotServer  # noqa: E402

from mailrelay.config import ImapAccount  # noqa: E402
from mailrelay.imap.poller import ImapPoller, PassSummary  # noqa: E402
from mailrelay.logs import setup_logging  # noqa: E402
from mailrelay.store import Store  # noqa: E402

SAMPLES = ROOT / "tests" / "data" / "samples"
NOTICE = (SAMPLES / "01-optout-bounce-en-2017.eml").read_bytes()
BUYER_MESSAGE = (SAMPLES / "13-buyer-question-en-classic-commMgrTok.eml").read_bytes()
OTHERS = [(SAMPLES / name).read_bytes() for name in (
    "13-buyer-question-en-classic-commMgrTok.eml", "14-buyer-question-en-modern-pluscase.eml",
    "21-buyer-message-es-mx.eml", "09-dsn-unauthorized-sender-5.7.1.eml",
    "10-rejection-guidelines-links.eml", "20-amazon-copy-confirmation.eml",
    "15-seller-reply-critical.eml", "18-seller-marketing-newsletter.eml",
)]
ORDER, BUYER_LOCAL = b"113-4829371-5562918", b"k7m2p9x4t1v8c3q"
MESSAGE_ID_RE = re.compile(rb"^Message-ID: *<[^>]*>", re.IGNORECASE | re.MULTILINE)


def order_id(n: int) -> bytes:
    return b"%03d-%07d-%07d" % (200 + n % 700, n, 5_000_000 + n)


def notice(n: int) -> bytes:
    """Sample 01 for order ``order_id(n)`` (a quoted-printable soft break splits its order id)."""
    order = order_id(n)
    raw = NOTICE.replace(b"[113-4829371-55629=\r\n18]", b"[%s=\r\n%s]" % (order[:17], order[17:]))
    assert raw != NOTICE
    return MESSAGE_ID_RE.sub(b"Message-ID: <optout-%d@amazon.com>" % n, raw, count=1)


def buyer_message(n: int) -> bytes:
    """Sample 13 from buyer ``buyer_local(n)`` about order ``order_id(n)``."""
    raw = BUYER_MESSAGE.replace(ORDER, order_id(n)).replace(BUYER_LOCAL, buyer_local(n))
    return MESSAGE_ID_RE.sub(b"Message-ID: <buyer-%d@amazon.example>" % n, raw, count=1)


def buyer_local(n: int) -> bytes:
    return b"bench%010d" % n


def other(n: int) -> bytes:
    raw = OTHERS[n % len(OTHERS)].replace(ORDER, order_id(n)).replace(BUYER_LOCAL, buyer_local(n))
    return MESSAGE_ID_RE.sub(b"Message-ID: <other-%d@bench.example>" % n, raw, count=1)


def fill_maildir(server: DovecotServer, count: int, share: float) -> int:
    """Write ``count`` messages into the user's INBOX maildir (cur/, unseen); returns notices."""
    maildir = server.root / "mail" / DEFAULT_USER / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    every = round(1 / share) if share else 0
    notices = 0
    stamp = int(time.time()) - count
    for n in range(count):
        is_notice = bool(every) and n % every == every - 1
        raw = notice(n) if is_notice else other(n)
        notices += is_notice
        (maildir / "cur" / f"{stamp + n}.M{n}P1.bench:2,").write_bytes(raw)
    for path in [maildir.parent, maildir, *maildir.rglob("*")]:
        shutil.chown(path, "dovecot", "dovecot")
    return notices


def account(server: DovecotServer, password_file: Path, **extra: object) -> ImapAccount:
    return ImapAccount.model_validate({
        "name": "bench", "host": "127.0.0.1", "port": server.port, "tls": "off",
        "username": DEFAULT_USER, "password_file": str(password_file), "timeout": "60s",
        **extra,
    })


async def timed_pass(acct: ImapAccount, db: Path) -> tuple[float, PassSummary]:
    store = await Store.open(db)
    try:
        started = time.perf_counter()
        summary = await ImapPoller(store, acct, "INBOX").run_once()
        return time.perf_counter() - started, summary
    finally:
        await store.close()


async def scan(count: int, share: float, work: Path) -> None:
    server = DovecotServer()
    try:
        server.add_user()
        password = work / "password"
        password.write_text(DEFAULT_PASSWORD)
        started = time.perf_counter()
        notices = fill_maildir(server, count, share)
        print(f"maildir: {count} messages ({notices} notices) written in "
              f"{time.perf_counter() - started:.1f}s")
        server.start()
        acct = account(server, password, after_notice="keep")
        rows = []
        for label, db in (("cold (Dovecot builds its index, new database)", "a.db"),
                          ("Dovecot index warm, new database", "b.db"),
                          ("no-op pass (same database, nothing new)", "b.db")):
            seconds, summary = await timed_pass(acct, work / db)
            rows.append((label, seconds, summary))
        moved = account(server, password)  # after_notice: move:Amazon/Opt-outs (the default)
        seconds, summary = await timed_pass(moved, work / "c.db")
        rows.append(("warm, new database, notices moved to a folder", seconds, summary))
        print("\n| pass | seconds | messages/s | seen | notices | buyer msgs |")
        print("|---|---|---|---|---|---|")
        for label, seconds, summary in rows:
            rate = f"{summary.seen / seconds:.0f}" if summary.seen else "-"
            print(f"| {label} | {seconds:.2f} | {rate} | {summary.seen} | {summary.notices} | "
                  f"{summary.buyer_messages} |")
    finally:
        server.cleanup()


async def wait_blocked(store: Store, poller: ImapPoller, key: str,
                       timeout: float = 30.0) -> tuple[float, float]:
    """(when the poller left IDLE, when ``key`` was on the blocklist), perf_counter clock."""
    deadline = time.perf_counter() + timeout
    woke = 0.0
    while time.perf_counter() < deadline:
        if not woke and poller.state != "idle":
            woke = time.perf_counter()
        if await store.optout.blocked([key]):
            return woke or time.perf_counter(), time.perf_counter()
        await asyncio.sleep(0.002)
    raise TimeoutError(f"{key} not blocked after {timeout}s")


async def wait_state(poller: ImapPoller, state: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while poller.state != state:
            await asyncio.sleep(0.005)


async def idle_delay(trials: int, work: Path) -> None:
    server = DovecotServer()
    try:
        server.add_user()
        server.start()
        password = work / "password"
        password.write_text(DEFAULT_PASSWORD)
        for n in range(trials):  # the buyers are known before their notices arrive
            server.append(DEFAULT_USER, buyer_message(900_000 + n))
        store = await Store.open(work / "idle.db")
        poller = ImapPoller(store, account(server, password, poll_interval="60s"), "INBOX")
        task = asyncio.create_task(poller.run_forever())
        delays, wakes = [], []
        try:
            for n in range(trials):
                await wait_state(poller, "idle")
                await asyncio.sleep(0.2)  # the IDLE command itself is on the wire
                key = buyer_local(900_000 + n).decode() + "@marketplace.amazon.com"
                started = time.perf_counter()
                await asyncio.to_thread(server.append, DEFAULT_USER, notice(900_000 + n))
                woke, blocked = await wait_blocked(store, poller, key)
                delays.append(blocked - started)
                wakes.append(woke - started)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()
        ms = sorted(d * 1000 for d in delays)
        print(f"\nIDLE: APPEND of a notice to buyer blocked, {trials} trials: median "
              f"{statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms")
        print("  all (ms): " + ", ".join(f"{d:.0f}" for d in ms))
        print(f"  of which until the IDLE push ended the wait: median "
              f"{statistics.median(wakes) * 1000:.0f} ms (Dovecot's own change notification)")
    finally:
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="messages in the mailbox")
    parser.add_argument("--notices", type=float, default=0.05, help="share of opt-out notices")
    parser.add_argument("--trials", type=int, default=10, help="IDLE delay measurements")
    parser.add_argument("--log-level", default="warning", help="mailrelay's log level (stderr)")
    args = parser.parse_args()
    setup_logging("json", args.log_level, stream=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    try:
        asyncio.run(scan(args.n, args.notices, work))
        asyncio.run(idle_delay(args.trials, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
