"""Who opted out: the blocklist, opted-out orders, and the records that tie orders to buyers.

Amazon's notice names the order, never the buyer, so an order resolves to a buyer through the
messages relayed to buyers and the buyers' own messages. A notice that cannot be resolved yet is
kept, and the buyer is blocked the moment the order's buyer becomes known.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

from mailrelay.policy.addresses import parse_buyer_address
from mailrelay.store.db import Database
from mailrelay.store.records import (
    PENDING_STATES,
    BlockEntry,
    BlockResult,
    BuyerMessageRecord,
    MessageState,
    RelayedRecord,
)


def _marketplace(buyer_key: str) -> str:
    parsed = parse_buyer_address(buyer_key)
    return parsed.marketplace if parsed else buyer_key.rsplit(".", 1)[-1].upper()


async def cancel_noncritical(conn: aiosqlite.Connection, buyer_key: str, now: float) -> list[
    tuple[str, str]
]:
    """Cancel the buyer's queued non-critical recipients not yet sent; returns what it cancelled."""
    # Recipients of a message being sent right now are cancelled too: if this attempt is
    # deferred the retry must not happen (record_attempt keeps "cancelled" unless it was sent).
    placeholders = ",".join("?" * len(PENDING_STATES))
    async with conn.execute(
        f"SELECT queue_id, rcpt FROM queue_rcpt WHERE buyer_key = ? "
        f"AND class = 'non-critical' AND state IN ({placeholders})",
        (buyer_key, *PENDING_STATES),
    ) as cursor:
        rows = [(r[0], r[1]) for r in await cursor.fetchall()]
    for queue_id, rcpt in rows:
        await conn.execute(
            "UPDATE queue_rcpt SET state = ?, last_error = ?, updated = ? "
            "WHERE queue_id = ? AND rcpt = ?",
            (MessageState.CANCELLED, "buyer opted out", now, queue_id, rcpt),
        )
        await conn.execute(
            "INSERT INTO audit (at, queue_id, recipient, buyer_key, class, action, reason) "
            "VALUES (?, ?, ?, ?, 'non-critical', 'cancel', 'buyer opted out while queued')",
            (now, queue_id, rcpt, buyer_key),
        )
    for queue_id in {q for q, _ in rows}:
        await refresh_message_state(conn, queue_id)
    return rows


async def refresh_message_state(conn: aiosqlite.Connection, queue_id: str) -> str:
    """Derive a message's state from its recipients' (after a cancel or release)."""
    async with conn.execute(
        "SELECT state FROM queue_rcpt WHERE queue_id = ?", (queue_id,)
    ) as cursor:
        states = {r[0] for r in await cursor.fetchall()}
    async with conn.execute("SELECT state FROM queue WHERE id = ?", (queue_id,)) as cursor:
        row = await cursor.fetchone()
    if row is None:
        return ""
    current = row[0]
    if current == MessageState.SENDING:
        return current
    new = message_state_from(states, current)
    if new != current:
        await conn.execute("UPDATE queue SET state = ? WHERE id = ?", (new, queue_id))
    return new


def message_state_from(states: set[str], current: str) -> str:
    """Pure: the message state implied by its recipients' states."""
    if MessageState.QUARANTINED in states:
        return MessageState.QUARANTINED
    if states & set(PENDING_STATES):
        return current if current in PENDING_STATES else MessageState.QUEUED
    if MessageState.FAILED in states:
        return MessageState.FAILED
    if MessageState.SENT in states:
        return MessageState.SENT
    if MessageState.CANCELLED in states:
        return MessageState.CANCELLED
    return MessageState.DROPPED if states else current


