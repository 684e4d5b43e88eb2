"""The daemon as a process: what a 250 promises survives SIGKILL, and SIGTERM drains cleanly.

`mailrelay run` runs as a subprocess; the upstream is a real sink in the test's event loop,
started late or restarted on the same port where the scenario needs an outage.
"""

from __future__ import annotations

import asyncio
import collections
import email
import signal
import time
from pathlib import Path
from typing import Any

import aiosmtplib
from daemon_helpers import DaemonProcess, port_open, write_config
from relay_helpers import (
    SENDER,
    RawClient,
    asubmit,
    message,
    queue_id,
    queue_json,
    start,
    without_received,
)
from sink import Sink, SinkHandler, free_port


async def test_sigkill_after_250_before_upstream_is_reachable(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """250 with the upstream down, kill -9, restart with the upstream up: the mail arrives."""
    port = free_port()  # the sink is not running yet
    config = write_config(tmp_path, port)
    daemon = await start(daemons, config)
    code, reply = await asubmit(daemon.port, message("survivor"), ["someone@example.test"])
    assert code == 250
    qid = queue_id(reply)
    daemon.kill()
    sink = await Sink().start(port)
    try:
        await start(daemons, config)
        (got,) = await sink.wait_for(1)
        assert b"Subject: survivor" in got.data and f"id {qid}".encode() in got.data
        await asyncio.sleep(0.5)
        assert len(sink.messages) == 1
    finally:
        await sink.stop()


async def test_sigterm_mid_data_waits_for_the_client(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """SIGTERM mid-DATA: no new clients, but this one gets its 250, the mail arrives, exit 0."""
    config = write_config(tmp_path, sink.port, shutdown_timeout="5s")
    daemon = await start(daemons, config)
    client = await RawClient.connect(daemon.port)
    await client.open_transaction(["someone@example.test"])
    raw = message("half way", b"line of the body\r\n" * 200)
    client.writer.write(raw[: len(raw) // 2])
    await client.writer.drain()
    await asyncio.sleep(0.2)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert daemon.proc.poll() is None  # waiting for the client
    assert not port_open(daemon.port)  # but no longer accepting
    client.writer.write(raw[len(raw) // 2:] + b".\r\n")
    reply = await client.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as"), reply
    assert (await client.reply()).startswith("421 4.3.2")
    client.close()
    assert await asyncio.to_thread(daemon.proc.wait, 10) == 0
    if not sink.messages:  # not forwarded before the exit: the next start does it
        await start(daemons, config)
    (got,) = await sink.wait_for(1)
    assert without_received(got.data)[1] == raw


async def test_sigterm_with_a_stalled_client_exits_0_by_the_deadline(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """A client that never finishes DATA is cut off at shutdown_timeout; nothing half-stored."""
    config = write_config(tmp_path, sink.port, shutdown_timeout="2s")
    daemon = await start(daemons, config)
    client = await RawClient.connect(daemon.port)
    await client.open_transaction(["someone@example.test"])
    client.writer.write(message("never finished", b"partial body\r\n" * 50))
    await client.writer.drain()
    await asyncio.sleep(0.2)
    assert daemon.proc is not None
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.proc.wait, 15) == 0
    assert 1.8 <= time.monotonic() - started <= 4.5
    assert await client.reply() == ""  # dropped
    client.close()
    assert await queue_json(config) == []
    assert sink.messages == []


class SlowHandler(SinkHandler):
    """A sink that takes 30 ms per message, so a kill finds some mail still in flight."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0.03)
        return await super().handle_DATA(server, session, envelope)


async def test_fifty_concurrent_all_arrive_despite_sigkill(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """50 concurrent clients, SIGKILL right after the last 250, restart: every one arrives."""
    sink = Sink()
    sink.handler = SlowHandler()
    await sink.start()
    config = write_config(tmp_path, sink.port, queue={"workers": 4})
    daemon = await start(daemons, config)
    ids = [f"<bulk-{n}@shop.test>" for n in range(50)]

    async def one(message_id: str) -> str:
        raw = message(f"bulk {message_id}", message_id=message_id)
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port,
                                   start_tls=False, timeout=30) as client:
            errors, reply = await client.sendmail(SENDER, ["someone@example.test"], raw)
        assert errors == {}
        return reply

    try:
        replies = await asyncio.gather(*(one(mid) for mid in ids))
        daemon.kill()
        assert all(r.startswith("2.0.0 Ok: queued as") for r in replies)
        before = len(sink.messages)
        await start(daemons, config)

        def arrived() -> collections.Counter[str]:
            return collections.Counter(
                email.message_from_bytes(m.data)["Message-ID"] for m in sink.messages)

        async def all_arrived() -> bool:
            return set(arrived()) >= set(ids)

        deadline = time.monotonic() + 20
        while not await all_arrived():
            assert time.monotonic() < deadline, f"missing: {set(ids) - set(arrived())}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        counts = arrived()
        assert set(counts) == set(ids)  # nothing else arrived
        duplicates = sum(counts.values()) - len(ids)
        print(f"delivered before the kill: {before}; duplicates after restart: {duplicates}")
        assert duplicates <= 4  # at most the messages in flight on the 4 workers
        assert {m["state"] for m in await queue_json(config)} == {"sent"}
    finally:
        await sink.stop()
