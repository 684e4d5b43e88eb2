"""Shared fixtures: a real upstream SMTP sink, a real Dovecot (both on 127.0.0.1), the daemons a
test starts, and a store on a temporary SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess
from dovecot import dovecot_fixture, dovecot_tls_fixture  # noqa: F401  (fixtures)
from sink import Sink

from mailrelay.store import Store


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """An aiosmtpd upstream on a free loopback port that records what it receives."""
    server = await Sink().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def daemons() -> AsyncIterator[list[DaemonProcess]]:
    """Daemons a test started (append them); killed at teardown if still running."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            await asyncio.to_thread(daemon.proc.wait, 10)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "mailrelay.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    """A migrated store on a fresh SQLite file (WAL), closed after the test."""
    opened = await Store.open(db_path)
    yield opened
    await opened.close()