async def block(
    conn: aiosqlite.Connection, buyer_key: str, source: str, reason: str,
    evidence: dict[str, Any], now: float,
) -> BlockResult:
    async with conn.execute(
        "SELECT 1 FROM blocklist WHERE buyer_key = ?", (buyer_key,)
    ) as cursor:
        exists = await cursor.fetchone() is not None
    if exists:
        await conn.execute(
            "UPDATE blocklist SET last_seen = ? WHERE buyer_key = ?", (now, buyer_key)
        )
    else:
        await conn.execute(
            "INSERT INTO blocklist (buyer_key, marketplace, source, reason, evidence, "
            "first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (buyer_key, _marketplace(buyer_key), source, reason,
             json.dumps(evidence, sort_keys=True), now, now),
        )
        await conn.execute(
            "INSERT INTO audit (at, buyer_key, action, reason) VALUES (?, ?, 'block', ?)",
            (now, buyer_key, f"{source}: {reason}".strip(": ")),
        )
    cancelled = await cancel_noncritical(conn, buyer_key, now)
    return BlockResult(buyer_key, not exists, tuple(cancelled))


async def _resolve_pending_orders(
    conn: aiosqlite.Connection, order_id: str | None, buyer_key: str, now: float
) -> BlockResult | None:
    """Block the buyer when ``order_id`` was reported opted out before its buyer was known."""
    if not order_id:
        return None
    async with conn.execute(
        "SELECT notice_message_id FROM optout_orders WHERE order_id = ? AND buyer_key IS NULL",
        (order_id,),
    ) as cursor:
        row = await cursor.fetchone()
    if row is None:
        return None
    await conn.execute(
        "UPDATE optout_orders SET buyer_key = ?, resolved_at = ? WHERE order_id = ?",
        (buyer_key, now, order_id),
    )
    evidence = {"notice_message_id": row[0], "order_id": order_id}
    return await block(conn, buyer_key, "notice", f"opt-out notice for order {order_id}",
                       evidence, now)


