"""The durable queue: accepted messages, their recipients' states, delivery attempts.

``enqueue`` uses group commit: SMTP sessions that finish DATA at about the same time are written
in one transaction and one fsync, and each session's 250 is sent only after the commit that holds
its own message. Under load that turns many fsyncs into few without weakening the promise.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from mailrelay.store.db import Database
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


def new_queue_id(now: float) -> str:
    """Sortable by time, unguessable enough to be no handle for anyone else's mail."""
    return f"{int(now * 1000):011X}{secrets.token_hex(3).upper()}"


@dataclass
class _Pending:
    messages: Sequence[NewMessage]
    audits: Sequence[AuditRecord]
    relayed: Sequence[RelayedRecord]
    now: float
    future: asyncio.Future[list[str]]


async def insert_audits(conn: aiosqlite.Connection, audits: Sequence[AuditRecord]) -> None:
    await conn.executemany(
        "INSERT INTO audit (at, queue_id, message_id, recipient, buyer_key, class, rule, action, "
        "mode, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(a.at, a.queue_id, a.message_id, a.recipient, a.buyer_key, a.cls, a.rule, a.action,
          a.mode, a.reason) for a in audits],
    )


class QueueRepo:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0  # transactions written by enqueue (for the benchmark's fsync figure)
        self.wakeup = asyncio.Event()  # set when new work is due for the delivery workers

    async def enqueue(self, messages: Sequence[NewMessage], audits: Sequence[AuditRecord] = (),
                      relayed: Sequence[RelayedRecord] = (), now: float = 0.0) -> list[str]:
        """Commit the messages durably; returns their queue ids once the commit is on disk.

        Audit and relayed records may use ``queue_id="#N"`` to refer to the N-th message.
        """
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(messages, audits, relayed, now, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # Shielded: a client that hangs up mid-commit must not cancel other sessions' commit.
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            results: list[list[str] | Exception] = []
            try:
                async with self.db.write() as conn:
                    for item in batch:
                        results.append(await self._insert_isolated(conn, item))
                self.commits += 1
            except BaseException as exc:  # the commit itself failed: nobody's mail is stored
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for item, outcome in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(outcome, Exception):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)
            self.wakeup.set()

    async def _insert_isolated(self, conn: aiosqlite.Connection,
                               item: _Pending) -> list[str] | Exception:
        """One session's rows under a savepoint: its failure must not fail the others'."""
        await conn.execute("SAVEPOINT one_session")
        try:
            ids = await self._insert(conn, item)
        except Exception as exc:
            await conn.execute("ROLLBACK TO one_session")
            await conn.execute("RELEASE one_session")
            return exc
        await conn.execute("RELEASE one_session")
        return ids

    async def _insert(self, conn: aiosqlite.Connection, item: _Pending) -> list[str]:
        ids = []
        for message in item.messages:
            queue_id = message.queue_id or new_queue_id(item.now)
            ids.append(queue_id)
            states = {r.state for r in message.recipients}
            state = message_state_from(states, MessageState.QUEUED)
            await conn.execute(
                "INSERT INTO queue (id, mail_from, mail_options, message_id, size, raw, state, "
                "created, next_attempt, auth_user, peer) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (queue_id, message.mail_from, json.dumps(list(message.mail_options)),
                 message.message_id, len(message.raw), message.raw, state, item.now, item.now,
                 message.auth_user, message.peer),
            )
            await conn.executemany(
                "INSERT INTO queue_rcpt (queue_id, rcpt, state, buyer_key, class, updated) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(queue_id, r.rcpt, r.state, r.buyer_key, r.cls, item.now)
                 for r in message.recipients],
            )

        def resolve(ref: str | None) -> str | None:
            return ids[int(ref[1:])] if ref and ref.startswith("#") else ref

        await insert_audits(conn, [_with_queue_id(a, resolve(a.queue_id)) for a in item.audits])
        await record_relayed(conn, [
            RelayedRecord(r.buyer_key, r.order_id, r.message_id, r.at, resolve(r.queue_id))
            for r in item.relayed
        ])
        return ids

    async def claim_due(self, now: float, limit: int = 1) -> list[QueuedMessage]:
        """Mark up to ``limit`` due messages as sending and return them with their raw bytes."""
        placeholders = ",".join("?" * len(PENDING_STATES))
        async with self.db.write() as conn:
            async with conn.execute(
                f"SELECT {_COLUMNS}, raw FROM queue WHERE state IN ({placeholders}) "
                "AND next_attempt <= ? ORDER BY next_attempt LIMIT ?",
                (*PENDING_STATES, now, limit),
            ) as cursor:
                rows = list(await cursor.fetchall())
            claimed = []
            for row in rows:
                await conn.execute("UPDATE queue SET state = ? WHERE id = ?",
                                   (MessageState.SENDING, row["id"]))
                recipients = await _recipients(conn, row["id"])
                claimed.append(_message(row, recipients, raw=bytes(row["raw"] or b"")))
        return claimed

    async def next_due(self) -> float | None:
        placeholders = ",".join("?" * len(PENDING_STATES))
        row = await self.db.fetchone(
            f"SELECT min(next_attempt) FROM queue WHERE state IN ({placeholders})",
            PENDING_STATES,
        )
        return row[0] if row and row[0] is not None else None

    async def record_attempt(self, queue_id: str, attempts: Sequence[Attempt], now: float,
                             retry_at: float | None) -> str:
        """Store per-recipient outcomes; deferred ones fail instead when ``retry_at`` is None."""
        async with self.db.write() as conn:
            for attempt in attempts:
                outcome = attempt.outcome
                if outcome == MessageState.DEFERRED and retry_at is None:
                    outcome = MessageState.FAILED
                # A recipient cancelled while this attempt was under way stays cancelled,
                # unless the attempt did deliver it: then the record must say so.
                settable = (*PENDING_STATES, *(
                    (MessageState.CANCELLED,) if outcome == MessageState.SENT else ()))
                await conn.execute(
                    "UPDATE queue_rcpt SET state = ?, last_error = ?, updated = ? "
                    f"WHERE queue_id = ? AND rcpt = ? AND state IN "
                    f"({','.join('?' * len(settable))})",
                    (outcome, attempt.error or None, now, queue_id, attempt.rcpt, *settable),
                )
            errors = "; ".join(f"{a.rcpt}: {a.error}" for a in attempts if a.error)
            await conn.execute(
                "UPDATE queue SET state = ?, attempts = attempts + 1, next_attempt = ?, "
                "last_error = ? WHERE id = ?",
                (MessageState.DEFERRED, retry_at or now, errors or None, queue_id),
            )
            state = await refresh_message_state(conn, queue_id)
            if state == MessageState.SENT:
                # Delivered everywhere: the body is no longer ours to keep.
                await conn.execute("UPDATE queue SET raw = NULL WHERE id = ?", (queue_id,))
        return state

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
        return [_message(r, await self._recipients(r["id"])) for r in rows]

    async def get(self, queue_id: str, with_raw: bool = False) -> QueuedMessage | None:
        row = await self.db.fetchone(f"SELECT {_COLUMNS}, raw FROM queue WHERE id = ?",
                                     (queue_id,))
        if row is None:
            return None
        raw = bytes(row["raw"]) if with_raw and row["raw"] is not None else None
        return _message(row, await self._recipients(queue_id), raw=raw)

    async def _recipients(self, queue_id: str) -> tuple[RecipientRow, ...]:
        rows = await self.db.fetchall(
            "SELECT rcpt, state, buyer_key, class, last_error FROM queue_rcpt "
            "WHERE queue_id = ? ORDER BY rowid", (queue_id,))
        return tuple(RecipientRow(*tuple(r)) for r in rows)

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


def _with_queue_id(record: AuditRecord, queue_id: str | None) -> AuditRecord:
    from dataclasses import replace

    return replace(record, queue_id=queue_id)


async def _recipients(conn: aiosqlite.Connection, queue_id: str) -> tuple[RecipientRow, ...]:
    async with conn.execute(
        "SELECT rcpt, state, buyer_key, class, last_error FROM queue_rcpt WHERE queue_id = ? "
        "ORDER BY rowid", (queue_id,),
    ) as cursor:
        return tuple(RecipientRow(*tuple(r)) for r in await cursor.fetchall())


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
