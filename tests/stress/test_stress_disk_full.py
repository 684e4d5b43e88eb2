"""Disk full: the database lives on a 3 MB tmpfs that the test fills up, then frees again.

What is checked (design.md "Guarantees": 250 means the message is committed):

* while the disk is full the relay answers ``451`` (temporary) for what it cannot store, and
  never ``250``: every submission that got a 250 has its row in the database (read from the
  outside), every one that got a 451 has none and never reaches the upstream; the daemon stays up;
* messages accepted before the fault survive it and are delivered once the disk has room again:
  the disk fills while two of them are in flight to the upstream (the sink holds its reply), so
  the workers must record those attempts' outcome (451, deferred) on a full disk. That used to
  kill both delivery workers silently: the daemon went on answering 250 and never delivered
  again until restarted (fixed in smtp/delivery.py: the outcome is recorded again until the
  database takes it, and a store error no longer ends a worker);
* after the space returns, new messages get 250 again and are delivered; the queue drains and
  nothing is failed; SIGTERM still exits 0.

How the fault is made: as root ``chmod`` does not stop writes, so the test mounts its own tmpfs
(``mount -t tmpfs -o size=3m``), puts the database there, and fills the rest with a file. A
message that still fits in space SQLite already owns (a WAL file reuses its pages) may get its
250 legitimately: the check is "no 250 without a stored row", plus "at least one 451", since
the fault must really have been hit. If mounting is not permitted the test is skipped and says
so; test_stress_db_locked.py covers a fault that needs no privilege (a lock held too long).

Figures printed (``pytest -s``): replies during the fault, time to recover. Takes about 15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import write_config
from stress_helpers import (
    OutageSink,
    daemon_running,
    identify,
    log_events,
    make_message,
    message_id,
    query,
    submit,
    wait_drained,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIG = 4000  # body lines: about 380 KB per message, more than the WAL can absorb on a full disk
DEFER = "451 4.3.0 Upstream busy, try later"
FULL_SECONDS = 6.0  # longer than a retry (retry_max 2 s + 1 s poll): workers hit the full disk
FULL_SUBMISSIONS = 8
WORKERS = 2


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs of our own, unmounted afterwards (lazily if something still holds it)."""
    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "tmpfs",
                           str(where)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the locked-database "
                    "test covers the storage fault instead")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the file system says ENOSPC; returns the bytes written."""
    written = 0
    chunk = bytes(16 * 1024)
    with path.open("wb", buffering=0) as out:
        while True:
            try:
                written += out.write(chunk) or 0
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        with contextlib.suppress(OSError):
            while out.write(b"\0"):  # the last few bytes of a block
                written += 1
    return written


def stored(database: Path, test_id: str) -> bool:
    rows = query(database, "SELECT count(*) FROM queue WHERE message_id = ?",
                 (message_id(test_id),))
    return rows[0][0] == 1


@pytest.mark.timeout(120)
async def test_disk_full_answers_451_never_250_and_recovers(
    tmp_path: Path, small_disk: Path, outage_sink: OutageSink
) -> None:
    """A full disk gives 451s, never a 250 without a stored row; all flows again after."""
    sink = outage_sink
    database = small_disk / "mailrelay.db"
    config = write_config(tmp_path, sink.port, database=str(database),
                          queue={"workers": WORKERS})
    sink.handler.data_reply = DEFER  # keeps the first messages queued through the fault
    async with daemon_running(config) as runs:
        port = runs[0].port
        before = [f"before-{n}" for n in range(5)]
        sink.handler.hold = asyncio.Event()  # the disk fills while deliveries are in flight
        for test_id in before:
            assert (await submit(port, test_id, make_message(test_id))).code == 250
        await wait_until(lambda: sink.handler.holding == WORKERS, 15, "deliveries in flight")
        filler = small_disk / "filler"
        filled = await asyncio.to_thread(fill, filler)
        sink.handler.hold.set()  # their outcome (451) must now be recorded on a full disk
        sink.handler.hold = None
        during = []
        for n in range(FULL_SUBMISSIONS):  # spread over the fault: the workers retry meanwhile
            test_id = f"full-{n}"
            during.append(await submit(port, test_id, make_message(test_id, BIG), timeout=30))
            await asyncio.sleep(FULL_SECONDS / FULL_SUBMISSIONS)
        replies = Counter(r.code for r in during)
        print(f"\n[disk] filled {filled / 1e6:.1f} MB; replies while full: {dict(replies)}")
        assert runs[-1].proc is not None and runs[-1].proc.poll() is None, "daemon died"
        assert all(r.outcome in ("accepted", "refused") for r in during), during
        assert set(replies) <= {250, 451} and replies[451] >= 1, during
        for result in during:
            assert stored(database, result.test_id) == (result.code == 250), result
        assert all(stored(database, test_id) for test_id in before)

        filler.unlink()  # the space returns
        sink.handler.data_reply = "250 2.0.0 OK queued"
        after = [f"after-{n}" for n in range(5)]
        for test_id in after:
            result = await submit(port, test_id, make_message(test_id))
            assert result.code == 250, result
        expected = {*before, *after, *(r.test_id for r in during if r.code == 250)}
        recovered = await wait_drained(database, 30)
        await asyncio.sleep(1.0)
        states = query(database, "SELECT state, count(*) FROM queue GROUP BY state")
        assert await runs[-1].astop() == 0, runs[-1].output()[-3000:]
    faults = {e: len(log_events(runs, e)) for e in ("store_failed", "queue_claim_failed")}
    print(f"[disk] queue drained {recovered:.1f}s after the space returned; daemon log: {faults}")
    delivered = Counter(identify(m.data, BIG if m.data.count(b"\r\n") > 1000 else 8)
                        for m in sink.messages)
    assert delivered == Counter(dict.fromkeys(expected, 1)), delivered
    assert dict(states) == {"sent": len(expected)}, states
