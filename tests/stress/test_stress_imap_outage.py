"""IMAP outage: Dovecot stops while the poller is in IDLE, notices keep arriving, Dovecot returns.

What is checked (design.md "Guarantees": IMAP messages are handled once per UIDVALIDITY, and a
lost connection is retried with backoff and never stops the SMTP side):

* six opt-out notices, for six buyers the relay had sent feedback requests to: two arrive before
  the outage, two are written straight into the maildir while Dovecot is down, two are appended
  after it is back. Every one is applied exactly once: six buyers on the blocklist, one ``block``
  audit record each, ``first_seen == last_seen`` (a second application would move ``last_seen``),
  one ``imap_handled`` row and one ``imap_optout_notice`` log line per notice. The notices stay
  in INBOX, flagged (``after_notice: flag``), so the two handled before the outage are still
  there when the poller reconnects: it must resume after the stored UID, not apply them again;
* the poller noticed the outage (connection failures logged) and reconnected by itself;
* the SMTP side never stalls: during the outage two clients keep submitting, one connection per
  message; every ordinary message gets its 250 within 2 s (connect included), all of them are
  delivered, and a feedback request to an already blocked buyer is still refused (550) at once,
  from the local blocklist.

Figures printed (``pytest -s``): submissions during the outage and their latency (max, median),
how long after Dovecot's restart the last notice was applied. Takes about 30 s.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import shutil
import statistics
import time
from pathlib import Path

import pytest
from daemon_helpers import write_config
from dovecot import DEFAULT_PASSWORD, DEFAULT_USER, DovecotServer
from sink import Sink
from stress_helpers import (
    Submission,
    daemon_running,
    identify,
    log_events,
    make_message,
    query,
    submit,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
SAMPLE_ORDER = "113-4829371-5562918"
SAMPLE_BUYER = "k7m2p9x4t1v8c3q@marketplace.amazon.com"
BUYERS = [f"strs{n}q8w2e6r4t0y@marketplace.amazon.com" for n in range(6)]
ORDERS = [f"114-{n:07d}-{n * 7919:07d}" for n in range(1, 7)]
OUTAGE = 10.0
MAX_SUBMIT = 2.0


def feedback_request(buyer: str, order: str) -> bytes:
    raw = (SAMPLES / "16-seller-feedback-request.eml").read_bytes()
    raw = raw.replace(SAMPLE_BUYER.encode(), buyer.encode())
    raw = raw.replace(SAMPLE_ORDER.encode(), order.encode())
    return raw.replace(b"<fb-req-", f"<fb-{buyer[:5]}-".encode())


def notice(n: int) -> bytes:
    """Amazon's opt-out notice for ORDERS[n] (sample 01 with another order and Message-ID)."""
    raw = (SAMPLES / "01-optout-bounce-en-2017.eml").read_bytes()
    message = email.message_from_bytes(raw, policy=email.policy.SMTP)
    body = message.get_content().replace(SAMPLE_ORDER, ORDERS[n])
    message.replace_header("Message-ID", f"<optout-stress-{n}@amazon.com>")
    message.set_content(body, cte="quoted-printable")
    return message.as_bytes()


def drop_into_maildir(server: DovecotServer, raw: bytes, n: int) -> None:
    """Deliver into INBOX the way an MDA does while Dovecot is down: tmp/, then rename to new/."""
    maildir = server.root / "mail" / DEFAULT_USER / "Maildir"
    name = f"{time.time():.0f}.M{n}P{os.getpid()}.stress"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(raw.replace(b"\r\n", b"\n"))
    shutil.chown(tmp, "dovecot", "dovecot")
    tmp.rename(maildir / "new" / name)


async def keep_submitting(port: int, until: float, worker: int) -> list[Submission]:
    """Ordinary messages one after another; every 10th is a feedback request to BUYERS[0]."""
    results = []
    n = 0
    while time.monotonic() < until:
        if n % 10 == 9:
            raw = feedback_request(BUYERS[0], ORDERS[0]).replace(b"<fb-", f"<x{n}-".encode())
            results.append(await submit(port, f"blocked-{worker}-{n}", raw, rcpt=BUYERS[0]))
        else:
            test_id = f"during-{worker}-{n}"
            results.append(await submit(port, test_id, make_message(test_id)))
        n += 1
    return results


