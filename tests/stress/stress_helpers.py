"""Shared pieces of the stress suite: self-checking test messages, an SMTP client that says
exactly how far a submission got, a sink that records every attempt and can go down for real,
and readers for the daemon's JSON log and its database.

Every message carries its id twice (``X-Test-Id`` and the ``Message-ID``) and a body derived from
that id alone, so a delivered copy can be compared byte for byte with what was submitted: a
truncated, corrupted or merged message is caught, not just a missing one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session
from daemon_helpers import DaemonProcess
from sink import Sink, SinkHandler

SENDER = "stress@seller.example"
RCPT = "customer@example.org"
CLIENT_NAME = "stress.client.test"

Outcome = Literal["accepted", "refused", "unacknowledged", "not-sent"]


# ----- messages ----------------------------------------------------------------------------------

def message_id(test_id: str) -> str:
    return f"<{test_id}@stress.test>"


def make_message(test_id: str, lines: int = 8) -> bytes:
    """A message whose every byte follows from ``test_id`` (and ``lines``)."""
    digest = hashlib.sha256(test_id.encode()).hexdigest()
    head = (f"From: Stress <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: stress {test_id}\r\n"
            f"Message-ID: {message_id(test_id)}\r\nX-Test-Id: {test_id}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
    body = "".join(f"{test_id} {n:04d} {digest}\r\n" for n in range(lines))
    return (head + body + f"END {test_id}\r\n").encode()


def id_of(raw: bytes) -> str | None:
    """The X-Test-Id of raw (first one), None when it has none."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-test-id:"):
            return line.split(b":", 1)[1].strip().decode("ascii", "replace")
    return None


def identify(raw: bytes, lines: int = 8) -> str:
    """The id of a delivered copy; ValueError unless it is exactly what was submitted.

    The relay prepends one ``Received:`` header (folded over several lines) and changes nothing
    else, so everything after it must equal ``make_message(id)``.
    """
    if not raw.startswith(b"Received: "):
        raise ValueError(f"no Received header first: {raw[:80]!r}")
    rest = raw.split(b"\r\n", 1)[1]
    while rest[:1] in (b" ", b"\t"):  # continuation lines of the Received header
        rest = rest.split(b"\r\n", 1)[1]
    test_id = id_of(rest)
    if test_id is None:
        raise ValueError(f"no X-Test-Id: {rest[:120]!r}")
    if rest.lower().count(b"\r\nx-test-id:") != 1:
        raise ValueError(f"{test_id}: several X-Test-Id headers (merged messages?)")
    if rest != make_message(test_id, lines):
        raise ValueError(f"{test_id}: content differs from what was submitted")
    return test_id


# ----- the submitting client ---------------------------------------------------------------------

@dataclass(frozen=True)
class Submission:
    """One try at submitting one message, and how far it got.

    accepted: the final 250 was read. refused: the server answered with a final non-2xx reply
    (the message is not ours to expect). unacknowledged: the data went out but the connection
    died before the final reply (the relay may or may not have stored it). not-sent: it failed
    before DATA (no content left the client).
    """

    test_id: str
    outcome: Outcome
    code: int | None
    started: float  # time.monotonic()
    latency: float  # seconds from the start of the transaction (or connect) to its end
    error: str = ""


async def connect(port: int, timeout: float = 10.0) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=timeout,
                             start_tls=False, use_tls=False, local_hostname=CLIENT_NAME)
    await client.connect()
    return client


async def send_on(client: aiosmtplib.SMTP, test_id: str, raw: bytes,
                  started: float | None = None, rcpt: str = RCPT) -> Submission:
    """MAIL, RCPT, DATA on an open connection; never raises for SMTP or network trouble."""
    started = time.monotonic() if started is None else started
    phase: Outcome = "not-sent"
    try:
        await client.mail(SENDER)
        await client.rcpt(rcpt)
        phase = "unacknowledged"
        reply = await client.data(raw)
    except aiosmtplib.SMTPResponseException as exc:  # a real reply, and not a 2xx
        return Submission(test_id, "refused", exc.code, started, time.monotonic() - started,
                          exc.message)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return Submission(test_id, phase, None, started, time.monotonic() - started, repr(exc))
    return Submission(test_id, "accepted", reply.code, started, time.monotonic() - started)


async def submit(port: int, test_id: str, raw: bytes, timeout: float = 10.0,
                 rcpt: str = RCPT) -> Submission:
    """One connection, one message, QUIT; the latency includes the connect."""
    started = time.monotonic()
    try:
        client = await connect(port, timeout)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return Submission(test_id, "not-sent", None, started, time.monotonic() - started,
                          repr(exc))
    try:
        return await send_on(client, test_id, raw, started, rcpt)
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await client.quit()
        client.close()


