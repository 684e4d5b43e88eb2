"""Helpers for the relay tests: submitting over SMTP, the queue CLI, the daemon's log events.

Used by test_relay_e2e.py, test_relay_process.py, test_cli_queue.py and test_service.py; the
`daemons` fixture that `start` takes is in conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from daemon_helpers import ROOT, DaemonProcess

SENDER = "seller@shop.test"
CLIENT_NAME = "client.test"
QUEUED_RE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]+)")


def message(subject: str = "hello", body: bytes = b"Hello there.\r\n", *,
            message_id: str | None = None) -> bytes:
    """A small CRLF message."""
    mid = message_id or f"<{time.monotonic_ns()}@shop.test>"
    return (f"From: {SENDER}\r\nTo: someone@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: {mid}\r\n\r\n").encode() + body


async def cli(config: Path, *args: str, stdin: str | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``mailrelay ARGS -c CONFIG`` as a user would, without blocking the event loop."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "mailrelay", *args, "-c", str(config)],
        input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd or ROOT,
    )


async def queue_json(config: Path, cwd: Path | None = None) -> list[dict[str, Any]]:
    """``mailrelay queue list --all --json``, parsed."""
    result = await cli(config, "queue", "list", "--all", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def events(daemon: DaemonProcess, name: str | None = None) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (journald's ``<N>`` prefix removed), optionally one event."""
    found = []
    for line in daemon.output().splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if name is None or record.get("event") == name:
            found.append(record)
    return found


async def wait_until(check: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0,
                     interval: float = 0.05) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def submit(port: int, raw: bytes, rcpts: list[str], *, mail_from: str = SENDER,
           options: tuple[str, ...] = ()) -> tuple[int, str]:
    """One SMTP transaction with smtplib (blocking: call it in a thread); the final reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=20) as client:
        client.ehlo()
        code, text = client.mail(mail_from, list(options))
        if code != 250:
            return code, text.decode()
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code not in (250, 251):
                return code, text.decode()
        code, text = client.data(raw)
        return code, text.decode()


async def asubmit(port: int, raw: bytes, rcpts: list[str], **kwargs: Any) -> tuple[int, str]:
    return await asyncio.to_thread(submit, port, raw, rcpts, **kwargs)


def queue_id(reply: str) -> str:
    match = QUEUED_RE.fullmatch(reply)
    assert match, reply
    return match[1]


def without_received(data: bytes) -> tuple[bytes, bytes]:
    """Split off the first header field (with its folded lines): (Received field, rest)."""
    assert data.startswith(b"Received: "), data[:80]
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end:end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


class RawClient:
    """A bare asyncio SMTP client: sends exactly the bytes given, reads whole replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> str:
        """One (possibly multi-line) reply; "" when the server closed the connection."""
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    return "".join(lines)
                lines.append(line.decode())
                if line[3:4] != b"-":
                    return "".join(lines)

    async def command(self, line: bytes) -> str:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    async def open_transaction(self, rcpts: list[str]) -> None:
        """Greeting, EHLO, MAIL, RCPT..., DATA up to the 354."""
        assert (await self.reply()).startswith("220")
        assert (await self.command(b"EHLO " + CLIENT_NAME.encode())).startswith("250")
        assert (await self.command(f"MAIL FROM:<{SENDER}>".encode())).startswith("250")
        for rcpt in rcpts:
            assert (await self.command(f"RCPT TO:<{rcpt}>".encode())).startswith("250")
        assert (await self.command(b"DATA")).startswith("354")

    def close(self) -> None:
        self.writer.close()


async def start(daemons: list[DaemonProcess], config: Path, **kwargs: Any) -> DaemonProcess:
    daemon = DaemonProcess(config, **kwargs)
    daemons.append(daemon)
    return await daemon.astart()
