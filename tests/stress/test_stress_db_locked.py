"""Database locked: another process holds SQLite's write lock longer than the busy timeout.

The other storage fault, one that needs no privilege (test_stress_disk_full.py needs ``mount``):
a second connection (think of a backup tool or a stuck CLI) holds ``BEGIN EXCLUSIVE`` for 24 s,
longer than mailrelay's busy timeout (10 s) plus one turn of the delivery worker in front of the
SMTP commit. What is checked:

* a submission that cannot be committed gets ``451`` (temporary), at the latest when the lock has
  been held for two busy timeouts, and never ``250``: every 250 has its row in the database and
  every 451 has none and never reaches the upstream; the daemon stays up;
* once the lock is released, new messages get 250 and everything accepted is delivered once;
  the queue drains and SIGTERM still exits 0.

Figures printed (``pytest -s``): the replies and how long they took under the lock. Takes about
35 s, most of it the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from daemon_helpers import write_config
from sink import Sink
from stress_helpers import (
    daemon_running,
    identify,
    make_message,
    message_id,
    query,
    submit,
    wait_drained,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LOCK_SECONDS = 24.0
BUSY_TIMEOUT = 10.0  # mailrelay/store/db.py BUSY_TIMEOUT_MS


def hold_lock(database: Path, seconds: float, acquired: threading.Event) -> None:
    """Take SQLite's write lock from another connection and keep it for ``seconds``."""
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as conn:
        conn.execute("BEGIN EXCLUSIVE")
        acquired.set()
        time.sleep(seconds)
        conn.execute("COMMIT")


@pytest.mark.timeout(120)
async def test_locked_database_answers_451_never_250_and_recovers(
    tmp_path: Path, sink: Sink
) -> None:
    """A write lock held past the busy timeout gives 451s, never an unstored 250."""
    database = tmp_path / "mailrelay.db"
    config = write_config(tmp_path, sink.port, queue={"workers": 1})
    async with daemon_running(config) as runs:
        port = runs[0].port
        before = [f"before-{n}" for n in range(3)]
        for test_id in before:
            assert (await submit(port, test_id, make_message(test_id))).code == 250
        await sink.wait_for(len(before))

        acquired = threading.Event()
        locker = asyncio.create_task(asyncio.to_thread(hold_lock, database, LOCK_SECONDS,
                                                       acquired))
        await asyncio.to_thread(acquired.wait, 10)
        during = await asyncio.gather(*(submit(port, f"locked-{n}", make_message(f"locked-{n}"),
                                               timeout=60) for n in range(2)))
        await locker
        print(f"\n[locked] replies under a {LOCK_SECONDS:g}s lock: "
              f"{[(r.code, round(r.latency, 1)) for r in during]}")
        assert runs[-1].proc is not None and runs[-1].proc.poll() is None, "daemon died"
        assert all(r.outcome in ("accepted", "refused") for r in during), during
        assert {r.code for r in during} <= {250, 451} and any(r.code == 451 for r in during)
        assert all(r.latency < 2 * BUSY_TIMEOUT + 3 for r in during if r.code == 451), during
        for result in during:
            rows = query(database, "SELECT count(*) FROM queue WHERE message_id = ?",
                         (message_id(result.test_id),))
            assert rows[0][0] == (1 if result.code == 250 else 0), result

        after = [f"after-{n}" for n in range(3)]
        for test_id in after:
            assert (await submit(port, test_id, make_message(test_id))).code == 250
        expected = {*before, *after, *(r.test_id for r in during if r.code == 250)}
        await wait_drained(database, 30)
        await asyncio.sleep(1.0)
        states = query(database, "SELECT state, count(*) FROM queue GROUP BY state")
        assert await runs[-1].astop() == 0, runs[-1].output()[-3000:]
    delivered = Counter(identify(m.data) for m in sink.messages)
    assert delivered == Counter(dict.fromkeys(expected, 1)), delivered
    assert dict(states) == {"sent": len(expected)}, states
