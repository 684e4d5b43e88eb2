"""SmtpUpstream against a real aiosmtpd sink on 127.0.0.1 (TLS with trustme certificates)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from mailrelay.smtp.upstream import RecipientResult, SmtpUpstream, UpstreamAuthError, dot_stuff

pytestmark = pytest.mark.timeout(30)

MESSAGE = b"From: seller@shop.example\r\nTo: a@x.example\r\nSubject: hi\r\n\r\nHello\r\n"


@dataclass
class Received:
    """One message as the sink stored it."""

    mail_from: str
    rcpts: list[str]
    content: bytes
    mail_options: list[str]
    tls: bool
    authenticated: bool


@dataclass
class SinkHandler:
    """aiosmtpd handler whose replies the test sets: per recipient, at MAIL, at DATA."""

    received: list[Received] = field(default_factory=list)
    mail_froms: list[str] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    hang_data: bool = False

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mail_froms.append(address)
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.hang_data:
            await asyncio.Event().wait()
        if self.data_reply:
            return self.data_reply
        tls = server.transport.get_extra_info("ssl_object") is not None
        self.received.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
                tls,
                session.authenticated,
            )
        )
        return "250 2.0.0 queued"


def _authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    """Accept only relay/secret."""
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"relay", b"secret")
    return AuthResult(success=ok, handled=False)


class Sink:
    """Starts aiosmtpd servers in the test's loop and counts their connections."""

    def __init__(self) -> None:
        self.handler = SinkHandler()
        self.connections = 0
        self.protocols: list[SMTP] = []
        self.servers: list[asyncio.Server] = []

    async def start(self, server_ssl: ssl.SSLContext | None = None, **kwargs: Any) -> int:
        def factory() -> SMTP:
            self.connections += 1
            protocol = SMTP(self.handler, hostname="sink", ident="sink", **kwargs)
            self.protocols.append(protocol)
            return protocol

        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0, ssl=server_ssl)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for protocol in self.protocols:
            if protocol.transport is not None:
                protocol.transport.close()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    yield s
    s.close()
    await asyncio.sleep(0)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def clients() -> AsyncIterator[list[SmtpUpstream]]:
    made: list[SmtpUpstream] = []
    yield made
    for client in made:
        await client.close()


@pytest.fixture
def make(clients: list[SmtpUpstream]):
    def _make(port: int, tls: str = "off", **kwargs: Any) -> SmtpUpstream:
        kwargs.setdefault("username", None)
        kwargs.setdefault("password", None)
        kwargs.setdefault("timeout", 5.0)
        client = SmtpUpstream("127.0.0.1", port, tls, local_hostname="relay.test", **kwargs)
        clients.append(client)
        return client

    return _make


def outcomes(results: list[RecipientResult]) -> list[tuple[str, str, int | None]]:
    return [(r.rcpt, r.outcome, r.code) for r in results]


async def test_plain_delivery_reports_sent(sink: Sink, make) -> None:
    """A plain upstream gets the message; every recipient is sent with 250."""
    port = await sink.start()
    results = await make(port).send("seller@shop.example", ["a@x.example", "b@x.example"], MESSAGE)
    assert outcomes(results) == [("a@x.example", "sent", 250), ("b@x.example", "sent", 250)]
    [got] = sink.handler.received
    assert (got.mail_from, got.rcpts, got.content) == (
        "seller@shop.example",
        ["a@x.example", "b@x.example"],
        MESSAGE,
    )


async def test_bytes_arrive_identical_with_dots_and_8bit(sink: Sink, make) -> None:
    """Dot-started lines and 8-bit bytes reach the upstream byte for byte."""
    port = await sink.start()
    client = make(port)
    bodies = [
        b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n.\r\nend\r\n.",
        b".starts with a dot\r\n\r\n\xc3\xa9t\xc3\xa9 \xff\xfe raw 8-bit\r\n\r\n",
        b"Subject: x\r\n\r\nno final newline",
    ]
    for body in bodies:
        results = await client.send("s@shop.example", ["a@x.example"], body, ["BODY=8BITMIME"])
        assert results[0].outcome == "sent"
    got = [r.content for r in sink.handler.received]
    assert got == [bodies[0] + b"\r\n", bodies[1], bodies[2] + b"\r\n"]
    assert all("BODY=8BITMIME" in r.mail_options for r in sink.handler.received)


def test_dot_stuff_normalises_bare_newlines() -> None:
    """A bare LF that slipped through is normalised, so `\\n.\\r\\n` cannot end DATA early."""
    assert dot_stuff(b"a\n.\r\nMAIL FROM:<x>") == b"a\r\n..\r\nMAIL FROM:<x>\r\n"
    assert dot_stuff(b"a\r\n.b\r\n") == b"a\r\n..b\r\n"
    assert dot_stuff(b"") == b"\r\n"


