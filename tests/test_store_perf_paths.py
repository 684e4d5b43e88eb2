"""The store's fast paths: one-hop transactions, group commit, and which commits skip fsync.

enqueue, claim_due and record_attempt run as plain functions in the writer's thread
(``Database.transact``); calls that arrive together share a transaction. These tests check what
that must not change (states, isolation, the opt-out rules) and what it promises (fewer commits;
only delivery bookkeeping commits without fsync).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest
from helpers_store import buyer, new_message, sql

from mailrelay.store import Store
from mailrelay.store.queue import plan_attempt
from mailrelay.store.records import Attempt, MessageState, RelayedRecord

T0 = 1_700_000_000.0
ORDER = "403-4565603-0457311"
FULL, NORMAL = 2, 1  # PRAGMA synchronous values


def synchronous(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def write_level(store: Store) -> int:
    """PRAGMA synchronous inside a ``write()`` transaction (blocklist, operator commands)."""
    async with store.db.write() as conn, conn.execute("PRAGMA synchronous") as cursor:
        row = await cursor.fetchone()
    return int(row[0])


# --- the pure part of record_attempt -------------------------------------------------------------

Q, D, S, F, C = (MessageState.QUEUED, MessageState.DEFERRED, MessageState.SENT,
                 MessageState.FAILED, MessageState.CANCELLED)


@pytest.mark.parametrize(("current", "attempts", "retry_at", "updates", "state"), [
    ({"a": Q}, [("a", S)], None, [("a", S)], S),
    ({"a": Q}, [("a", D)], T0 + 60, [("a", D)], D),
    ({"a": D}, [("a", D)], None, [("a", F)], F),
    ({"a": Q}, [("a", F)], T0 + 60, [("a", F)], F),
    ({"a": Q, "b": Q}, [("a", S), ("b", D)], T0 + 60, [("a", S), ("b", D)], D),
    ({"a": Q, "b": Q}, [("a", S), ("b", F)], T0 + 60, [("a", S), ("b", F)], F),
    # cancelled by an opt-out during the attempt: stays cancelled unless it was delivered
    ({"a": C}, [("a", D)], T0 + 60, [], C),
    ({"a": C}, [("a", F)], T0 + 60, [], C),
    ({"a": C}, [("a", S)], None, [("a", S)], S),
    ({"a": C, "b": Q}, [("a", D), ("b", S)], T0 + 60, [("b", S)], S),
    # a recipient the message does not have, or one already final, is left alone
    ({"a": Q}, [("a", S), ("x", S)], None, [("a", S)], S),
    ({"a": S, "b": Q}, [("a", F), ("b", S)], None, [("b", S)], S),
    ({"a": Q}, [("a", S), ("a", F)], None, [("a", S)], S),
    ({"a": MessageState.QUARANTINED, "b": Q}, [("b", S)], None, [("b", S)],
     MessageState.QUARANTINED),
    ({"a": Q}, [], None, [], D),
])
def test_plan_attempt(current: dict[str, str], attempts: list[tuple[str, str]],
                      retry_at: float | None, updates: list[tuple[str, str]], state: str) -> None:
    """Outcomes map to recipient and message states as record_attempt always did."""
    plan = plan_attempt(current, [Attempt(r, o, "" if o == S else "x") for r, o in attempts],
                        retry_at)
    assert [(rcpt, new) for rcpt, new, _ in plan.updates] == updates
    assert plan.state == state


# --- group commit and isolation ------------------------------------------------------------------

async def test_concurrent_outcomes_share_commits(store: Store, db_path: Path) -> None:
    """Forty workers' outcomes recorded at once take far fewer commits, and each is right."""
    ids = await store.queue.enqueue([new_message(n) for n in range(40)], now=T0)
    claimed = await store.queue.claim_due(T0, limit=40)
    assert sorted(m.id for m in claimed) == sorted(ids)
    before = store.db.commits
    outcomes = [("sent", None) if n % 2 else ("deferred", T0 + 60) for n in range(40)]
    states = await asyncio.gather(*(
        store.queue.record_attempt(qid, [Attempt("someone@example.com", outcome, "x")], T0 + 1,
                                   retry_at)
        for qid, (outcome, retry_at) in zip(ids, outcomes, strict=True)))
    assert states == [outcome for outcome, _ in outcomes]
    assert 1 <= store.db.commits - before < 10
    rows = dict(sql(db_path, "SELECT id, state FROM queue"))
    assert rows == dict(zip(ids, states, strict=True))
    assert sql(db_path, "SELECT count(*) FROM queue WHERE raw IS NULL") == [(20,)]
    assert sql(db_path, "SELECT count(*) FROM queue WHERE attempts = 1") == [(40,)]


