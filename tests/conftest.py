"""Shared fixtures: a real upstream SMTP sink and a real Dovecot, both on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from dovecot import dovecot_fixture, dovecot_tls_fixture  # noqa: F401  (fixtures)
from sink import Sink


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    """An aiosmtpd upstream on a free loopback port that records what it receives."""
    server = await Sink().start()
    try:
        yield server
    finally:
        await server.stop()
