"""The state of mailrelay in one SQLite file; every SQL statement lives in this package.

Keeping SQL here (and nothing else knowing which database it talks to) leaves room for a
PostgreSQL store behind the same interface later (design.md, "Beyond one machine").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailrelay.store.db import Database, StoreError
from mailrelay.store.optout import OptOutRepo
from mailrelay.store.queue import QueueRepo, insert_audits
from mailrelay.store.records import AuditRecord

__all__ = ["Store", "StoreError"]


class Store:
    """Facade over the repositories that share one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.queue = QueueRepo(db)
        self.optout = OptOutRepo(db)

    @classmethod
    async def open(cls, path: Path | str) -> Store:
        return cls(await Database.open(path))

    async def close(self) -> None:
        await self.db.close()

    async def audit(self, records: list[AuditRecord]) -> None:
        async with self.db.write() as conn:
            await insert_audits(conn, records)

    async def audit_log(self, since: float | None = None, buyer_key: str | None = None,
                        limit: int = 1000) -> list[dict[str, Any]]:
        clauses, params = [], []
        if since is not None:
            clauses.append("at >= ?")
            params.append(since)
        if buyer_key is not None:
            clauses.append("buyer_key = ?")
            params.append(buyer_key)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self.db.fetchall(
            "SELECT at, queue_id, message_id, recipient, buyer_key, class, rule, action, mode, "
            f"reason FROM audit {where} ORDER BY id DESC LIMIT ?", (*params, limit))
        return [dict(r) for r in reversed(rows)]

    async def imap_state(self, account: str, mailbox: str) -> tuple[int, int] | None:
        row = await self.db.fetchone(
            "SELECT uidvalidity, last_uid FROM imap_state WHERE account = ? AND mailbox = ?",
            (account, mailbox))
        return (row[0], row[1]) if row else None

    async def set_imap_state(self, account: str, mailbox: str, uidvalidity: int, last_uid: int,
                             now: float) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                "INSERT INTO imap_state (account, mailbox, uidvalidity, last_uid, last_pass) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(account, mailbox) DO UPDATE SET "
                "uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid, "
                "last_pass = excluded.last_pass",
                (account, mailbox, uidvalidity, last_uid, now))

    async def imap_passes(self) -> list[dict[str, Any]]:
        rows = await self.db.fetchall(
            "SELECT account, mailbox, uidvalidity, last_uid, last_pass FROM imap_state "
            "ORDER BY account, mailbox")
        return [dict(r) for r in rows]

    async def imap_handled(self, account: str, mailbox: str, message_ids: list[str]) -> set[str]:
        if not message_ids:
            return set()
        rows = await self.db.fetchall(
            "SELECT message_id FROM imap_handled WHERE account = ? AND mailbox = ? AND "
            f"message_id IN ({','.join('?' * len(message_ids))})",
            (account, mailbox, *message_ids))
        return {r[0] for r in rows}

    async def mark_imap_handled(self, account: str, mailbox: str, message_id: str, kind: str,
                                now: float) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                "INSERT OR IGNORE INTO imap_handled (account, mailbox, message_id, kind, "
                "handled_at) VALUES (?, ?, ?, ?, ?)", (account, mailbox, message_id, kind, now))