async def test_per_recipient_partial_failure(sink: Sink, make) -> None:
    """2xx/4xx/5xx per recipient become sent/deferred/failed; only the good one is delivered."""
    port = await sink.start()
    sink.handler.rcpt_replies = {
        "temp@x.example": "451 4.2.0 mailbox busy",
        "perm@x.example": "550 5.1.1 no such user",
    }
    rcpts = ["ok@x.example", "temp@x.example", "perm@x.example"]
    results = await make(port).send("s@shop.example", rcpts, MESSAGE)
    assert outcomes(results) == [
        ("ok@x.example", "sent", 250),
        ("temp@x.example", "deferred", 451),
        ("perm@x.example", "failed", 550),
    ]
    assert "no such user" in results[2].message
    assert [r.rcpts for r in sink.handler.received] == [["ok@x.example"]]


@pytest.mark.parametrize(
    ("stage", "reply", "outcome", "code"),
    [
        ("mail", "550 5.7.1 sender not allowed", "failed", 550),
        ("mail", "451 4.3.0 try later", "deferred", 451),
        ("data", "554 5.6.0 content rejected", "failed", 554),
        ("data", "452 4.3.1 queue full", "deferred", 452),
        ("rcpt", "550 5.1.1 unknown", "failed", 550),
        ("rcpt", "450 4.2.1 later", "deferred", 450),
    ],
)
async def test_refusal_applies_to_all_and_connection_survives(
    sink: Sink, make, stage: str, reply: str, outcome: str, code: int
) -> None:
    """A refusal at MAIL/DATA (or of every RCPT) decides for all; the next send reuses the link."""
    port = await sink.start()
    client = make(port)
    if stage == "mail":
        sink.handler.mail_reply = reply
    elif stage == "data":
        sink.handler.data_reply = reply
    else:
        sink.handler.rcpt_replies = {"a@x.example": reply, "b@x.example": reply}
    results = await client.send("s@shop.example", ["a@x.example", "b@x.example"], MESSAGE)
    assert [(r.outcome, r.code) for r in results] == [(outcome, code)] * 2
    sink.handler.mail_reply = sink.handler.data_reply = None
    sink.handler.rcpt_replies = {}
    again = await client.send("s@shop.example", ["a@x.example"], MESSAGE)
    assert again[0].outcome == "sent"
    assert sink.connections == 1


async def test_rcpt_refused_then_data_deferred(sink: Sink, make) -> None:
    """A recipient refused at RCPT keeps its 550 when DATA is then deferred for the others."""
    port = await sink.start()
    sink.handler.rcpt_replies = {"perm@x.example": "550 5.1.1 unknown"}
    sink.handler.data_reply = "451 4.3.0 local problem"
    results = await make(port).send("s@shop.example", ["perm@x.example", "ok@x.example"], MESSAGE)
    assert outcomes(results) == [
        ("perm@x.example", "failed", 550),
        ("ok@x.example", "deferred", 451),
    ]


async def test_connection_reused_across_sends(sink: Sink, make) -> None:
    """Two messages travel over one TCP connection."""
    port = await sink.start()
    client = make(port)
    for _ in range(3):
        assert (await client.send("s@shop.example", ["a@x.example"], MESSAGE))[0].outcome == "sent"
    assert len(sink.handler.received) == 3
    assert sink.connections == 1


async def test_idle_closed_connection_is_reopened(sink: Sink, make) -> None:
    """When the upstream closes an idle connection, the next send reconnects and delivers."""
    port = await sink.start(timeout=0.2)
    client = make(port)
    assert (await client.send("s@shop.example", ["a@x.example"], MESSAGE))[0].outcome == "sent"
    await asyncio.sleep(0.5)
    assert (await client.send("s@shop.example", ["b@x.example"], MESSAGE))[0].outcome == "sent"
    assert sink.connections == 2
    assert [r.rcpts for r in sink.handler.received] == [["a@x.example"], ["b@x.example"]]


async def test_connection_dropped_just_before_send_is_retried(sink: Sink, make) -> None:
    """A reused connection that dies as MAIL is sent is retried once on a fresh one."""
    port = await sink.start()
    client = make(port)
    assert (await client.send("s@shop.example", ["a@x.example"], MESSAGE))[0].outcome == "sent"
    sink.protocols[0].transport.close()  # the client has not seen the close yet
    results = await client.send("s@shop.example", ["b@x.example"], MESSAGE)
    assert results[0].outcome == "sent"
    assert sink.connections == 2
    assert len(sink.handler.received) == 2


