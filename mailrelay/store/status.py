"""Read-only summaries for ``mailrelay status``, and the daemon's store health probe.

Kept in a module of its own so that the status screen can grow without touching the
repositories the relay writes through; everything here reads, except :func:`probe_writable`,
which opens (and commits) an empty write transaction.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailrelay.store.records import MessageState

if TYPE_CHECKING:
    from mailrelay.store import Store
    from mailrelay.store.db import Database

#: Audit actions that mean "a recipient did not get this message": the policy's three drop
#: actions, and ``cancel`` (queued non-critical mail cancelled when its buyer opted out).
DROP_ACTIONS = ("reject", "discard", "quarantine", "cancel")
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class LastNotice:
    """The most recent opt-out notice applied (from any mailbox)."""

    order_id: str
    received: float
    buyer_key: str | None  # None: the order's buyer is not known yet
    notice_message_id: str | None


@dataclass(frozen=True, slots=True)
class MailboxPass:
    account: str
    mailbox: str
    last_pass: float | None
    last_uid: int


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """What ``mailrelay status`` shows, read in one go from the database."""

    queue: dict[str, int]  # every MessageState, 0 when none
    blocklist: int
    last_notice: LastNotice | None
    passes: tuple[MailboxPass, ...]
    drops: dict[str, int]  # DROP_ACTIONS -> recipients since ``since``
    since: float


async def read_status(store: Store, now: float, window: float = DAY) -> StatusSnapshot:
    """Queue by state, blocklist size, last notice, last IMAP pass per mailbox, recent drops."""
    counts = await store.queue.counts()
    since = now - window
    rows = await store.db.fetchall(
        "SELECT action, count(*) FROM audit WHERE at >= ? AND action IN "
        f"({','.join('?' * len(DROP_ACTIONS))}) GROUP BY action", (since, *DROP_ACTIONS))
    drops = dict.fromkeys(DROP_ACTIONS, 0) | {r[0]: int(r[1]) for r in rows}
    notice = await store.db.fetchone(
        "SELECT order_id, received, buyer_key, notice_message_id FROM optout_orders "
        "ORDER BY received DESC, rowid DESC LIMIT 1")
    passes = tuple(
        MailboxPass(p["account"], p["mailbox"], p["last_pass"], int(p["last_uid"]))
        for p in await store.imap_passes()
    )
    return StatusSnapshot(
        queue={s.value: int(counts.get(s.value, 0)) for s in MessageState},
        blocklist=await store.optout.size(),
        last_notice=LastNotice(*tuple(notice)) if notice else None,
        passes=passes,
        drops=drops,
        since=since,
    )


async def probe_writable(db: Database) -> bool:
    """True when a write transaction can be opened and committed on the daemon's own writer.

    This never cancels the ``BEGIN IMMEDIATE`` it started:
    cancelling it (there after 5 s, while SQLite's busy timeout is 10 s) leaves the statement
    running in aiosqlite's thread, and if another process releases its lock in between, the
    writer connection stays inside a transaction nobody ends, so every later write fails with
    "cannot start a transaction within a transaction". Here the wait is bounded by the busy
    timeout alone; callers that must answer sooner wait on this without cancelling it.
    """
    try:
        async with db.write() as conn:
            await conn.execute("PRAGMA user_version")
    except (sqlite3.Error, OSError, ValueError):  # ValueError: the connection is closed
        return False
    return True
