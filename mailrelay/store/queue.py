"""The durable queue: accepted messages, their recipients' states, delivery attempts.

The hot paths (enqueue, claim, record an attempt) are plain functions run by
``Database.transact`` in the writer's thread: one hop each, and calls that arrive together share
one transaction (group commit). ``enqueue`` is durable: each session's 250 is sent only after the
commit that holds its own message. Claims and attempts commit without fsync (db.py says why that
is safe for at-least-once delivery); they ride on an enqueue's fsync when they share its commit.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiosqlite

from mailrelay.store.db import Database, in_thread
from mailrelay.store.optout import message_state_from, record_relayed, refresh_message_state
from mailrelay.store.records import (
    PENDING_STATES,
    Attempt,
    AuditRecord,
    MessageState,
    NewMessage,
    QueuedMessage,
    RecipientRow,
    RelayedRecord,
)

_COLUMNS = ("id, mail_from, mail_options, message_id, size, state, attempts, created, "
            "next_attempt, last_error, auth_user")
_AUDIT_SQL = ("INSERT INTO audit (at, queue_id, message_id, recipient, buyer_key, class, rule, "
              "action, mode, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_RCPT_COLUMNS = "rcpt, state, buyer_key, class, last_error"


def new_queue_id(now: float) -> str:
    """Sortable by time, unguessable enough to be no handle for anyone else's mail."""
    return f"{int(now * 1000):011X}{secrets.token_hex(3).upper()}"


@dataclass(frozen=True, slots=True)
class _Pending:
    messages: Sequence[NewMessage]
    audits: Sequence[AuditRecord]
    relayed: Sequence[RelayedRecord]
    now: float


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """What recording an attempt changes: recipient updates (rcpt, state, error), message state."""

    updates: tuple[tuple[str, str, str | None], ...]
    state: str


def plan_attempt(current: dict[str, str], attempts: Sequence[Attempt],
                 retry_at: float | None) -> AttemptPlan:
    """Pure: apply an attempt's outcomes to the recipients' current states, in order.

    Deferred becomes failed when there is no retry time. A recipient cancelled while the attempt
    was under way (``blocklist add``) stays cancelled, unless the attempt did deliver it: then
    the record must say so. Recipients in any other state are left alone.
    """
    states = dict(current)
    updates = []
    for attempt in attempts:
        outcome = attempt.outcome
        if outcome == MessageState.DEFERRED and retry_at is None:
            outcome = MessageState.FAILED
        settable = PENDING_STATES if outcome != MessageState.SENT else (
            *PENDING_STATES, MessageState.CANCELLED)
        if states.get(attempt.rcpt) in settable:
            states[attempt.rcpt] = outcome
            updates.append((attempt.rcpt, outcome, attempt.error or None))
    return AttemptPlan(tuple(updates),
                       message_state_from(set(states.values()), MessageState.DEFERRED))


async def insert_audits(conn: aiosqlite.Connection, audits: Sequence[AuditRecord]) -> None:
    await conn.executemany(_AUDIT_SQL, [_audit_row(a) for a in audits])


def _audit_row(a: AuditRecord) -> tuple[Any, ...]:
    return (a.at, a.queue_id, a.message_id, a.recipient, a.buyer_key, a.cls, a.rule, a.action,
            a.mode, a.reason)