async def test_failing_function_fails_alone_in_its_batch(store: Store, db_path: Path) -> None:
    """A bad enqueue batched with others' outcomes and enqueues fails alone, its rows undone."""
    [first] = await store.queue.enqueue([new_message(1)], now=T0)
    await store.queue.claim_due(T0)
    before = store.db.commits
    results = await asyncio.gather(
        store.queue.enqueue([new_message(2)], now=T0),
        store.queue.enqueue([new_message(3, ("dup@example.com", "dup@example.com"))], now=T0),
        store.queue.record_attempt(first, [Attempt("someone@example.com", "sent")], T0, None),
        store.queue.enqueue([new_message(4)], now=T0),
        return_exceptions=True)
    assert store.db.commits - before == 1  # all four shared one transaction
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert results[2] == "sent"
    assert isinstance(results[0], list) and isinstance(results[3], list)
    assert sql(db_path, "SELECT count(*) FROM queue") == [(3,)]
    assert sql(db_path, "SELECT count(*) FROM queue_rcpt WHERE rcpt = 'dup@example.com'") == [
        (0,)]


async def test_function_error_leaves_no_transaction_open(store: Store, db_path: Path) -> None:
    """A function that raises after writing has its writes rolled back; later writes work."""
    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO audit (at, action) VALUES (1, 'half')")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await store.db.transact(half_then_fail)
    assert await store.queue.enqueue([new_message(1)], now=T0)
    assert sql(db_path, "SELECT count(*) FROM audit WHERE action = 'half'") == [(0,)]


async def test_caller_cancelled_before_its_batch_is_left_out(store: Store, db_path: Path) -> None:
    """An enqueue cancelled while an earlier batch waits on another process's lock is never
    stored (no 250 was sent); the earlier one is stored once the lock is gone."""
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        first = asyncio.create_task(store.queue.enqueue([new_message(1)], now=T0))
        await asyncio.sleep(0.2)  # its batch is now in the thread, waiting for the lock
        second = asyncio.create_task(store.queue.enqueue([new_message(2)], now=T0))
        await asyncio.sleep(0.1)
        second.cancel()
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    [stored] = await first
    with pytest.raises(asyncio.CancelledError):
        await second
    assert await store.queue.enqueue([new_message(3)], now=T0)
    assert sql(db_path, "SELECT message_id FROM queue ORDER BY message_id") == [
        ("<m1@example.com>",), ("<m3@example.com>",)]
    assert stored


# --- durability levels ---------------------------------------------------------------------------

async def test_only_delivery_bookkeeping_commits_without_fsync(store: Store) -> None:
    """Non-durable functions commit with synchronous=NORMAL; a batch holding a durable one, and
    every write() transaction (blocklist, operator commands), commits with FULL."""
    assert await store.db.transact(synchronous, durable=False) == NORMAL
    assert await store.db.transact(synchronous) == FULL
    assert await store.db.transact(synchronous, durable=False) == NORMAL
    assert await write_level(store) == FULL
    mixed = await asyncio.gather(store.db.transact(synchronous, durable=False),
                                 store.db.transact(synchronous),
                                 store.db.transact(synchronous, durable=False))
    assert mixed == [FULL, FULL, FULL]


async def test_enqueue_is_durable_claim_and_attempt_are_not(store: Store) -> None:
    """enqueue counts as a durable commit; claiming and recording an attempt do not."""
    before = store.db.durable_commits
    [qid] = await store.queue.enqueue([new_message(1)], now=T0)
    assert store.db.durable_commits == before + 1
    await store.queue.claim_due(T0)
    await store.queue.record_attempt(qid, [Attempt("someone@example.com", "sent")], T0, None)
    assert store.db.durable_commits == before + 1
    assert await write_level(store) == FULL  # and FULL again for the next write()


# --- behaviour kept ------------------------------------------------------------------------------

