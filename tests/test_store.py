"""The SQLite store on real files: migrations, concurrency, the queue, opt-outs, crash safety."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiosqlite
import pytest
from helpers_store import (
    blocklist_keys,
    buyer,
    cli_env,
    new_message,
    raw_message,
    run_cli,
    sha,
    sql,
    write_config,
)

from mailrelay.store import Store, StoreError
from mailrelay.store.db import migrate
from mailrelay.store.records import (
    Attempt,
    BuyerMessageRecord,
    MessageState,
    RelayedRecord,
)
from mailrelay.store.schema import SCHEMA_VERSION

T0 = 1_700_000_000.0
ORDER = "403-4565603-0457311"
OTHER_ORDER = "171-1234567-7654321"


def schema_of(db: Path) -> list[tuple[object, ...]]:
    return sql(db, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")


def file_digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


def rcpt_states(message: object) -> dict[str, str]:
    return {r.rcpt: r.state for r in message.recipients}  # type: ignore[attr-defined]


# --- migrations --------------------------------------------------------------------------------

async def test_new_database_is_created_at_current_version(db_path: Path) -> None:
    """Opening a path that does not exist creates it (and its directory) at SCHEMA_VERSION."""
    store = await Store.open(db_path)
    try:
        assert await store.db.schema_version() == SCHEMA_VERSION
        assert await store.optout.size() == 0
    finally:
        await store.close()
    assert sql(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_empty_file_is_migrated(db_path: Path) -> None:
    """An existing zero-byte file (touch'ed by an installer) is migrated, not refused."""
    db_path.parent.mkdir(parents=True)
    db_path.touch()
    store = await Store.open(db_path)
    await store.close()
    assert sql(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def _write_version_data(conn: aiosqlite.Connection, version: int) -> None:
    """Rows a user had at ``version``: a blocked buyer and a queued message."""
    if version >= 1:
        await conn.execute(
            "INSERT INTO blocklist (buyer_key, marketplace, source, reason, evidence, "
            "first_seen, last_seen) VALUES (?, 'US', 'manual', 'old', '{}', ?, ?)",
            (buyer(1), T0, T0))
        await conn.execute(
            "INSERT INTO queue (id, mail_from, size, raw, state, created, next_attempt) "
            "VALUES ('OLD1', 'seller@example.com', ?, ?, 'queued', ?, ?)",
            (len(raw_message(1)), raw_message(1), T0, T0))
        await conn.execute(
            "INSERT INTO queue_rcpt (queue_id, rcpt, state, updated) "
            "VALUES ('OLD1', 'someone@example.com', 'queued', ?)", (T0,))
    if version >= 2:
        await conn.execute(
            "INSERT INTO imap_handled VALUES ('seller', 'INBOX', '<old@amazon>', 'notice', ?)",
            (T0,))


@pytest.mark.parametrize("version", range(SCHEMA_VERSION + 1))
async def test_migrates_from_each_earlier_version(tmp_path: Path, version: int) -> None:
    """A database left at any version k is brought to SCHEMA_VERSION with its data intact."""
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    async with aiosqlite.connect(old, isolation_level=None) as conn:
        assert await migrate(conn, target=version) == version
        await _write_version_data(conn, version)
    assert sql(old, "PRAGMA user_version") == [(version,)]

    store = await Store.open(old)
    try:
        assert await store.db.schema_version() == SCHEMA_VERSION
        if version >= 1:
            assert [e.buyer_key for e in await store.optout.entries()] == [buyer(1)]
            message = await store.queue.get("OLD1", with_raw=True)
            assert message is not None and message.raw == raw_message(1)
            assert [m.id for m in await store.queue.claim_due(T0)] == ["OLD1"]
        if version >= 2:
            assert await store.imap_handled("seller", "INBOX", ["<old@amazon>"]) == {
                "<old@amazon>"}
        # Features of the newest version work on the migrated file.
        await store.mark_imap_handled("seller", "INBOX", "<new@amazon>", "notice", T0)
    finally:
        await store.close()
    await _create_fresh(fresh)
    assert schema_of(old) == schema_of(fresh)


async def _create_fresh(path: Path) -> None:
    """A database created at the current version, to compare a migrated one with."""
    store = await Store.open(path)
    await store.close()


async def test_reopening_changes_nothing(db_path: Path) -> None:
    """Opening an up-to-date database again leaves its schema and data as they were."""
    store = await Store.open(db_path)
    await store.optout.block(buyer(1), "manual", now=T0)
    await store.close()
    before = schema_of(db_path)
    store = await Store.open(db_path)
    try:
        assert await store.db.schema_version() == SCHEMA_VERSION
        assert await store.optout.blocked([buyer(1)]) == {buyer(1)}
    finally:
        await store.close()
    assert schema_of(db_path) == before


async def test_newer_database_is_refused_and_not_modified(db_path: Path) -> None:
    """A database from a newer mailrelay is refused with StoreError and left byte-identical."""
    store = await Store.open(db_path)
    await store.optout.block(buyer(1), "manual", now=T0)
    await store.close()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = file_digest(db_path)
    with pytest.raises(StoreError, match="newer than this mailrelay understands"):
        await Store.open(db_path)
    assert file_digest(db_path) == before
    assert sql(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert blocklist_keys(db_path) == [buyer(1)]


async def test_newer_rollback_journal_database_is_not_modified(db_path: Path) -> None:
    """A newer database that is not in WAL mode is refused without being switched to WAL."""
    db_path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute("INSERT INTO future VALUES (1)")
        conn.commit()
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    before = file_digest(db_path)
    with pytest.raises(StoreError):
        await Store.open(db_path)
    assert file_digest(db_path) == before


async def test_failed_migration_leaves_database_as_it_was(tmp_path: Path) -> None:
    """A migration that fails half-way is rolled back: version and schema are unchanged."""
    if SCHEMA_VERSION < 2:
        pytest.skip("needs at least two schema versions")
    path = tmp_path / "half.db"
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await migrate(conn, target=1)
        # An object the next migration wants to create already exists: it must fail cleanly.
        await conn.execute("CREATE TABLE imap_handled (x)")
    before = schema_of(path)
    with pytest.raises((StoreError, sqlite3.Error)):
        await Store.open(path)
    assert sql(path, "PRAGMA user_version") == [(1,)]
    assert schema_of(path) == before


# --- concurrency -------------------------------------------------------------------------------

async def test_two_stores_write_concurrently(db_path: Path) -> None:
    """Two Stores on one file, many concurrent writes each: every row lands, no lock error."""
    first, second = await Store.open(db_path), await Store.open(db_path)
    try:
        async def one_by_one(store: Store, base: int) -> list[str]:
            ids = []
            for n in range(base, base + 60):
                ids += await store.queue.enqueue([new_message(n)], now=T0)
                await store.optout.block(buyer(n), "manual", now=T0)
            return ids

        async def all_at_once(store: Store, base: int) -> list[str]:
            batches = await asyncio.gather(*(
                store.queue.enqueue([new_message(n)], now=T0) for n in range(base, base + 100)))
            return [i for batch in batches for i in batch]

        results = await asyncio.gather(
            one_by_one(first, 0), one_by_one(second, 1000),
            all_at_once(first, 2000), all_at_once(second, 3000),
            first.optout.block_many([buyer(n) for n in range(5000, 5100)], "import", "", T0),
            second.optout.block_many([buyer(n) for n in range(6000, 6100)], "import", "", T0),
        )
    finally:
        await first.close()
        await second.close()
    ids = [i for r in results[:4] for i in r]
    assert len(ids) == len(set(ids)) == 60 + 60 + 100 + 100
    stored = {r[0]: r[1] for r in sql(db_path, "SELECT id, raw FROM queue")}
    assert set(stored) == set(ids)
    assert len(blocklist_keys(db_path)) == 60 + 60 + 100 + 100
    assert sql(db_path, "PRAGMA integrity_check") == [("ok",)]


async def test_cli_writes_while_a_reader_holds_a_transaction(tmp_path: Path,
                                                             db_path: Path) -> None:
    """`blocklist add` succeeds while another connection sits in a read transaction."""
    config = write_config(tmp_path, db_path)
    store = await Store.open(db_path)
    await store.close()
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM blocklist").fetchone() == (0,)
        started = time.monotonic()
        result = run_cli("blocklist", "add", "-c", config, buyer(7), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 5  # it did not sit out the busy timeout
        # The reader keeps its snapshot until it ends its transaction.
        assert reader.execute("SELECT count(*) FROM blocklist").fetchone() == (0,)
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM blocklist").fetchone() == (1,)


async def test_cli_waits_for_a_short_write_lock(tmp_path: Path, db_path: Path) -> None:
    """`blocklist add` waits out another process's brief write transaction instead of failing."""
    config = write_config(tmp_path, db_path)
    store = await Store.open(db_path)
    await store.close()
    locked = threading.Event()

    def hold_write_lock() -> None:
        with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO audit (at, action) VALUES (0, 'test')")
            locked.set()
            time.sleep(0.7)
            conn.execute("COMMIT")

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    locked.wait(5)
    result = run_cli("blocklist", "add", "-c", config, buyer(8), cwd=tmp_path)
    holder.join()
    assert result.returncode == 0, result.stderr
    assert blocklist_keys(db_path) == [buyer(8)]


async def test_cli_writes_while_the_daemon_store_is_open(tmp_path: Path, db_path: Path) -> None:
    """While the daemon's Store is open and writing, `blocklist add` blocks and cancels."""
    config = write_config(tmp_path, db_path)
    store = await Store.open(db_path)
    try:
        key = buyer(9)
        [queued] = await store.queue.enqueue(
            [new_message(1, (f"{key[:15]}+case-1@marketplace.amazon.com",), cls="non-critical",
                         buyer_keys=(key,))], now=T0)
        stop = asyncio.Event()
        written: list[str] = []

        async def daemon_writes() -> None:
            n = 100
            while not stop.is_set():
                written.extend(await store.queue.enqueue([new_message(n)], now=T0))
                n += 1

        writer = asyncio.create_task(daemon_writes())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailrelay", "blocklist", "add", "-c", str(config),
            key.upper(), cwd=tmp_path, env=cli_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        stop.set()
        await writer
        assert proc.returncode == 0, err.decode()
        assert "cancelled 1 queued non-critical" in out.decode()
        # The daemon sees the CLI's write at once, through its own open connections.
        assert await store.optout.blocked([key]) == {key}
        message = await store.queue.get(queued)
        assert message is not None and message.state == MessageState.CANCELLED
        assert written and len(await store.queue.list(limit=10_000)) == len(written) + 1
    finally:
        await store.close()


# --- the queue -----------------------------------------------------------------------------------

async def test_enqueue_returns_ids_after_commit(store: Store, db_path: Path) -> None:
    """When enqueue returns, another process already sees the message with its exact bytes."""
    message = new_message(1, ("a@example.com", "b@example.com"))
    [queue_id] = await store.queue.enqueue([message], now=T0)
    rows = sql(db_path, "SELECT raw, state, size, mail_from FROM queue WHERE id = ?", (queue_id,))
    assert rows == [(message.raw, "queued", len(message.raw), "seller@example.com")]
    assert sql(db_path, "SELECT rcpt FROM queue_rcpt WHERE queue_id = ? ORDER BY rcpt",
               (queue_id,)) == [("a@example.com",), ("b@example.com",)]


async def test_enqueue_several_messages_and_references(store: Store) -> None:
    """One enqueue may hold several bodies; `#N` in audits and relayed records names the N-th."""
    key = buyer(1)
    ids = await store.queue.enqueue(
        [new_message(1), new_message(2, (key,), cls="critical", buyer_keys=(key,))],
        relayed=[RelayedRecord(key, ORDER, "<m2@example.com>", T0, "#1")], now=T0)
    assert len(ids) == 2 and ids[0] != ids[1]
    assert await store.optout.buyers_for_order(ORDER) == [key]
    second = await store.queue.get(ids[1], with_raw=True)
    assert second is not None and second.raw == raw_message(2)


async def test_group_commit(store: Store, db_path: Path) -> None:
    """Many concurrent enqueues share commits: fewer commits than messages, every id durable."""
    before = store.queue.commits
    batches = await asyncio.gather(*(store.queue.enqueue([new_message(n)], now=T0)
                                     for n in range(200)))
    ids = [i for batch in batches for i in batch]
    commits = store.queue.commits - before
    assert len(set(ids)) == 200
    assert 1 <= commits < 200
    assert {r[0] for r in sql(db_path, "SELECT id FROM queue")} == set(ids)


async def test_one_bad_message_does_not_fail_its_group(store: Store) -> None:
    """A message that cannot be stored fails alone; the others committed with it succeed."""
    results = await asyncio.gather(
        store.queue.enqueue([new_message(1)], now=T0),
        store.queue.enqueue([new_message(2, ("dup@example.com", "dup@example.com"))], now=T0),
        store.queue.enqueue([new_message(3)], now=T0),
        return_exceptions=True)
    assert isinstance(results[1], Exception)
    assert isinstance(results[0], list) and isinstance(results[2], list)


async def test_claim_due(store: Store) -> None:
    """Only due messages are claimed, oldest first, once, with their raw bytes."""
    [late] = await store.queue.enqueue([new_message(1)], now=T0 + 100)
    [early] = await store.queue.enqueue([new_message(2)], now=T0)
    assert await store.queue.claim_due(T0 - 1, limit=10) == []
    assert await store.queue.next_due() == T0
    [claimed] = await store.queue.claim_due(T0 + 100, limit=1)
    assert claimed.id == early and claimed.raw == raw_message(2)
    assert claimed.state == "queued"  # as it was when claimed
    assert (await store.queue.get(early)).state == MessageState.SENDING  # type: ignore[union-attr]
    [again] = await store.queue.claim_due(T0 + 100, limit=10)
    assert again.id == late
    assert await store.queue.claim_due(T0 + 1000, limit=10) == []
    assert await store.queue.counts() == {"sending": 2}


async def test_record_attempt_sent(store: Store) -> None:
    """All recipients sent: the message is sent and its body is dropped."""
    [qid] = await store.queue.enqueue([new_message(1, ("a@example.com", "b@example.com"))],
                                      now=T0)
    await store.queue.claim_due(T0)
    state = await store.queue.record_attempt(
        qid, [Attempt("a@example.com", "sent"), Attempt("b@example.com", "sent")], T0 + 1, None)
    assert state == MessageState.SENT
    message = await store.queue.get(qid, with_raw=True)
    assert message is not None
    assert message.state == "sent" and message.attempts == 1 and message.raw is None
    assert set(rcpt_states(message).values()) == {"sent"}
    assert await store.queue.claim_due(T0 + 10_000) == []


async def test_record_attempt_deferred(store: Store) -> None:
    """A temporary failure with a retry time defers the message until then, error kept."""
    [qid] = await store.queue.enqueue([new_message(1)], now=T0)
    await store.queue.claim_due(T0)
    state = await store.queue.record_attempt(
        qid, [Attempt("someone@example.com", "deferred", "451 4.3.0 try later")], T0 + 1, T0 + 60)
    assert state == MessageState.DEFERRED
    message = await store.queue.get(qid, with_raw=True)
    assert message is not None
    assert (message.next_attempt, message.attempts) == (T0 + 60, 1)
    assert message.last_error is not None and "451 4.3.0 try later" in message.last_error
    assert message.raw == raw_message(1)
    assert await store.queue.claim_due(T0 + 59) == []
    [again] = await store.queue.claim_due(T0 + 60)
    assert again.id == qid and again.attempts == 1


async def test_record_attempt_fails_without_retry_time(store: Store) -> None:
    """A temporary failure with no retry time left (lifetime over) becomes a failure."""
    [qid] = await store.queue.enqueue([new_message(1)], now=T0)
    await store.queue.claim_due(T0)
    state = await store.queue.record_attempt(
        qid, [Attempt("someone@example.com", "deferred", "451 still busy")], T0 + 1, None)
    assert state == MessageState.FAILED
    message = await store.queue.get(qid)
    assert message is not None
    assert rcpt_states(message) == {"someone@example.com": "failed"}
    assert await store.queue.claim_due(T0 + 10_000) == []


async def test_record_attempt_partial(store: Store) -> None:
    """Per-recipient outcomes: sent ones stay sent, the rest are retried alone."""
    rcpts = ("ok@example.com", "later@example.com", "bad@example.com")
    [qid] = await store.queue.enqueue([new_message(1, rcpts)], now=T0)
    await store.queue.claim_due(T0)
    state = await store.queue.record_attempt(qid, [
        Attempt("ok@example.com", "sent"),
        Attempt("later@example.com", "deferred", "452 mailbox full"),
        Attempt("bad@example.com", "failed", "550 no such user"),
    ], T0 + 1, T0 + 60)
    assert state == MessageState.DEFERRED
    message = await store.queue.get(qid, with_raw=True)
    assert message is not None and message.raw == raw_message(1)
    assert rcpt_states(message) == {"ok@example.com": "sent", "later@example.com": "deferred",
                                    "bad@example.com": "failed"}
    assert [m.id for m in await store.queue.claim_due(T0 + 60)] == [qid]
    # A later attempt cannot overwrite recipients already settled.
    state = await store.queue.record_attempt(qid, [
        Attempt("ok@example.com", "failed", "should be ignored"),
        Attempt("later@example.com", "sent"),
    ], T0 + 61, T0 + 120)
    message = await store.queue.get(qid)
    assert message is not None
    assert rcpt_states(message) == {"ok@example.com": "sent", "later@example.com": "sent",
                                    "bad@example.com": "failed"}
    assert state == message.state == MessageState.FAILED
    assert message.attempts == 2


async def test_requeue_stale_after_crash(db_path: Path) -> None:
    """Messages left in `sending` by a crashed daemon go back to the queue on restart."""
    store = await Store.open(db_path)
    [qid] = await store.queue.enqueue([new_message(1)], now=T0)
    [claimed] = await store.queue.claim_due(T0)
    await store.close()  # the "crash": no record_attempt, no release_claim

    restarted = await Store.open(db_path)
    try:
        assert await restarted.queue.claim_due(T0 + 1) == []
        assert await restarted.queue.requeue_stale() == 1
        assert (await restarted.queue.get(qid)).state == "queued"  # type: ignore[union-attr]
        [again] = await restarted.queue.claim_due(T0 + 1)
        assert again.id == claimed.id and again.raw == raw_message(1)
        assert await restarted.queue.requeue_stale() == 1
        assert await restarted.queue.requeue_stale() == 0
    finally:
        await restarted.close()


async def test_release_claim(store: Store) -> None:
    """A claimed message put back unchanged is due again at once."""
    [qid] = await store.queue.enqueue([new_message(1)], now=T0)
    await store.queue.claim_due(T0)
    await store.queue.release_claim(qid)
    assert [m.id for m in await store.queue.claim_due(T0)] == [qid]


async def test_retry(store: Store) -> None:
    """`retry` makes failed and deferred messages due now; sent ones are not resent."""
    ids = await store.queue.enqueue([new_message(n) for n in range(3)], now=T0)
    failed, deferred, sent = ids
    await store.queue.claim_due(T0, limit=3)
    await store.queue.record_attempt(failed, [Attempt("someone@example.com", "failed", "550")],
                                     T0, None)
    await store.queue.record_attempt(deferred, [Attempt("someone@example.com", "deferred", "4")],
                                     T0, T0 + 3600)
    await store.queue.record_attempt(sent, [Attempt("someone@example.com", "sent")], T0, None)

    assert await store.queue.retry([failed], T0 + 5) == [failed]
    message = await store.queue.get(failed)
    assert message is not None and message.state == "queued"
    assert rcpt_states(message) == {"someone@example.com": "queued"}
    assert [m.id for m in await store.queue.claim_due(T0 + 5, limit=10)] == [failed]

    assert await store.queue.retry([sent], T0 + 5) == []
    assert sorted(await store.queue.retry(None, T0 + 6)) == [deferred]
    assert [m.id for m in await store.queue.claim_due(T0 + 6, limit=10)] == [deferred]


async def test_delete(store: Store, db_path: Path) -> None:
    """An operator can delete a queued message (with its recipients), not one being sent."""
    queued, sending = await store.queue.enqueue([new_message(1), new_message(2)], now=T0)
    await store.queue.enqueue([], now=T0)  # an empty enqueue is harmless
    claimed = await store.queue.claim_due(T0, limit=10)
    await store.queue.release_claim(queued)
    assert {m.id for m in claimed} == {queued, sending}

    assert await store.queue.delete(queued, T0 + 1) is True
    assert await store.queue.get(queued) is None
    assert sql(db_path, "SELECT count(*) FROM queue_rcpt WHERE queue_id = ?", (queued,)) == [(0,)]
    assert await store.queue.delete(queued, T0 + 1) is False
    assert await store.queue.delete(sending, T0 + 1) is False
    assert await store.queue.get(sending) is not None
    log = await store.audit_log()
    assert [(e["action"], e["queue_id"]) for e in log] == [("delete", queued)]


async def test_quarantine_release(store: Store) -> None:
    """A quarantined message is held until released, then delivered like any other."""
    [qid] = await store.queue.enqueue([new_message(
        1, ("held@example.com", "gone@example.com"),
        states=(MessageState.QUARANTINED, MessageState.DROPPED))], now=T0)
    message = await store.queue.get(qid)
    assert message is not None and message.state == "quarantined"
    assert await store.queue.claim_due(T0 + 10_000) == []
    assert await store.queue.retry([qid], T0) == []

    assert await store.queue.release_quarantined(qid, T0 + 5) is True
    message = await store.queue.get(qid)
    assert message is not None and message.state == "queued"
    assert rcpt_states(message) == {"held@example.com": "queued", "gone@example.com": "dropped"}
    [claimed] = await store.queue.claim_due(T0 + 5)
    assert claimed.id == qid and claimed.raw == raw_message(1)
    assert await store.queue.release_quarantined(qid, T0 + 6) is False
    assert "release" in [e["action"] for e in await store.audit_log()]


# --- blocking and opt-out notices --------------------------------------------------------------

async def test_block_cancels_only_pending_noncritical_mail(store: Store) -> None:
    """Blocking a buyer cancels its queued/deferred non-critical mail, nothing else."""
    key = buyer(1)
    alias = f"{key[:15]}+case-7@marketplace.amazon.com"
    other = buyer(2)
    noncrit, deferred, critical, in_flight, mixed, others = await store.queue.enqueue([
        new_message(1, (alias,), cls="non-critical", buyer_keys=(key,)),
        new_message(2, (alias,), cls="non-critical", buyer_keys=(key,)),
        new_message(3, (alias,), cls="critical", buyer_keys=(key,)),
        new_message(4, (alias,), cls="non-critical", buyer_keys=(key,)),
        new_message(5, (alias, other), cls="non-critical", buyer_keys=(key, other)),
        new_message(6, (other,), cls="non-critical", buyer_keys=(other,)),
    ], now=T0)
    claimed = {m.id: m for m in await store.queue.claim_due(T0, limit=10)}
    for qid in (noncrit, critical, mixed, others):
        await store.queue.release_claim(qid)
    await store.queue.record_attempt(deferred, [Attempt(alias, "deferred", "421")], T0, T0 + 60)
    assert set(claimed) == {noncrit, deferred, critical, in_flight, mixed, others}

    result = await store.optout.block(key, "manual", "test", now=T0 + 1)
    assert result.new is True
    # The message in flight is cancelled too: a deferred outcome must not be retried.
    assert sorted(result.cancelled) == sorted([(noncrit, alias), (deferred, alias),
                                               (in_flight, alias), (mixed, alias)])

    async def state(qid: str) -> tuple[str, dict[str, str]]:
        message = await store.queue.get(qid)
        assert message is not None
        return message.state, rcpt_states(message)

    assert await state(noncrit) == ("cancelled", {alias: "cancelled"})
    assert await state(deferred) == ("cancelled", {alias: "cancelled"})
    assert await state(critical) == ("queued", {alias: "queued"})
    assert await state(in_flight) == ("sending", {alias: "cancelled"})
    assert await state(mixed) == ("queued", {alias: "cancelled", other: "queued"})
    assert await state(others) == ("queued", {other: "queued"})
    actions = [e["action"] for e in await store.audit_log(buyer_key=key)]
    assert actions.count("cancel") == 4 and actions.count("block") == 1
    # The attempt in flight comes back deferred: no retry; had it been sent, the record says so.
    await store.queue.record_attempt(in_flight, [Attempt(alias, "deferred", "451")], T0 + 3,
                                     T0 + 60)
    assert await state(in_flight) == ("cancelled", {alias: "cancelled"})

    again = await store.optout.block(key, "manual", "again", now=T0 + 2)
    assert again.new is False and again.cancelled == ()
    [entry] = await store.optout.entries()
    assert (entry.first_seen, entry.last_seen, entry.reason) == (T0 + 1, T0 + 2, "test")


async def test_unblock(store: Store) -> None:
    """Unblocking removes only the listed buyers that were blocked."""
    await store.optout.block_many([buyer(1), buyer(2)], "import", "", T0)
    assert await store.optout.unblock([buyer(1), buyer(3)], T0) == [buyer(1)]
    assert await store.optout.blocked([buyer(1), buyer(2), buyer(3)]) == {buyer(2)}
    assert await store.optout.size() == 1


async def test_notice_for_known_order_blocks_buyer(store: Store) -> None:
    """A notice for an order already relayed to a buyer blocks that buyer at once."""
    key = buyer(1)
    [qid] = await store.queue.enqueue(
        [new_message(1, (key,), cls="non-critical", buyer_keys=(key,))],
        relayed=[RelayedRecord(key, ORDER, "<m1@example.com>", T0, "#0")], now=T0)
    results = await store.optout.apply_notice(ORDER, "<notice@amazon.com>", None, T0 + 10)
    assert [(r.buyer_key, r.new) for r in results] == [(key, True)]
    assert results[0].cancelled == ((qid, key),)
    assert await store.optout.blocked([key]) == {key}
    assert await store.optout.unresolved_orders() == []
    assert await store.optout.opted_out_orders([ORDER, OTHER_ORDER]) == {ORDER}
    [entry] = await store.optout.entries()
    assert entry.source == "notice" and ORDER in entry.reason
    assert "<notice@amazon.com>" in entry.evidence and entry.marketplace == "US"


async def test_notice_with_explicit_buyer(store: Store) -> None:
    """A notice whose buyer is already known (passed in) blocks that buyer."""
    results = await store.optout.apply_notice(ORDER, "<n@amazon.de>", buyer(3, "marketplace."
                                              "amazon.de"), T0)
    assert [r.buyer_key for r in results] == [buyer(3, "marketplace.amazon.de")]
    [entry] = await store.optout.entries()
    assert entry.marketplace == "DE"


async def test_unknown_order_resolved_by_buyer_message(store: Store) -> None:
    """A notice for an unknown order is kept, and blocks the buyer once its message arrives."""
    assert await store.optout.apply_notice(ORDER, "<notice@amazon.com>", None, T0) == []
    assert await store.optout.unresolved_orders() == [ORDER]
    assert await store.optout.size() == 0

    key = buyer(4)
    unrelated = BuyerMessageRecord("<q0@amazon.com>", buyer(5), buyer(5), OTHER_ORDER, None,
                                   "Question", "Where is it?", T0 + 1)
    assert await store.optout.record_buyer_message(unrelated) == (True, None)
    rec = BuyerMessageRecord("<q1@amazon.com>", key, f"{key[:15]}+c1@marketplace.amazon.com",
                             ORDER, "ABCDEFGHIJKLM", "Question", "Where is my order?", T0 + 2)
    new, blocked = await store.optout.record_buyer_message(rec)
    assert new is True and blocked is not None and blocked.buyer_key == key
    assert await store.optout.blocked([key, buyer(5)]) == {key}
    assert await store.optout.unresolved_orders() == []
    assert await store.optout.record_buyer_message(rec) == (False, None)
    assert [m.message_id for m in await store.optout.buyer_messages([key])] == ["<q1@amazon.com>"]


async def test_unknown_order_resolved_by_relayed_record(store: Store) -> None:
    """A notice for an unknown order blocks the buyer when mail for that order is relayed."""
    await store.optout.apply_notice(ORDER, "<notice@amazon.com>", None, T0)
    key = buyer(6)
    await store.queue.enqueue([new_message(1, (key,), cls="critical", buyer_keys=(key,))],
                              relayed=[RelayedRecord(key, ORDER, "<m@example.com>", T0 + 5, "#0")],
                              now=T0 + 5)
    assert await store.optout.blocked([key]) == {key}
    assert await store.optout.unresolved_orders() == []
    assert await store.optout.buyers_for_order(ORDER) == [key]


# --- crash safety --------------------------------------------------------------------------------

WRITER_SCRIPT = """
import asyncio, hashlib, sys, time
from mailrelay.store import Store
from mailrelay.store.records import NewMessage, NewRecipient

def body(n):
    return (f"Subject: {n}\\r\\n\\r\\n".encode() + bytes(range(256)) * (1 + n % 40)
            + f"{n}".encode() * 50)

async def one(store, n):
    raw = body(n)
    message = NewMessage("seller@example.com", raw, (NewRecipient(f"r{n}@example.com"),))
    [qid] = await store.queue.enqueue([message], now=time.time())
    print(qid, hashlib.sha256(raw).hexdigest(), flush=True)

async def main():
    store = await Store.open(sys.argv[1])
    n = 0
    while True:
        await asyncio.gather(*(one(store, n + i) for i in range(3)))
        n += 3

asyncio.run(main())
"""


def test_data_intact_after_sigkill(db_path: Path) -> None:
    """Every id the writer reported before SIGKILL is on disk with intact bytes."""
    db_path.parent.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(db_path)],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    reported: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 15
        while len(reported) < 200 and time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                break
            qid, digest = line.split()
            reported[qid] = digest
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(reported) >= 200, err.decode()
    for line in rest.decode().splitlines(keepends=True):
        if line.endswith("\n") and len(line.split()) == 2:  # printed after commit: also durable
            qid, digest = line.split()
            reported[qid] = digest

    assert sql(db_path, "PRAGMA integrity_check") == [("ok",)]
    stored = {qid: sha(bytes(raw)) for qid, raw in sql(db_path, "SELECT id, raw FROM queue")}
    missing = set(reported) - set(stored)
    assert not missing
    assert {qid: stored[qid] for qid in reported} == reported
    orphans = sql(db_path, "SELECT count(*) FROM queue q WHERE NOT EXISTS "
                           "(SELECT 1 FROM queue_rcpt r WHERE r.queue_id = q.id)")
    assert orphans == [(0,)]


async def test_cancelled_in_flight_but_delivered_is_recorded_as_sent(store: Store) -> None:
    """A recipient cancelled while its attempt was under way, which the attempt delivered, is
    recorded as sent: the record says what happened to the mail."""
    key = buyer(1)
    [qid] = await store.queue.enqueue(
        [new_message(1, (key,), cls="non-critical", buyer_keys=(key,))], now=T0)
    [claimed] = await store.queue.claim_due(T0)
    assert (await store.optout.block(key, "manual", "test", now=T0 + 1)).cancelled == (
        (qid, key),)
    state = await store.queue.record_attempt(claimed.id, [Attempt(key, "sent")], T0 + 2, None)
    assert state == "sent"


async def test_cancelled_writer_waiting_for_a_lock_leaves_no_open_transaction(
    db_path: Path,
) -> None:
    """A write cancelled while its BEGIN waits on another process's lock must not leave the
    writer inside a transaction: later writes still work once the lock is gone."""


    store = await Store.open(db_path)
    try:
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        task = asyncio.create_task(store.optout.block(buyer(1), "manual", "x", now=T0))
        await asyncio.sleep(0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        holder.execute("ROLLBACK")
        holder.close()
        result = await store.optout.block(buyer(2), "manual", "y", now=T0 + 1)
        assert result.new is True
        assert buyer(2) in await store.optout.blocked([buyer(2)])
    finally:
        await store.close()