class QueueRepo:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.wakeup = asyncio.Event()  # set when new work is due for the delivery workers

    @property
    def commits(self) -> int:
        """Durable transactions written (enqueue's group commits; for the fsync figure)."""
        return self.db.durable_commits

    async def enqueue(self, messages: Sequence[NewMessage], audits: Sequence[AuditRecord] = (),
                      relayed: Sequence[RelayedRecord] = (), now: float = 0.0) -> list[str]:
        """Commit the messages durably; returns their queue ids once the commit is on disk.

        Audit and relayed records may use ``queue_id="#N"`` to refer to the N-th message.
        """
        item = _Pending(messages, audits, relayed, now)
        ids = await self.db.transact(_insert, item, True)
        if ids is None:
            # A relayed record names an order whose opt-out notice awaits its buyer (rare):
            # blocking that buyer is async code, so this message takes the async path.
            async with self.db.write() as conn:
                ids = await in_thread(conn, _insert, item, False)
                await record_relayed(conn, _relayed_with_ids(item, ids))
        self.wakeup.set()
        return ids

    async def claim_due(self, now: float, limit: int = 1) -> list[QueuedMessage]:
        """Mark up to ``limit`` due messages as sending and return them with their raw bytes.

        A caller cancelled once its claim is under way leaves the messages ``sending``:
        ``requeue_stale`` puts them back at the next start (at-least-once), as after a crash.
        """
        return await self.db.transact(_claim, now, limit, durable=False)

    async def next_due(self) -> float | None:
        placeholders = ",".join("?" * len(PENDING_STATES))
        row = await self.db.fetchone(
            f"SELECT min(next_attempt) FROM queue WHERE state IN ({placeholders})",
            PENDING_STATES,
        )
        return row[0] if row and row[0] is not None else None

    async def record_attempt(self, queue_id: str, attempts: Sequence[Attempt], now: float,
                             retry_at: float | None) -> str:
        """Store per-recipient outcomes; deferred ones fail instead when ``retry_at`` is None.

        Returns the message's new state ("" when the message is gone).
        """
        return await self.db.transact(_record, queue_id, tuple(attempts), now, retry_at,
                                      durable=False)

    async def release_claim(self, queue_id: str) -> None:
        """Put a claimed message back unchanged (delivery paused, shutdown)."""
        async with self.db.write() as conn:
            await conn.execute("UPDATE queue SET state = ? WHERE id = ? AND state = ?",
                               (MessageState.QUEUED, queue_id, MessageState.SENDING))
            await refresh_message_state(conn, queue_id)

    async def requeue_stale(self) -> int:
        """After a crash: messages left in ``sending`` go back to the queue (at-least-once)."""
        async with self.db.write() as conn:
            cursor = await conn.execute(
                "UPDATE queue SET state = ? WHERE state = ?",
                (MessageState.QUEUED, MessageState.SENDING),
            )
            return cursor.rowcount

    async def list(self, states: Sequence[str] | None = None, limit: int = 1000) -> list[
        QueuedMessage
    ]:
        where, params = "", ()
        if states:
            where = f"WHERE state IN ({','.join('?' * len(states))})"
            params = tuple(states)
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM queue {where} ORDER BY created LIMIT ?", (*params, limit)
        )
        recipients = await self._recipients_of([r["id"] for r in rows])
        return [_message(r, recipients.get(r["id"], ())) for r in rows]

    async def get(self, queue_id: str, with_raw: bool = False) -> QueuedMessage | None:
        row = await self.db.fetchone(f"SELECT {_COLUMNS}, raw FROM queue WHERE id = ?",
                                     (queue_id,))
        if row is None:
            return None
        raw = bytes(row["raw"]) if with_raw and row["raw"] is not None else None
        recipients = await self._recipients_of([queue_id])
        return _message(row, recipients.get(queue_id, ()), raw=raw)

    async def _recipients_of(self, queue_ids: list[str]) -> dict[str, tuple[RecipientRow, ...]]:
        """Recipients of many messages in one query (``queue list`` was one query a message)."""
        found: dict[str, list[RecipientRow]] = {}
        for chunk in (queue_ids[i:i + 500] for i in range(0, len(queue_ids), 500)):
            rows = await self.db.fetchall(
                "SELECT queue_id, rcpt, state, buyer_key, class, last_error FROM queue_rcpt "
                f"WHERE queue_id IN ({','.join('?' * len(chunk))}) ORDER BY rowid", chunk)
            for row in rows:
                found.setdefault(row[0], []).append(RecipientRow(*tuple(row)[1:]))
        return {queue_id: tuple(rows) for queue_id, rows in found.items()}

    async def retry(self, queue_ids: Sequence[str] | None, now: float) -> list[str]:
        """Make deferred or failed messages due now (``None``: every one of them)."""
        async with self.db.write() as conn:
            if queue_ids is None:
                async with conn.execute(
                    "SELECT id FROM queue WHERE state IN (?, ?, ?)",
                    (MessageState.QUEUED, MessageState.DEFERRED, MessageState.FAILED),
                ) as cursor:
                    queue_ids = [r[0] for r in await cursor.fetchall()]
            done = []
            for queue_id in queue_ids:
                cursor = await conn.execute(
                    "UPDATE queue SET state = ?, next_attempt = ? WHERE id = ? "
                    "AND state IN (?, ?, ?) AND raw IS NOT NULL",
                    (MessageState.QUEUED, now, queue_id, MessageState.QUEUED,
                     MessageState.DEFERRED, MessageState.FAILED),
                )
                if cursor.rowcount:
                    await conn.execute(
                        "UPDATE queue_rcpt SET state = ?, updated = ? WHERE queue_id = ? "
                        "AND state IN (?, ?)",
                        (MessageState.QUEUED, now, queue_id, MessageState.FAILED,
                         MessageState.DEFERRED),
                    )
                    done.append(queue_id)
        self.wakeup.set()
        return done

    async def delete(self, queue_id: str, now: float) -> bool:
        async with self.db.write() as conn:
            cursor = await conn.execute("DELETE FROM queue WHERE id = ? AND state != ?",
                                        (queue_id, MessageState.SENDING))
            if cursor.rowcount:
                await insert_audits(conn, [AuditRecord("delete", now, queue_id,
                                                       reason="deleted by operator")])
            return cursor.rowcount > 0

    async def release_quarantined(self, queue_id: str, now: float) -> bool:
        """Send a quarantined message after all: its held recipients re-enter the queue."""
        async with self.db.write() as conn:
            cursor = await conn.execute(
                "UPDATE queue_rcpt SET state = ?, updated = ? WHERE queue_id = ? AND state = ?",
                (MessageState.QUEUED, now, queue_id, MessageState.QUARANTINED),
            )
            if not cursor.rowcount:
                return False
            await conn.execute("UPDATE queue SET state = ?, next_attempt = ? WHERE id = ?",
                               (MessageState.QUEUED, now, queue_id))
            await insert_audits(conn, [AuditRecord("release", now, queue_id,
                                                   reason="released from quarantine")])
        self.wakeup.set()
        return True

    async def counts(self) -> dict[str, int]:
        rows = await self.db.fetchall("SELECT state, count(*) FROM queue GROUP BY state")
        return {r[0]: r[1] for r in rows}


