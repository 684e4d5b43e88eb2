"""The SQLite connection pair: one writer behind a lock, one reader.

WAL lets the CLI and the daemon share the file; ``synchronous=FULL`` makes every commit survive
power loss, because a 250 reply is a durability promise. Writes go through one connection behind
an ``asyncio.Lock`` with ``BEGIN IMMEDIATE``: concurrent tasks on one sqlite3 connection would
otherwise share one transaction, and a deferred read-to-write upgrade fails at once with "database
is locked" (libraries.md section 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from mailrelay.store.schema import MIGRATIONS, SCHEMA_VERSION

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000


class StoreError(Exception):
    """The database cannot be used (newer schema, unreadable file, ...)."""


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = await _schema_version(conn)
        if version > SCHEMA_VERSION:  # refuse before touching the file (WAL changes its header)
            raise StoreError(
                f"database schema version {version} is newer than this mailrelay understands "
                f"({SCHEMA_VERSION}): upgrade mailrelay"
            )
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = FULL")
        await conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        # aiosqlite's worker thread is not a daemon thread: an unclosed connection would keep
        # the process alive after the error has been reported.
        await conn.close()
        raise
    return conn


async def _schema_version(conn: aiosqlite.Connection) -> int:
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def migrate(conn: aiosqlite.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema to ``target``; refuse a database newer than this code."""
    version = await _schema_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database schema version {version} is newer than this mailrelay understands "
            f"({SCHEMA_VERSION}): upgrade mailrelay"
        )
    for number in range(version + 1, target + 1):
        await conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-check under the write lock: another process may have migrated meanwhile.
            if await _schema_version(conn) >= number:
                await conn.execute("ROLLBACK")
                continue
            for statement in MIGRATIONS[number - 1]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number}")
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
    return await _schema_version(conn)


class Database:
    """A writer and a reader connection to one SQLite file."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str, *, migrate_schema: bool = True) -> Database:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = await _connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        except StoreError:
            raise
        try:
            if migrate_schema:
                try:
                    await migrate(writer)
                except sqlite3.Error as exc:
                    raise StoreError(f"cannot migrate database {path}: {exc}") from None
            elif await _schema_version(writer) > SCHEMA_VERSION:
                await migrate(writer, 0)  # raises the "newer than this code" error
            reader = await _connect(path)
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader)

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction on the writer; committed when the block ends."""
        async with self._lock:
            begin = asyncio.ensure_future(self._writer.execute("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
            except asyncio.CancelledError:
                # The BEGIN still runs in aiosqlite's thread (it may be waiting out the busy
                # timeout): end whatever it opens before the lock lets the next writer in,
                # or every later write would fail "within a transaction".
                with contextlib.suppress(Exception):
                    await begin
                with contextlib.suppress(Exception):
                    await self._writer.execute("ROLLBACK")
                raise
            try:
                yield self._writer
            except BaseException:
                await asyncio.shield(self._writer.execute("ROLLBACK"))
                raise
            # Shielded: a cancelled SMTP session must not leave a half-finished commit behind.
            await asyncio.shield(self._writer.execute("COMMIT"))

    async def run_write(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        async with self.write() as conn:
            return await work(conn)

    async def fetchall(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[Any]:
        async with self._reader.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def fetchone(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        async with self._reader.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def schema_version(self) -> int:
        return await _schema_version(self._reader)

    async def check_writable(self) -> bool:
        """True when a write transaction can be opened and committed (for /healthz)."""
        try:
            async with self.write() as conn:
                await conn.execute("PRAGMA user_version")
        except (sqlite3.Error, OSError):
            return False
        return True