@pytest.mark.timeout(120)
async def test_imap_outage_applies_every_notice_once_and_smtp_keeps_flowing(
    tmp_path: Path, dovecot: DovecotServer, sink: Sink
) -> None:
    """Dovecot down for 10 s during IDLE: notices applied once each, submissions stay fast."""
    password_file = tmp_path / "imap.password"
    password_file.write_text(DEFAULT_PASSWORD)
    config = write_config(tmp_path, sink.port, imap={"accounts": [{
        "name": "seller", "host": "127.0.0.1", "port": dovecot.port, "tls": "off",
        "username": DEFAULT_USER, "password_file": str(password_file),
        "poll_interval": "2s", "timeout": "5s", "after_notice": "flag"}]})
    database = tmp_path / "mailrelay.db"

    def blocked() -> set[str]:
        return {r[0] for r in query(database, "SELECT buyer_key FROM blocklist")}

    async with daemon_running(config) as runs:
        port = runs[0].port
        for buyer, order in zip(BUYERS, ORDERS, strict=True):  # the orders' buyers become known
            result = await submit(port, buyer, feedback_request(buyer, order), rcpt=buyer)
            assert result.outcome == "accepted", result
        await sink.wait_for(len(BUYERS))
        for n in (0, 1):
            await asyncio.to_thread(dovecot.append, DEFAULT_USER, notice(n))
        await wait_until(lambda: blocked() == set(BUYERS[:2]), 15, "the first two blocks")
        await asyncio.sleep(1.0)  # the poller is back in IDLE

        await asyncio.to_thread(dovecot.stop)
        for n in (2, 3):
            drop_into_maildir(dovecot, notice(n), n)
        until = time.monotonic() + OUTAGE
        during = [r for rs in await asyncio.gather(*(keep_submitting(port, until, w)
                                                     for w in range(2))) for r in rs]
        assert blocked() == set(BUYERS[:2])  # nothing can be learned while Dovecot is down

        await asyncio.to_thread(dovecot.start)
        restarted = time.monotonic()
        for n in (4, 5):
            await asyncio.to_thread(dovecot.append, DEFAULT_USER, notice(n))
        await wait_until(lambda: blocked() == set(BUYERS), 30, "all six blocks")
        applied_after = time.monotonic() - restarted
        await asyncio.sleep(2.0)  # a second application would show up now
        accepted = {r.test_id for r in during if r.outcome == "accepted"}
        await wait_until(lambda: accepted <= _delivered(sink), 15, "the outage's messages")
        assert await runs[-1].astop() == 0, runs[-1].output()[-3000:]

    report_latency(during, applied_after)
    check_notices_applied_once(database, runs, dovecot)


def _delivered(sink: Sink) -> set[str]:
    found = set()
    for message in sink.messages:
        try:
            found.add(identify(message.data))
        except ValueError:  # the feedback requests: not ours to check here
            continue
    return found


def report_latency(during: list[Submission], applied_after: float) -> None:
    ordinary = [r for r in during if r.test_id.startswith("during-")]
    refused = [r for r in during if r.test_id.startswith("blocked-")]
    latencies = [r.latency for r in during]
    print(f"\n[imap] {len(during)} submissions while Dovecot was down: max "
          f"{max(latencies):.3f}s, median {statistics.median(latencies):.3f}s; last notice "
          f"applied {applied_after:.1f}s after Dovecot's restart")
    assert len(ordinary) >= 20, len(ordinary)
    assert all(r.outcome == "accepted" for r in ordinary), [r for r in ordinary
                                                           if r.outcome != "accepted"][:5]
    assert refused and all(r.code == 550 for r in refused), refused
    assert max(latencies) < MAX_SUBMIT, sorted(latencies)[-5:]


def check_notices_applied_once(database: Path, runs: list, dovecot: DovecotServer) -> None:
    entries = query(database, "SELECT buyer_key, source, first_seen, last_seen FROM blocklist")
    assert sorted(e[0] for e in entries) == sorted(BUYERS)
    assert all(source == "notice" and first == last for _, source, first, last in entries), \
        entries
    audits = query(database, "SELECT buyer_key, count(*) FROM audit WHERE action = 'block' "
                             "GROUP BY buyer_key")
    assert dict(audits) == dict.fromkeys(BUYERS, 1), audits
    handled = query(database, "SELECT message_id, kind FROM imap_handled WHERE kind = 'optout'")
    assert sorted(m for m, _ in handled) == sorted(f"<optout-stress-{n}@amazon.com>"
                                                   for n in range(6))
    applied = log_events(runs, "imap_optout_notice")
    assert sorted(e["message_id"] for e in applied) == sorted(m for m, _ in handled), applied
    assert log_events(runs, "imap_connection_failed"), "the outage went unnoticed"
    assert len(log_events(runs, "imap_connected")) >= 2, "the poller never reconnected"
    inbox = dovecot.fetch_all(DEFAULT_USER)
    notices = [(uid, flags) for uid, flags, raw in inbox if b"optout-stress-" in raw]
    assert len(notices) == 6 and all("\\Flagged" in flags for _, flags in notices), notices