def _message(row: Any, recipients: tuple[RecipientRow, ...], raw: bytes | None = None) -> (
    QueuedMessage
):
    return QueuedMessage(
        id=row["id"], mail_from=row["mail_from"],
        mail_options=tuple(json.loads(row["mail_options"] or "[]")),
        message_id=row["message_id"], size=row["size"], state=row["state"],
        attempts=row["attempts"], created=row["created"], next_attempt=row["next_attempt"],
        last_error=row["last_error"], auth_user=row["auth_user"], recipients=recipients, raw=raw,
    )


# --- run in the writer's thread by Database.transact ---------------------------------------------

def _insert(conn: sqlite3.Connection, item: _Pending, relayed_inline: bool) -> list[str] | None:
    """Insert one session's messages, audits and (``relayed_inline``) relayed records.

    Returns None, having written nothing, when a relayed record names an order whose opt-out
    notice still waits for its buyer: ``record_relayed`` must then block that buyer.
    """
    if relayed_inline and _names_pending_order(conn, item.relayed):
        return None
    ids = []
    for message in item.messages:
        queue_id = message.queue_id or new_queue_id(item.now)
        ids.append(queue_id)
        state = message_state_from({r.state for r in message.recipients}, MessageState.QUEUED)
        conn.execute(
            "INSERT INTO queue (id, mail_from, mail_options, message_id, size, raw, state, "
            "created, next_attempt, auth_user, peer) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (queue_id, message.mail_from, json.dumps(list(message.mail_options)),
             message.message_id, len(message.raw), message.raw, state, item.now, item.now,
             message.auth_user, message.peer),
        )
        conn.executemany(
            "INSERT INTO queue_rcpt (queue_id, rcpt, state, buyer_key, class, updated) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(queue_id, r.rcpt, r.state, r.buyer_key, r.cls, item.now)
             for r in message.recipients],
        )
    if item.audits:
        conn.executemany(_AUDIT_SQL, [
            _audit_row(replace(a, queue_id=_resolve(a.queue_id, ids))) for a in item.audits])
    if relayed_inline and item.relayed:
        conn.executemany(
            "INSERT INTO relayed (message_id, buyer_key, order_id, queue_id, relayed_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [(r.message_id, r.buyer_key, r.order_id, r.queue_id, r.at)
             for r in _relayed_with_ids(item, ids)],
        )
    return ids


