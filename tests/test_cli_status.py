"""`mailrelay status` over a prepared database: the screen an operator reads, and its JSON.

The database is filled through the store's own API (queue, blocklist, notices, IMAP passes, audit
records), as the daemon would have; the command runs in-process for speed, and once as a real
subprocess.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_store import buyer, cli_env, new_message, run_cli, run_cli_here, write_config

from mailrelay.cli.common import iso
from mailrelay.policy.addresses import parse_buyer_address
from mailrelay.store import Store
from mailrelay.store.records import Attempt, AuditRecord, MessageState

ORDER = "111-1111111-1111111"
UNRESOLVED_ORDER = "222-2222222-2222222"
IMAP = """imap:
  accounts:
    - name: shop
      host: 127.0.0.1
      port: 1143
      tls: off
      username: seller@shop.test
      password_env: STATUS_TEST_IMAP_PASSWORD
      mailboxes: [INBOX, Archive]
"""


def key(n: int) -> str:
    parsed = parse_buyer_address(buyer(n))
    assert parsed is not None
    return parsed.key


@dataclass(frozen=True)
class Prepared:
    config: Path
    db: Path
    now: float


async def _fill(db: Path, now: float) -> None:
    """Two queued, one sent, one failed, one quarantined; one cancelled by a block; notices,
    passes and drops, some older than a day."""
    store = await Store.open(db)
    try:
        ids = await store.queue.enqueue([
            new_message(1),
            new_message(2, (buyer(2),), cls="non-critical", buyer_keys=(key(2),)),
            new_message(3),
            new_message(4),
            new_message(5, (buyer(5),), buyer_keys=(key(5),),
                        states=(MessageState.QUARANTINED,)),
        ], now=now - 900)
        await store.queue.record_attempt(ids[2], [Attempt("someone@example.com", "sent")],
                                         now - 800, None)
        await store.queue.record_attempt(ids[3], [Attempt("someone@example.com", "failed",
                                                          "550 no such user")], now - 800, None)
        await store.optout.block(key(2), "manual", "asked by phone", now=now - 500)  # cancels #2
        await store.optout.block(key(7), "import", "old list", now=now - 400)
        await store.optout.apply_notice(UNRESOLVED_ORDER, "<n1@amazon.test>", None, now - 7200)
        await store.optout.apply_notice(ORDER, "<n2@amazon.test>", key(9), now - 3600)
        await store.set_imap_state("shop", "INBOX", 7, 42, now - 600)
        await store.set_imap_state("old", "INBOX", 3, 9, now - 3 * 86400)
        await store.audit([AuditRecord("reject", now - 100), AuditRecord("reject", now - 200),
                           AuditRecord("discard", now - 300), AuditRecord("deliver", now - 50),
                           AuditRecord("quarantine", now - 2 * 86400)])
    finally:
        await store.close()


@pytest.fixture
def prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Prepared:
    monkeypatch.setenv("STATUS_TEST_IMAP_PASSWORD", "not-used")
    db = tmp_path / "state" / "mailrelay.db"
    now = time.time()
    asyncio.run(_fill(db, now))
    return Prepared(write_config(tmp_path, db, IMAP), db, now)


def test_status_text_is_one_screen_of_the_facts(prepared: Prepared) -> None:
    """Queue by state, blocklist size, the last notice, each mailbox's last pass (configured but
    never polled, and no longer configured, both said), and the drops of the last 24 hours."""
    result = run_cli_here("status", "-c", prepared.config)
    assert result.returncode == 0, result.stderr
    now = prepared.now
    assert result.stdout.splitlines() == [
        f"database:     {prepared.db}",
        "queue:        1 queued, 0 sending, 0 deferred, 1 failed, 1 quarantined",
        "              (done: 1 sent, 1 cancelled, 0 dropped)",
        "blocklist:    3 buyer(s)",
        f"last notice:  {iso(now - 3600)} (1h ago), order {ORDER}, buyer {key(9)}",
        f"imap:         shop/INBOX: last pass {iso(now - 600)} (10m ago)",
        "              shop/Archive: never polled",
        f"              old/INBOX: last pass {iso(now - 3 * 86400)} (3d ago) "
        "(no longer in the config)",
        "drops (24 h): 2 rejected, 1 discarded, 0 quarantined, 1 cancelled",
    ]


def test_status_json_has_the_same_facts(prepared: Prepared) -> None:
    """--json: every queue state, blocklist size, last notice, mailboxes, drops since a day ago."""
    result = run_cli_here("status", "--json", "-c", prepared.config)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    now = prepared.now
    assert data["database"] == str(prepared.db)
    assert data["queue"] == {"queued": 1, "sending": 0, "deferred": 0, "sent": 1, "failed": 1,
                             "cancelled": 1, "quarantined": 1, "dropped": 0}
    assert data["blocklist_size"] == 3
    assert data["last_notice"] == {"received": iso(now - 3600), "order_id": ORDER,
                                   "buyer_key": key(9), "notice_message_id": "<n2@amazon.test>"}
    assert data["imap"] == [
        {"account": "shop", "mailbox": "INBOX", "last_pass": iso(now - 600), "last_uid": 42,
         "configured": True},
        {"account": "shop", "mailbox": "Archive", "last_pass": None, "last_uid": 0,
         "configured": True},
        {"account": "old", "mailbox": "INBOX", "last_pass": iso(now - 3 * 86400), "last_uid": 9,
         "configured": False},
    ]
    since = data["drops"].pop("since")
    assert abs(since_seconds(since) - (now - 86400)) <= 2
    assert data["drops"] == {"reject": 2, "discard": 1, "quarantine": 0, "cancel": 1}


def since_seconds(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def test_status_of_a_fresh_database(tmp_path: Path) -> None:
    """A new install: zeros everywhere, no notice yet, no IMAP account; as a real process."""
    config = write_config(tmp_path)
    result = run_cli("status", "-c", config, cwd=tmp_path, env=cli_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:] == [
        "queue:        0 queued, 0 sending, 0 deferred, 0 failed, 0 quarantined",
        "              (done: 0 sent, 0 cancelled, 0 dropped)",
        "blocklist:    0 buyer(s)",
        "last notice:  none yet",
        "imap:         no accounts configured",
        "drops (24 h): 0 rejected, 0 discarded, 0 quarantined, 0 cancelled",
    ]