async def test_claim_returns_each_message_with_its_own_recipients(store: Store) -> None:
    """A batch claim hands out every message with its own recipients, in the order given."""
    rcpts = [tuple(f"r{n}-{i}@example.com" for i in range(n + 1)) for n in range(4)]
    ids = await store.queue.enqueue([new_message(n, r) for n, r in enumerate(rcpts)], now=T0)
    claimed = await store.queue.claim_due(T0, limit=10)
    assert [m.id for m in claimed] == ids
    assert [tuple(r.rcpt for r in m.recipients) for m in claimed] == rcpts
    assert all(m.raw and m.raw.startswith(b"From:") for m in claimed)
    assert {m.state for m in await store.queue.list()} == {"sending"}
    assert await store.queue.claim_due(T0, limit=10) == []


@pytest.mark.parametrize("order", ["block first", "record first", "together"])
@pytest.mark.parametrize(("outcome", "rcpt_state", "state"), [
    ("deferred", "cancelled", "cancelled"),
    ("sent", "sent", "sent"),
])
async def test_block_racing_an_outcome(store: Store, order: str, outcome: str, rcpt_state: str,
                                       state: str) -> None:
    """A buyer blocked while its mail is being sent: whichever write lands first, a deferred
    attempt is never retried and a delivered one is recorded as sent."""
    key = buyer(1)
    [qid] = await store.queue.enqueue(
        [new_message(1, (key,), cls="non-critical", buyer_keys=(key,))], now=T0)
    await store.queue.claim_due(T0)
    block = store.optout.block(key, "manual", "race", now=T0 + 1)
    record = store.queue.record_attempt(qid, [Attempt(key, outcome, "451 later")], T0 + 2,
                                        T0 + 60)
    if order == "together":
        await asyncio.gather(record, block)
    else:
        for step in (block, record) if order == "block first" else (record, block):
            await step
    message = await store.queue.get(qid)
    assert message is not None
    assert (message.recipients[0].state, message.state) == (rcpt_state, state)
    assert await store.queue.claim_due(T0 + 10_000) == []


async def test_record_attempt_for_a_deleted_message(store: Store) -> None:
    """Recording an outcome for a message deleted meanwhile changes nothing and says so."""
    assert await store.queue.record_attempt("NOSUCHID", [Attempt("a@example.com", "sent")], T0,
                                            None) == ""


async def test_relayed_record_for_pending_order_blocks_amid_other_enqueues(
    store: Store, db_path: Path
) -> None:
    """Mail naming an order whose opt-out awaits its buyer blocks that buyer, even when it is
    committed together with other sessions' mail."""
    await store.optout.apply_notice(ORDER, "<notice@amazon.com>", None, T0)
    key = buyer(7)
    results = await asyncio.gather(
        store.queue.enqueue([new_message(1)], now=T0),
        store.queue.enqueue([new_message(2, (key,), cls="non-critical", buyer_keys=(key,))],
                            relayed=[RelayedRecord(key, ORDER, "<m2@example.com>", T0, "#0")],
                            now=T0),
        store.queue.enqueue([new_message(3)], now=T0))
    assert all(len(ids) == 1 for ids in results)
    assert await store.optout.blocked([key]) == {key}
    assert await store.optout.unresolved_orders() == []
    assert sql(db_path, "SELECT queue_id FROM relayed WHERE order_id = ?", (ORDER,)) == [
        (results[1][0],)]
    message = await store.queue.get(results[1][0])
    assert message is not None and message.state == "cancelled"


async def test_relayed_records_and_audits_name_their_queue_ids(store: Store,
                                                               db_path: Path) -> None:
    """On the fast path `#N` references resolve to the N-th message's queue id."""
    key = buyer(2)
    ids = await store.queue.enqueue(
        [new_message(1), new_message(2, (key,), cls="critical", buyer_keys=(key,))],
        relayed=[RelayedRecord(key, ORDER, "<m2@example.com>", T0, "#1")], now=T0)
    assert sql(db_path, "SELECT queue_id, buyer_key FROM relayed") == [(ids[1], key)]
    assert await store.optout.buyers_for_order(ORDER) == [key]


async def test_close_with_work_queued_fails_it_instead_of_hanging(db_path: Path) -> None:
    """Functions still queued when the store closes get an error, not an endless wait."""
    store = await Store.open(db_path)
    pending = asyncio.ensure_future(store.queue.enqueue([new_message(1)], now=T0))
    await store.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pending, 5)
    assert pending.done()