def _names_pending_order(conn: sqlite3.Connection, relayed: Sequence[RelayedRecord]) -> bool:
    orders = list({r.order_id for r in relayed if r.order_id})
    if not orders:
        return False
    return conn.execute(
        f"SELECT 1 FROM optout_orders WHERE buyer_key IS NULL AND order_id IN "
        f"({','.join('?' * len(orders))}) LIMIT 1", orders,
    ).fetchone() is not None


def _resolve(ref: str | None, ids: list[str]) -> str | None:
    return ids[int(ref[1:])] if ref and ref.startswith("#") else ref


def _relayed_with_ids(item: _Pending, ids: list[str]) -> list[RelayedRecord]:
    return [replace(r, queue_id=_resolve(r.queue_id, ids)) for r in item.relayed]


def _claim(conn: sqlite3.Connection, now: float, limit: int) -> list[QueuedMessage]:
    placeholders = ",".join("?" * len(PENDING_STATES))
    rows = conn.execute(
        f"SELECT {_COLUMNS}, raw FROM queue WHERE state IN ({placeholders}) "
        "AND next_attempt <= ? ORDER BY next_attempt LIMIT ?",
        (*PENDING_STATES, now, limit),
    ).fetchall()
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    conn.executemany("UPDATE queue SET state = ? WHERE id = ?",
                     [(MessageState.SENDING, queue_id) for queue_id in ids])
    recipients: dict[str, list[RecipientRow]] = {queue_id: [] for queue_id in ids}
    for r in conn.execute(
        f"SELECT queue_id, {_RCPT_COLUMNS} FROM queue_rcpt WHERE queue_id IN "
        f"({','.join('?' * len(ids))}) ORDER BY rowid", ids,
    ):
        recipients[r[0]].append(RecipientRow(*tuple(r)[1:]))
    return [_message(row, tuple(recipients[row["id"]]), raw=bytes(row["raw"] or b""))
            for row in rows]


def _record(conn: sqlite3.Connection, queue_id: str, attempts: tuple[Attempt, ...], now: float,
            retry_at: float | None) -> str:
    # Read the recipients' states in this transaction: a blocklist change may have cancelled
    # some of them since the claim.
    current = {r[0]: r[1] for r in conn.execute(
        "SELECT rcpt, state FROM queue_rcpt WHERE queue_id = ?", (queue_id,))}
    plan = plan_attempt(current, attempts, retry_at)
    if plan.updates:
        conn.executemany(
            "UPDATE queue_rcpt SET state = ?, last_error = ?, updated = ? "
            "WHERE queue_id = ? AND rcpt = ?",
            [(state, error, now, queue_id, rcpt) for rcpt, state, error in plan.updates],
        )
    errors = "; ".join(f"{a.rcpt}: {a.error}" for a in attempts if a.error)
    # Delivered everywhere: the body is no longer ours to keep.
    drop_raw = "raw = NULL, " if plan.state == MessageState.SENT else ""
    cursor = conn.execute(
        f"UPDATE queue SET {drop_raw}state = ?, attempts = attempts + 1, next_attempt = ?, "
        "last_error = ? WHERE id = ?",
        (plan.state, retry_at or now, errors or None, queue_id),
    )
    return plan.state if cursor.rowcount else ""