class OptOutRepo:
    """Blocklist, opted-out orders, relayed-message log and buyer messages."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def block(self, buyer_key: str, source: str, reason: str = "",
                    evidence: dict[str, Any] | None = None, now: float = 0.0) -> BlockResult:
        async with self.db.write() as conn:
            return await block(conn, buyer_key, source, reason, evidence or {}, now)

    async def block_many(self, keys: Sequence[str], source: str, reason: str,
                         now: float) -> list[BlockResult]:
        """All or nothing, in one transaction (used by ``blocklist import``)."""
        async with self.db.write() as conn:
            return [await block(conn, k, source, reason, {}, now) for k in keys]

    async def unblock(self, keys: Iterable[str], now: float) -> list[str]:
        removed = []
        async with self.db.write() as conn:
            for key in keys:
                cursor = await conn.execute("DELETE FROM blocklist WHERE buyer_key = ?", (key,))
                if cursor.rowcount:
                    removed.append(key)
                    await conn.execute(
                        "INSERT INTO audit (at, buyer_key, action) VALUES (?, ?, 'unblock')",
                        (now, key),
                    )
        return removed

    async def blocked(self, keys: Iterable[str]) -> set[str]:
        keys = list(dict.fromkeys(keys))
        if not keys:
            return set()
        rows = await self.db.fetchall(
            f"SELECT buyer_key FROM blocklist WHERE buyer_key IN ({','.join('?' * len(keys))})",
            keys,
        )
        return {r[0] for r in rows}

    async def entries(self) -> list[BlockEntry]:
        rows = await self.db.fetchall(
            "SELECT buyer_key, marketplace, source, reason, evidence, first_seen, last_seen "
            "FROM blocklist ORDER BY first_seen, buyer_key"
        )
        return [BlockEntry(*tuple(r)) for r in rows]

    async def size(self) -> int:
        row = await self.db.fetchone("SELECT count(*) FROM blocklist")
        return int(row[0])

    async def opted_out_orders(self, order_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(order_ids))
        if not ids:
            return set()
        rows = await self.db.fetchall(
            f"SELECT order_id FROM optout_orders WHERE order_id IN ({','.join('?' * len(ids))})",
            ids,
        )
        return {r[0] for r in rows}

    async def buyers_for_order(self, order_id: str) -> list[str]:
        rows = await self.db.fetchall(
            "SELECT buyer_key FROM relayed WHERE order_id = ? UNION "
            "SELECT buyer_key FROM buyer_messages WHERE order_id = ?",
            (order_id, order_id),
        )
        return sorted(r[0] for r in rows)

    async def apply_notice(self, order_id: str, notice_message_id: str | None,
                           buyer_key: str | None, now: float) -> list[BlockResult]:
        """Record an opt-out notice: block the order's buyers now, or keep the order for later."""
        buyers = [buyer_key] if buyer_key else await self.buyers_for_order(order_id)
        evidence = {"notice_message_id": notice_message_id, "order_id": order_id}
        async with self.db.write() as conn:
            await conn.execute(
                "INSERT INTO optout_orders (order_id, notice_message_id, received, buyer_key, "
                "resolved_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(order_id) DO UPDATE SET "
                "buyer_key = coalesce(optout_orders.buyer_key, excluded.buyer_key), "
                "resolved_at = coalesce(optout_orders.resolved_at, excluded.resolved_at)",
                (order_id, notice_message_id, now, buyers[0] if buyers else None,
                 now if buyers else None),
            )
            return [
                await block(conn, b, "notice", f"opt-out notice for order {order_id}",
                            evidence, now)
                for b in buyers
            ]

    async def unresolved_orders(self) -> list[str]:
        rows = await self.db.fetchall(
            "SELECT order_id FROM optout_orders WHERE buyer_key IS NULL ORDER BY received"
        )
        return [r[0] for r in rows]

    async def record_buyer_message(
        self, rec: BuyerMessageRecord
    ) -> tuple[bool, BlockResult | None]:
        """Store a buyer's message for threading; returns (new, block caused by a pending order)."""
        async with self.db.write() as conn:
            cursor = await conn.execute(
                "INSERT OR IGNORE INTO buyer_messages (message_id, buyer_key, buyer_address, "
                "order_id, token, subject, text, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.message_id, rec.buyer_key, rec.buyer_address, rec.order_id, rec.token,
                 rec.subject, rec.text, rec.received),
            )
            new = cursor.rowcount > 0
            blocked = await _resolve_pending_orders(conn, rec.order_id, rec.buyer_key,
                                                    rec.received)
        return new, blocked

    async def buyer_messages(self, buyer_keys: Iterable[str], limit: int = 50) -> list[
        BuyerMessageRecord
    ]:
        keys = list(dict.fromkeys(buyer_keys))
        if not keys:
            return []
        rows = await self.db.fetchall(
            "SELECT message_id, buyer_key, buyer_address, order_id, token, subject, text, "
            f"received FROM buyer_messages WHERE buyer_key IN ({','.join('?' * len(keys))}) "
            "ORDER BY received DESC LIMIT ?",
            (*keys, limit),
        )
        return [BuyerMessageRecord(*tuple(r)) for r in rows]

    async def buyer_messages_by_id(self, message_ids: Iterable[str]) -> list[BuyerMessageRecord]:
        ids = list(dict.fromkeys(message_ids))
        if not ids:
            return []
        rows = await self.db.fetchall(
            "SELECT message_id, buyer_key, buyer_address, order_id, token, subject, text, "
            f"received FROM buyer_messages WHERE message_id IN ({','.join('?' * len(ids))})",
            ids,
        )
        return [BuyerMessageRecord(*tuple(r)) for r in rows]


async def record_relayed(conn: aiosqlite.Connection, records: Sequence[RelayedRecord]) -> list[
    BlockResult
]:
    """Log messages to buyers (inside the enqueue transaction); resolve pending opt-out orders."""
    results = []
    for rec in records:
        await conn.execute(
            "INSERT INTO relayed (message_id, buyer_key, order_id, queue_id, relayed_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (rec.message_id, rec.buyer_key, rec.order_id, rec.queue_id, rec.at),
        )
        result = await _resolve_pending_orders(conn, rec.order_id, rec.buyer_key, rec.at)
        if result is not None:
            results.append(result)
    return results
