"""An upstream SMTP sink for tests: a real aiosmtpd server on 127.0.0.1 that records what it
receives and answers 2xx, 4xx or 5xx on demand (per recipient, or at DATA)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes


@dataclass
class SinkHandler:
    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # rcpt -> reply
    rcpt_default: str = "250 OK"
    data_reply: str = "250 2.0.0 OK queued"
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        reply = self.rcpt_replies.get(address, self.rcpt_default)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply.startswith("2"):
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          bytes(envelope.original_content or b"")))
            self.arrived.set()
        return self.data_reply


class Sink:
    def __init__(self) -> None:
        self.handler = SinkHandler()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> Sink:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            self.handler.connections += 1
            return SMTP(self.handler, hostname="sink.test", ident="sink",
                        enable_SMTPUTF8=True, data_size_limit=100 * 1024 * 1024)

        self.server = await loop.create_server(factory, "127.0.0.1", port,
                                               reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.handler.messages) < count:
                self.handler.arrived.clear()
                if len(self.handler.messages) >= count:
                    break
                await self.handler.arrived.wait()
        return self.handler.messages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
