"""The SQLite connection pair: one writer behind a lock, one reader.

WAL lets the CLI and the daemon share the file. Writes go through one connection behind an
``asyncio.Lock`` with ``BEGIN IMMEDIATE``: concurrent tasks on one sqlite3 connection would
otherwise share one transaction, and a deferred read-to-write upgrade fails at once with "database
is locked" (libraries.md section 5).

Two ways to write. ``write()`` is an async transaction: every statement is a hop to aiosqlite's
thread. ``transact(fn, ...)`` runs a plain function over the sqlite3 connection in that thread,
BEGIN to COMMIT in one hop, and functions queued while a hop is under way share the next
transaction (group commit), each under its own savepoint so one failure fails only its caller.
The hot paths (enqueue, claim, record an attempt) use ``transact``: hops cost the event loop far
more than the SQL does.

Durability: a commit that backs a promise (the 250 after DATA, a blocklist change, an operator's
command) runs with ``synchronous=FULL`` and is on disk when it returns. ``transact(...,
durable=False)`` commits with ``synchronous=NORMAL``: in WAL mode that skips the fsync but never
corrupts; after a power loss the last such commits may be lost, and the next FULL commit's fsync
of the WAL makes every earlier frame durable too. Only delivery bookkeeping is non-durable
(claiming a message, recording an attempt): losing it means the message is sent again, which
at-least-once delivery allows. A batch with any durable function commits FULL.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from mailrelay.store.schema import MIGRATIONS, SCHEMA_VERSION

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000
FULL, NORMAL = "FULL", "NORMAL"


class StoreError(Exception):
    """The database cannot be used (newer schema, unreadable file, ...)."""


async def in_thread(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(sqlite3_connection, *args)`` in ``conn``'s own thread: one hop for many statements.

    aiosqlite (0.20-0.22) has no public call for this; ``_execute`` is the method all its public
    ones go through, and ``_conn`` the sqlite3 connection that thread owns.
    """
    return await conn._execute(fn, conn._conn, *args)


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
        await conn.execute(f"PRAGMA synchronous = {FULL}")
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


@dataclass(slots=True)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    durable: bool
    future: asyncio.Future[Any]


def _fetchall(conn: sqlite3.Connection, sql: str, params: Any) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def _fetchone(conn: sqlite3.Connection, sql: str, params: Any) -> Any:
    return conn.execute(sql, params).fetchone()


class Database:
    """A writer and a reader connection to one SQLite file."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = asyncio.Lock()
        self._jobs: list[_Job] = []
        self._flusher: asyncio.Task[None] | None = None
        self._level = FULL  # the writer's PRAGMA synchronous; changed only in its thread
        self.commits = 0  # transactions committed by transact (group commits)
        self.durable_commits = 0  # those of them that held a durable function (fsync count)

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

    def _begin(self, conn: sqlite3.Connection, level: str) -> None:
        """In the writer's thread: set the commit's durability, then take the write lock.

        ``PRAGMA synchronous`` cannot change inside a transaction, so it is set just before.
        """
        if self._level != level:
            conn.execute(f"PRAGMA synchronous = {level}")
            self._level = level
        conn.execute("BEGIN IMMEDIATE")

    @asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One durable ``BEGIN IMMEDIATE`` transaction on the writer; committed at block end."""
        async with self._lock:
            begin = asyncio.ensure_future(in_thread(self._writer, self._begin, FULL))
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

    async def transact(self, fn: Callable[..., T], *args: Any, durable: bool = True) -> T:
        """Run ``fn(sqlite3_connection, *args)`` in a write transaction in the writer's thread.

        Returns once the transaction holding it has committed. Functions queued while another
        batch is in the thread share the next transaction; ``fn`` runs under a savepoint, so
        its exception rolls back only its own writes and is raised here. ``durable=False``
        commits without fsync (see the module docstring). A caller cancelled before its batch
        starts is left out of it; once started, the function runs and commits regardless.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(fn, args, durable, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._jobs:
            async with self._lock:
                jobs = [job for job in self._jobs if not job.future.done()]
                self._jobs = []
                if not jobs:
                    continue
                try:
                    outcomes = await in_thread(self._writer, self._run_batch, jobs)
                except BaseException as exc:  # the commit failed: no function's writes stored
                    for job in jobs:
                        if job.future.done():
                            continue
                        if isinstance(exc, asyncio.CancelledError):
                            job.future.cancel()
                        else:
                            job.future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
            if any(ok for ok, _ in outcomes):  # else it was rolled back
                self.commits += 1
                self.durable_commits += any(job.durable for job in jobs)
            for job, (ok, value) in zip(jobs, outcomes, strict=True):
                if not job.future.done():
                    if ok:
                        job.future.set_result(value)
                    else:
                        job.future.set_exception(value)

    def _run_batch(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[bool, Any]]:
        """In the writer's thread: one transaction for all ``jobs``; (ok, result or error) each."""
        self._begin(conn, FULL if any(job.durable for job in jobs) else NORMAL)
        try:
            if len(jobs) == 1:  # alone: its failure is the transaction's, no savepoint needed
                try:
                    outcomes = [(True, jobs[0].fn(conn, *jobs[0].args))]
                except Exception as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    return [(False, exc)]
            else:
                outcomes = [_run_isolated(conn, job) for job in jobs]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    async def fetchall(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[Any]:
        return await in_thread(self._reader, _fetchall, sql, params)

    async def fetchone(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        return await in_thread(self._reader, _fetchone, sql, params)

    async def schema_version(self) -> int:
        return await _schema_version(self._reader)


def _run_isolated(conn: sqlite3.Connection, job: _Job) -> tuple[bool, Any]:
    """One function of a group commit under a savepoint: its failure must not fail the others."""
    conn.execute("SAVEPOINT job")
    try:
        result = job.fn(conn, *job.args)
    except Exception as exc:
        if not conn.in_transaction:  # SQLite rolled the whole transaction back (disk full, ...)
            raise
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return False, exc
    conn.execute("RELEASE job")
    return True, result
