"""The stress suite imports the shared test helpers (``sink``, ``daemon_helpers``, ``dovecot``)
as top-level modules, like the rest of the tests; make sure their directory is importable even
when pytest is pointed at this directory alone. The fixtures ``sink`` and ``dovecot`` come from
tests/conftest.py, which applies here too."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from stress_helpers import OutageSink  # noqa: E402  (needs the path above)


@pytest.fixture
async def outage_sink() -> AsyncIterator[OutageSink]:
    """A sink that records every DATA with its time and can refuse connections for a while."""
    server = await OutageSink().start()
    try:
        yield server
    finally:
        await server.stop()