async def test_connection_refused_defers(make) -> None:
    """A closed port defers every recipient with the connection error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = await make(port).send("s@shop.example", ["a@x.example", "b@x.example"], MESSAGE)
    assert [(r.outcome, r.code) for r in results] == [("deferred", None)] * 2
    assert f"127.0.0.1:{port}" in results[0].message


async def test_hanging_upstream_defers_after_deadline(sink: Sink, make) -> None:
    """An upstream that never answers DATA defers the message once the deadline passes."""
    port = await sink.start()
    sink.handler.hang_data = True
    started = time.monotonic()
    results = await make(port, timeout=0.5).send("s@shop.example", ["a@x.example"], MESSAGE)
    assert time.monotonic() - started < 2.0
    assert [(r.outcome, r.code) for r in results] == [("deferred", None)]
    assert "deadline" in results[0].message


async def test_starttls_delivers_encrypted(sink: Sink, make, server_ctx, client_ctx) -> None:
    """tls=starttls upgrades before MAIL; the sink sees the message over TLS."""
    port = await sink.start(tls_context=server_ctx, require_starttls=True)
    results = await make(port, "starttls", ssl_context=client_ctx).send(
        "s@shop.example", ["a@x.example"], MESSAGE
    )
    assert results[0].outcome == "sent"
    assert sink.handler.received[0].tls


async def test_starttls_missing_defers_without_sending(sink: Sink, make, client_ctx) -> None:
    """tls=starttls against a server without STARTTLS defers; nothing goes out in clear."""
    port = await sink.start()
    results = await make(port, "starttls", ssl_context=client_ctx).send(
        "s@shop.example", ["a@x.example", "b@x.example"], MESSAGE
    )
    assert [r.outcome for r in results] == ["deferred", "deferred"]
    assert "STARTTLS" in results[0].message
    assert sink.handler.mail_froms == []


async def test_untrusted_certificate_defers(sink: Sink, make, server_ctx) -> None:
    """With the default context, a certificate from an unknown CA is refused and deferred."""
    port = await sink.start(tls_context=server_ctx)
    results = await make(port, "starttls").send("s@shop.example", ["a@x.example"], MESSAGE)
    assert results[0].outcome == "deferred"
    assert "certificate" in results[0].message.lower()
    assert sink.handler.mail_froms == []


async def test_implicit_tls_delivers(sink: Sink, make, server_ctx, client_ctx) -> None:
    """tls=implicit speaks TLS from the first byte (port 465 style)."""
    port = await sink.start(server_ssl=server_ctx)
    results = await make(port, "implicit", ssl_context=client_ctx).send(
        "s@shop.example", ["a@x.example"], MESSAGE
    )
    assert results[0].outcome == "sent"
    assert sink.handler.received[0].tls


async def test_auth_success(sink: Sink, make, server_ctx, client_ctx) -> None:
    """With credentials, the client authenticates after STARTTLS and the sink accepts."""
    port = await sink.start(
        tls_context=server_ctx, auth_required=True, authenticator=_authenticator
    )
    client = make(port, "starttls", ssl_context=client_ctx, username="relay", password="secret")
    results = await client.send("s@shop.example", ["a@x.example"], MESSAGE)
    assert results[0].outcome == "sent"
    assert sink.handler.received[0].authenticated


async def test_auth_rejected_raises(sink: Sink, make, server_ctx, client_ctx) -> None:
    """A wrong password raises UpstreamAuthError with the server's reply; no MAIL is sent."""
    port = await sink.start(
        tls_context=server_ctx, auth_required=True, authenticator=_authenticator
    )
    client = make(port, "starttls", ssl_context=client_ctx, username="relay", password="wrong")
    with pytest.raises(UpstreamAuthError, match="rejected AUTH for 'relay': 535") as info:
        await client.send("s@shop.example", ["a@x.example"], MESSAGE)
    assert info.value.code == 535
    assert "wrong" not in str(info.value)
    assert sink.handler.mail_froms == []


async def test_auth_not_offered_raises(sink: Sink, make) -> None:
    """Credentials configured but no AUTH offered (aiosmtpd hides it without TLS) raise."""
    port = await sink.start()
    client = make(port, username="relay", password="secret")
    with pytest.raises(UpstreamAuthError, match="no usable AUTH"):
        await client.send("s@shop.example", ["a@x.example"], MESSAGE)
    assert sink.handler.mail_froms == []


@pytest.mark.parametrize("null_sender", ["", "<>"])
async def test_null_sender_for_bounces(sink: Sink, make, null_sender: str) -> None:
    """An empty or "<>" sender goes out as MAIL FROM:<> (DSNs); aiosmtpd shows it as "<>"."""
    port = await sink.start()
    results = await make(port).send(null_sender, ["seller@shop.example"], MESSAGE)
    assert results[0].outcome == "sent"
    assert sink.handler.received[0].mail_from == "<>"


@pytest.mark.parametrize("upstream_utf8", [True, False])
async def test_smtputf8_only_when_advertised(sink: Sink, make, upstream_utf8: bool) -> None:
    """SMTPUTF8 is passed on only if offered; without it a non-ASCII address fails alone."""
    port = await sink.start(enable_SMTPUTF8=upstream_utf8)
    rcpts = ["a@x.example", "jürgen@x.example"]
    results = await make(port).send("s@shop.example", rcpts, MESSAGE, ["SMTPUTF8", "SIZE=1"])
    [got] = sink.handler.received
    assert [o for o in got.mail_options if not o.startswith("SIZE")] == (
        ["SMTPUTF8"] if upstream_utf8 else []
    )
    assert f"SIZE={len(MESSAGE)}" in got.mail_options
    if upstream_utf8:
        assert [r.outcome for r in results] == ["sent", "sent"]
        assert got.rcpts == rcpts
    else:
        assert outcomes(results) == [
            ("a@x.example", "sent", 250),
            ("jürgen@x.example", "failed", None),
        ]
        assert "SMTPUTF8" in results[1].message