# ----- an upstream that records attempts and can really go down ----------------------------------

@dataclass(frozen=True)
class DataEvent:
    """The sink saw a whole message at DATA and answered ``reply``."""

    at: float  # time.time(), comparable with the daemon's log timestamps
    test_id: str | None
    reply: str


@dataclass
class RecordingHandler(SinkHandler):
    """Records every DATA; while ``hold`` is set to an unset Event, keeps the reply back."""

    events: list[DataEvent] = field(default_factory=list)
    hold: asyncio.Event | None = None
    holding: int = 0  # transactions waiting for their reply right now

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.hold is not None:
            self.holding += 1
            try:
                await self.hold.wait()
            finally:
                self.holding -= 1
        raw = bytes(envelope.original_content or b"")
        self.events.append(DataEvent(time.time(), id_of(raw), self.data_reply))
        return await super().handle_DATA(server, session, envelope)


def free_low_port() -> int:
    """A free loopback port below the ephemeral range.

    A port the sink gives up for a while (outage) must not be taken meanwhile, and a client
    connecting to a closed port in the ephemeral range can be handed that very port as its own
    and connect to itself (TCP simultaneous open); ports below 32768 are never picked for
    outgoing connections.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32000")


class OutageSink(Sink):
    """The test sink, plus: every DATA is recorded with its time, and ``refuse()`` takes it down
    (listening socket closed, open connections dropped) until ``recover()``."""

    def __init__(self) -> None:
        super().__init__()
        self.handler: RecordingHandler = RecordingHandler()
        self._protocols: set[SMTP] = set()

    async def start(self, port: int = 0) -> OutageSink:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            self.handler.connections += 1
            protocol = SMTP(self.handler, hostname="sink.test", ident="sink",
                            enable_SMTPUTF8=True, data_size_limit=100 * 1024 * 1024)
            self._protocols.add(protocol)
            return protocol

        self.server = await loop.create_server(factory, "127.0.0.1", port or free_low_port(),
                                               reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def refuse(self) -> None:
        """Down: new connections are refused and the open ones are cut."""
        await self.stop()
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.abort()
        self._protocols.clear()

    async def recover(self) -> None:
        await self.start(self.port)


# ----- the daemon, its log and its database ------------------------------------------------------

@contextlib.asynccontextmanager
async def daemon_running(config: Path) -> AsyncIterator[list[DaemonProcess]]:
    """Start the daemon; yields the list of its incarnations (a test may kill and restart it,
    appending the new one). Whatever is still running at the end is killed."""
    runs = [await DaemonProcess(config).astart()]
    try:
        yield runs
    finally:
        for run in runs:
            if run.proc is not None and run.proc.poll() is None:
                await asyncio.to_thread(run.kill)


def log_events(runs: Iterable[DaemonProcess], event: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines named ``event``, with ``t`` = their time as a Unix time."""
    found = []
    for run in runs:
        for line in run.output().splitlines():
            if line.startswith("<") and ">" in line[:4]:  # the journald priority prefix
                line = line.split(">", 1)[1]
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                entry["t"] = datetime.fromisoformat(entry["timestamp"]).timestamp()
                found.append(entry)
    return found


def query(database: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the daemon's database from the outside, as an operator would."""
    with contextlib.closing(sqlite3.connect(database, timeout=15)) as conn:
        return list(conn.execute(sql, params).fetchall())


def unfinished(database: Path) -> int:
    """Queued messages not yet in a final state."""
    rows = query(database, "SELECT count(*) FROM queue WHERE state NOT IN "
                           "('sent', 'failed', 'cancelled', 'dropped')")
    return int(rows[0][0])


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
                     interval: float = 0.2) -> float:
    """Poll ``predicate`` (run in a thread) until true; returns the seconds it took."""
    started = time.monotonic()
    while not await asyncio.to_thread(predicate):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def wait_drained(database: Path, timeout: float) -> float:
    """Wait until no queued message is left unfinished; on timeout say which ones are stuck."""
    try:
        return await wait_until(lambda: unfinished(database) == 0, timeout, "the queue to drain",
                                interval=0.1)
    except AssertionError as exc:
        stuck = query(database, "SELECT message_id, state, attempts, last_error FROM queue "
                                "WHERE state NOT IN ('sent', 'failed', 'cancelled', 'dropped')")
        raise AssertionError(f"{exc}; unfinished: {stuck[:20]}") from None
