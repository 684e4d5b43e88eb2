"""RelaySMTP against real clients on 127.0.0.1, and against stock aiosmtpd as the reference."""

from __future__ import annotations

import asyncio
import email
import itertools
import logging
import ssl
import types
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiosmtplib
import pytest
import structlog
import trustme
from aiosmtpd import smtp as stock_smtp
from aiosmtpd.smtp import SMTP, Envelope, Session, auth_mechanism
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailrelay.smtp.protocol import (
    REPLY_BARE_NEWLINE,
    REPLY_LOCAL_ERROR,
    REPLY_SHUTTING_DOWN,
    REPLY_TOO_MANY_CONNECTIONS,
    ConnectionLimiter,
    DataDecoder,
    DataResult,
    RelaySMTP,
    normalize_newlines,
    plain_angle_addr,
)
from mailrelay.smtp.server import AuthRelayHandler, RelayHandler

LIMIT = 6000  # data_size_limit for the differential sessions
HEAD = b"From: seller@shop.test\r\nTo: buyer@example.test\r\nSubject: test\r\n\r\n"
PIECES = [None, 1, 7, 1000]  # None: the whole session in one write


class Capture:
    """Handler that accepts every message and keeps the content it was given."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.content is envelope.original_content
        self.contents.append(envelope.content)
        return "250 OK"


@asynccontextmanager
async def serve(factory: Callable[[], SMTP]) -> AsyncIterator[int]:
    """Run an SMTP server in this loop on 127.0.0.1, port 0; yield the port."""
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def stock(handler: Any) -> Callable[[], SMTP]:
    return lambda: SMTP(handler, hostname="test", data_size_limit=LIMIT)


def relay(handler: Any, **kwargs: Any) -> Callable[[], SMTP]:
    kwargs.setdefault("data_size_limit", LIMIT)
    return lambda: RelaySMTP(handler, hostname="test", **kwargs)


async def converse(port: int, payload: bytes, piece: int | None) -> list[bytes]:
    """Send payload (a whole session ending in QUIT) raw; return the reply lines until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        step = piece or len(payload)
        for i in range(0, len(payload), step):
            writer.write(payload[i : i + step])
            await writer.drain()
            if piece:
                await asyncio.sleep(0)  # let the server read this piece on its own
        data = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    return data.split(b"\r\n")


def session(*parts: bytes) -> bytes:
    """EHLO, then each message (data ending in its final dot) as one transaction, then QUIT."""
    out = [b"EHLO client.test\r\n"]
    for part in parts:
        if part.startswith((b"NOOP", b"HELP", b"MAIL")):  # a raw command line, not a message
            out.append(part)
            continue
        out += [b"MAIL FROM:<seller@shop.test>\r\n", b"RCPT TO:<buyer@example.test>\r\n"]
        out += [b"DATA\r\n", part, b".\r\n"]
    out.append(b"QUIT\r\n")
    return b"".join(out)


def data_of_size(n: int) -> bytes:
    """Message data (before the final dot) of exactly n octets, in short CRLF lines."""
    lines, left = [HEAD], n - len(HEAD)
    while left:
        size = min(80, left)
        if left - size == 1:
            size -= 1
        lines.append(b"y" * (size - 2) + b"\r\n")
        left -= size
    return b"".join(lines)


def data_outcomes(replies: list[bytes]) -> list[bytes]:
    """The code of each reply that follows a 354, i.e. each DATA's final answer."""
    return [replies[i + 1][:3] for i, line in enumerate(replies[:-1]) if line.startswith(b"354")]


BINARY = bytes(b for b in range(256) if b not in (10, 13))
SMUGGLED = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nevil\r\n"

def case(name: str, *values: Any) -> Any:
    """One table row, named for pytest's test id."""
    return pytest.param(*values, id=name)


OK, TOO_LONG, TOO_MUCH = [b"250"], [b"500"], [b"552"]
NEAR_LIMIT = data_of_size(LIMIT - 500)

CLEAN_SESSIONS = [  # (session, DATA outcomes); none has a bare CR or LF
    case("plain", session(HEAD + b"hello\r\n"), OK),
    case("dot-stuffed", session(HEAD + b"..lead\r\n...two\r\n. sp\r\nend.\r\n"), OK),
    case("first-line-dot", session(b"..\r\nafter\r\n"), OK),
    case("first-line-dotted", session(b".hidden\r\n"), OK),
    case("empty-message", session(b""), OK),
    case("empty-line", session(b"\r\n"), OK),
    case("crlf-then-dot-line", session(b"\r\n..\r\n"), OK),
    case("sentence-dots", session(HEAD + b"One.\r\nTwo.\r\n..\r\n" * 40), OK),
    case("line-999", session(HEAD + b"a" * 999 + b"\r\n"), OK),
    case("line-1000", session(HEAD + b"a" * 1000 + b"\r\n"), TOO_LONG),
    case("line-1001", session(HEAD + b"a" * 1001 + b"\r\n"), TOO_LONG),
    case("line-1002", session(HEAD + b"a" * 1002 + b"\r\n"), TOO_LONG),
    case("line-5000", session(HEAD + b"a" * 5000 + b"\r\n"), TOO_LONG),
    case("at-size-limit", session(data_of_size(LIMIT)), OK),
    case("one-byte-over", session(data_of_size(LIMIT + 1)), TOO_MUCH),
    case("oversize-then-good", session(data_of_size(LIMIT + 500), HEAD), TOO_MUCH + OK),
    case("pipelined-noop", session(HEAD + b"1\r\n", b"NOOP\r\n", HEAD + b"2\r\n"), OK + OK),
    case("binary-8bit", session(HEAD + BINARY + b"\r\n\x00\xff\r\n"), OK),
    case("long-line-crosses-limit", session(NEAR_LIMIT + b"z" * 5000 + b"\r\n"), TOO_LONG),
    case("line-1000-crosses-limit", session(NEAR_LIMIT + b"z" * 1000 + b"\r\n"), TOO_MUCH),
    case("too-long-then-oversize", session(b"q" * 1500 + b"\r\n" + NEAR_LIMIT * 2), TOO_LONG),
    case("data-before-rcpt", session(b"MAIL FROM:<a@b.test>\r\nDATA\r\nRSET\r\n", HEAD), OK),
    case("help", session(b"HELP DATA\r\nHELP MAIL\r\nHELP\r\n"), []),
]

BARE_SESSIONS = [  # each holds one message with a bare CR or LF in it
    case("smuggle-lf-dot-crlf", session(HEAD + b"hi\r\n\n.\r\n" + SMUGGLED)),
    case("smuggle-cr-dot-crlf", session(HEAD + b"hi\r\n\r.\r\n" + SMUGGLED)),
    case("smuggle-lf-dot-lf", session(HEAD + b"hi\r\n\n.\n" + SMUGGLED)),
    case("smuggle-dot-lf", session(HEAD + b"hi\r\n.\n" + SMUGGLED)),
    case("header-injection", session(b"Subject: hi\nX-Evil: 1\r\n\r\nbody\r\n")),
    case("cr-before-crlf", session(HEAD + b"a\r\r\nb\r\n")),
    case("lf-first", session(b"\nSubject: x\r\n\r\nbody\r\n")),
]


async def run_pair(payload: bytes, piece: int | None, **relay_kwargs: Any) -> tuple[Any, ...]:
    """Play one session against stock aiosmtpd and RelaySMTP; return both replies and captures."""
    ref, ours = Capture(), Capture()
    async with serve(stock(ref)) as ref_port, serve(relay(ours, **relay_kwargs)) as our_port:
        ref_replies = await converse(ref_port, payload, piece)
        our_replies = await converse(our_port, payload, piece)
    return ref_replies, ref.contents, our_replies, ours.contents


@pytest.mark.parametrize("piece", PIECES, ids=lambda p: f"piece-{p or 'whole'}")
@pytest.mark.parametrize(("payload", "outcomes"), CLEAN_SESSIONS)
async def test_clean_sessions_match_stock(payload: bytes, outcomes: list[bytes],
                                          piece: int | None) -> None:
    """Same reply lines and same delivered bytes as aiosmtpd 1.4.6, however the data arrives."""
    ref_replies, ref_contents, our_replies, our_contents = await run_pair(payload, piece)
    assert our_replies == ref_replies
    assert our_contents == ref_contents
    assert data_outcomes(our_replies) == outcomes


@pytest.mark.parametrize("piece", PIECES, ids=lambda p: f"piece-{p or 'whole'}")
@pytest.mark.parametrize("payload", BARE_SESSIONS)
async def test_bare_newline_normalize(payload: bytes, piece: int | None) -> None:
    """normalize: one message, stock's replies, stock's bytes with bare CR/LF made CRLF."""
    ref_replies, ref_contents, our_replies, our_contents = await run_pair(
        payload, piece, bare_newline="normalize")
    assert our_replies == ref_replies
    assert data_outcomes(our_replies) == [b"250"]
    assert our_contents == [normalize_newlines(c) for c in ref_contents]
    assert b"\r\n" in our_contents[0]
    assert our_contents[0].count(b"\n") == our_contents[0].count(b"\r") == our_contents[0].count(
        b"\r\n")


@pytest.mark.parametrize("piece", PIECES, ids=lambda p: f"piece-{p or 'whole'}")
@pytest.mark.parametrize("payload", BARE_SESSIONS)
async def test_bare_newline_reject(payload: bytes, piece: int | None) -> None:
    """reject: the one message gets 550 5.6.2, nothing reaches the handler, the session goes on."""
    ref_replies, _, our_replies, our_contents = await run_pair(payload, piece)
    expected = [REPLY_BARE_NEWLINE.encode() if r == b"250 OK" and prev.startswith(b"354") else r
                for prev, r in zip([b"", *ref_replies], ref_replies, strict=False)]
    assert our_replies == expected
    assert data_outcomes(our_replies) == [b"550"]
    assert our_contents == []
    assert our_replies[-2].startswith(b"221")


async def test_bare_lf_header_injection() -> None:
    """A bare LF cannot smuggle a header the upstream would see but the relay would not."""
    payload = session(b"Subject: hi\nX-Evil: 1\r\n\r\nbody\r\n")
    _, _, rejected_replies, rejected = await run_pair(payload, None, bare_newline="reject")
    assert REPLY_BARE_NEWLINE.encode() in rejected_replies and rejected == []
    _, _, _, normalized = await run_pair(payload, None, bare_newline="normalize")
    assert normalized == [b"Subject: hi\r\nX-Evil: 1\r\n\r\nbody\r\n"]
    parsed = email.message_from_bytes(normalized[0])
    assert (parsed["Subject"], parsed["X-Evil"]) == ("hi", "1")


LINES = st.sampled_from([b"", b"..", b"...", b"a", b"a.", b".a", b"x" * 998, b"x" * 999,
                         b"x" * 1000, b"x" * 1001, b"x" * 1002, b"y" * 2500])


@settings(max_examples=40, deadline=None)
@given(messages=st.lists(st.lists(LINES, max_size=8), min_size=1, max_size=3),
       piece=st.sampled_from([None, 3, 64, 1001]))
def test_random_sessions_match_stock(messages: list[list[bytes]], piece: int | None) -> None:
    """Random dot/long-line/oversize messages (wire lines, never a lone dot): same as stock."""
    payload = session(*(b"".join(line + b"\r\n" for line in m) for m in messages))
    ref_replies, ref_contents, our_replies, our_contents = asyncio.run(run_pair(payload, piece))
    assert (our_replies, our_contents) == (ref_replies, ref_contents)


WIRE_TOKENS = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"a", b"x" * 500, b"y" * 998])


def chunked(data: bytes, cuts: set[int]) -> list[bytes]:
    """Split data at cuts as read_data may: a '.CRLF' is never split and always ends a chunk."""
    ends, i = set(cuts), data.find(b".\r\n")
    while i >= 0:
        ends -= {i + 1, i + 2}
        ends.add(i + 3)
        i = data.find(b".\r\n", i + 1)
    bounds = [0, *sorted(e for e in ends if 0 < e < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def decode(chunks: list[bytes], limit: int) -> tuple[DataResult, int]:
    """Feed chunks until one ends the data; return the result and the octets it took."""
    decoder, taken = DataDecoder(limit, SMTP.line_length_limit), 0
    for chunk in chunks:
        taken += len(chunk)
        if decoder.feed(chunk):
            return decoder.finish(), taken
    raise AssertionError("no end of data")


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(WIRE_TOKENS, max_size=30), cuts=st.sets(st.integers(1, 20000)),
       split_crlf=st.booleans(), limit=st.sampled_from([0, 1000, 2500, 6000]))
@example(tokens=[b"a", b"\r\n", b"y" * 998, b"a", b"\r\n"], cuts=set(), split_crlf=True, limit=0)
def test_decoder_result_does_not_depend_on_chunking(tokens: list[bytes], cuts: set[int],
                                                    split_crlf: bool, limit: int) -> None:
    """However the socket splits the data (CRLF split in two included), the verdict is the same."""
    data = b"".join(tokens) + b"\r\n.\r\n"
    if split_crlf:
        cuts |= {i + 1 for i in range(len(data)) if data.startswith(b"\r\n", i)}
    assert decode(chunked(data, cuts), limit) == decode(chunked(data, set()), limit)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (up to 5 s) for server-side bookkeeping that runs a few loop turns later."""
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


class Client:
    """A line-level SMTP client over a raw socket, for step-by-step sessions."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def reply(self) -> bytes:
        """Read one whole (possibly multi-line) reply; return its last line."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if line[3:4] != b"-":
                return line.rstrip(b"\r\n")

    async def send(self, data: bytes) -> bytes:
        self.writer.write(data)
        return await self.reply()

    async def start_data(self) -> None:
        assert (await self.reply()).startswith(b"220")
        for line in (b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n"):
            assert (await self.send(line)).startswith(b"250")
        assert (await self.send(b"DATA\r\n")).startswith(b"354")

    async def at_eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


async def test_connection_limit() -> None:
    """With max 2, a third client gets 421 4.7.0 and a slot frees when a client leaves."""
    limiter = ConnectionLimiter(2)
    async with serve(relay(Capture(), connection_limiter=limiter)) as port:
        first, second = await Client.connect(port), await Client.connect(port)
        assert (await first.reply()).startswith(b"220")
        assert (await second.reply()).startswith(b"220")
        third = await Client.connect(port)
        assert await third.reply() == REPLY_TOO_MANY_CONNECTIONS.encode()
        assert await third.at_eof()
        assert limiter.active == 2
        assert (await first.send(b"QUIT\r\n")).startswith(b"221")
        assert await first.at_eof()
        await until(lambda: limiter.active == 1)
        fourth = await Client.connect(port)
        assert (await fourth.reply()).startswith(b"220")
        for client in (second, third, fourth):
            client.close()


async def test_starttls_counts_as_one_connection() -> None:
    """After STARTTLS the session is still one slot, DATA works over TLS, and the slot frees."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    limiter, handler = ConnectionLimiter(1), Capture()
    async with serve(relay(handler, connection_limiter=limiter, tls_context=server_ctx)) as port:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                                   tls_context=client_ctx) as client:
            assert client.is_connected and limiter.active == 1
            await client.sendmail("a@b.test", ["c@d.test"], HEAD + b"over tls\r\n")
        await until(lambda: limiter.active == 0)
    assert handler.contents == [HEAD + b"over tls\r\n"]
    assert limiter.active == 0


class FailingOnce(Capture):
    """Raises from handle_DATA on the first message, then accepts."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not hasattr(self, "failed"):
            self.failed = True
            raise RuntimeError("secret database path /var/lib/x")
        return await super().handle_DATA(server, session, envelope)


class LeakyHandler(FailingOnce):
    """Has its own handle_exception that would leak the error as a permanent 500."""

    async def handle_exception(self, error: Exception) -> str:
        return f"500 {error}"


class FailingMail(Capture):
    """Raises from handle_MAIL on the first MAIL, then accepts."""

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if not hasattr(self, "failed"):
            self.failed = True
            raise RuntimeError("secret")
        envelope.mail_from = address
        return "250 OK"


MESSAGE = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n" + HEAD + b"x\r\n.\r\n"


@pytest.mark.parametrize(("handler_cls", "failing_part"), [
    (FailingOnce, MESSAGE), (LeakyHandler, MESSAGE), (FailingMail, b"MAIL FROM:<a@b.test>\r\n")])
async def test_handler_exception_is_451_and_session_continues(handler_cls: type[Capture],
                                                               failing_part: bytes) -> None:
    """A handler error answers 451 4.3.0 (no exception text), is logged, and the client goes on."""
    handler = handler_cls()
    async with serve(relay(handler)) as port:
        with structlog.testing.capture_logs() as logs:
            replies = await converse(port, session(failing_part, MESSAGE), None)
    assert REPLY_LOCAL_ERROR.encode() in replies
    assert not any(b"secret" in r for r in replies)
    assert handler.contents == [HEAD + b"x\r\n"]
    assert replies[-2].startswith(b"221")
    errors = [e for e in logs if e["event"] == "smtp_unexpected_error"]
    assert len(errors) == 1 and isinstance(errors[0]["exc_info"], RuntimeError)


async def test_draining_refuses_new_mail() -> None:
    """While draining, MAIL gets 421 4.3.2 and the connection closes."""
    limiter = ConnectionLimiter(5)
    async with serve(relay(Capture(), connection_limiter=limiter)) as port:
        client = await Client.connect(port)
        assert (await client.reply()).startswith(b"220")
        assert (await client.send(b"EHLO c.test\r\n")).startswith(b"250")
        limiter.draining = True
        assert await client.send(b"MAIL FROM:<a@b.test>\r\n") == REPLY_SHUTTING_DOWN.encode()
        assert await client.at_eof()
        late = await Client.connect(port)
        assert await late.reply() == REPLY_SHUTTING_DOWN.encode()
        client.close()
        late.close()


async def test_close_all_lets_data_finish() -> None:
    """close_all: idle sessions get 421 now; a session in DATA gets its 250, then 421."""
    limiter, handler = ConnectionLimiter(5), Capture()
    async with serve(relay(handler, connection_limiter=limiter)) as port:
        idle, busy = await Client.connect(port), await Client.connect(port)
        assert (await idle.reply()).startswith(b"220")
        await busy.start_data()
        busy.writer.write(HEAD + b"first half\r\n")
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        closing = asyncio.create_task(limiter.close_all(loop.time() + 5))
        assert await idle.reply() == REPLY_SHUTTING_DOWN.encode()
        assert await idle.at_eof()
        assert not closing.done()
        assert await busy.send(b"second half\r\n.\r\n") == b"250 OK"
        assert await busy.reply() == REPLY_SHUTTING_DOWN.encode()
        assert await busy.at_eof()
        await asyncio.wait_for(closing, 5)
    assert handler.contents == [HEAD + b"first half\r\nsecond half\r\n"]
    assert limiter.active == 0


async def test_close_all_aborts_at_deadline() -> None:
    """A DATA phase that does not finish by the deadline is cut off and close_all returns."""
    limiter, handler = ConnectionLimiter(5), Capture()
    async with serve(relay(handler, connection_limiter=limiter)) as port:
        stuck = await Client.connect(port)
        await stuck.start_data()
        stuck.writer.write(HEAD + b"never finished\r\n")
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(limiter.close_all(loop.time() + 0.2), 5)
        assert limiter.active == 0
        try:
            rest = await asyncio.wait_for(stuck.reader.read(), 5)
        except ConnectionResetError:  # an abort shows as a reset or as a plain EOF
            rest = b""
        assert rest == b""
        stuck.close()
    assert handler.contents == []


@pytest.mark.parametrize("kwargs", [{"bare_newline": "strip"}, {"decode_data": True}])
def test_rejects_unsupported_options(kwargs: dict[str, Any]) -> None:
    """Options RelaySMTP cannot honour fail at construction, not mid-session."""
    with pytest.raises(ValueError):
        RelaySMTP(Capture(), hostname="test", **kwargs)


def test_limiter_needs_a_positive_maximum() -> None:
    """ConnectionLimiter(0) would refuse everyone, so it is an error."""
    with pytest.raises(ValueError):
        ConnectionLimiter(0)


# -- address parsing: the fast path answers exactly what aiosmtpd's _getaddr answers -------------

def outcome(parse: Callable[[str], Any], arg: str) -> Any:
    """parse(arg), or the type of what it raised (stock raises IndexError on a lone '<')."""
    try:
        return parse(arg)
    except Exception as error:
        return type(error)


@pytest.fixture(scope="module")
def parsers() -> Iterator[tuple[RelaySMTP, RelaySMTP]]:
    """Two RelaySMTP instances: aiosmtpd's default local_part_limit (0) and a limit of 3."""
    loop = asyncio.new_event_loop()
    plain = RelaySMTP(Capture(), hostname="test", loop=loop)
    limited = RelaySMTP(Capture(), hostname="test", loop=loop)
    limited.local_part_limit = 3
    yield plain, limited
    loop.close()


def assert_same_address(parsers: tuple[RelaySMTP, RelaySMTP], arg: str) -> None:
    for smtp in parsers:
        stock_getaddr = types.MethodType(SMTP._getaddr, smtp)
        assert outcome(smtp._getaddr, arg) == outcome(stock_getaddr, arg), arg


ADDRESSES = [  # (argument after "FROM:"/"TO:", taken by the fast path)
    case("plain", "<seller@shop.example>", True),
    case("null", "<>", True),
    case("null-params", "<> SIZE=100", True),
    case("null-glued", "<>SIZE=1", True),
    case("null-blanks", "<>  \t", True),
    case("params", "<a@b.test> SIZE=100 BODY=8BITMIME", True),
    case("params-tab", "<a@b.test>\tSIZE=1", True),
    case("params-vt-after-sp", "<a@b.test> \x0bSIZE=1", True),
    case("params-em-space", "<a@b.test> \u2003SMTPUTF8", True),
    case("vt-only", "<a@b.test>\x0bSIZE=1", True),
    case("trailing-blanks", "<a@b.test>   ", True),
    case("glued-garbage", "<a@b>x", True),
    case("double-close", "<a@b>>", True),
    case("crlf-after", "<a@b>\r\n", True),
    case("dots", "<first.last@mail.shop.example>", True),
    case("atext", "<!#$%&'*+/?=^_`{|}~-@x.test>", True),
    case("upper", "<A@B.TEST>", True),
    case("ip-like", "<a@1.2.3.4>", True),
    case("hyphens", "<a@-b->", True),
    case("comment-after", "<a@b> (comment) SIZE=1", False),
    case("comment-glued", "<a@b>(c)", False),
    case("double-dot", "<a..b@c>", False),
    case("leading-dot", "<.a@b>", False),
    case("trailing-dot-local", "<a.@b>", False),
    case("trailing-dot-domain", "<a@b.>", False),
    case("dot-domain", "<a@.b>", False),
    case("double-dot-domain", "<a@b..c>", False),
    case("quoted", '<"quoted local"@b.test>', False),
    case("quoted-at", '<"a@b"@c>', False),
    case("quoted-plain", '<"abc"@d>', False),
    case("route", "<@relay.test:a@b>", False),
    case("routes", "<@r1,@r2:a@b>", False),
    case("space-after-open", "< a@b>", False),
    case("space-before-at", "<a @b>", False),
    case("space-after-at", "<a@ b>", False),
    case("space-before-close", "<a@b >", False),
    case("leading-space", " <a@b>", False),
    case("bare", "a@b", False),
    case("bare-params", "a@b SIZE=1", False),
    case("bare-local", "a", False),
    case("no-domain", "<a>", False),
    case("unclosed", "<a@b", False),
    case("unopened", "a@b>", False),
    case("two-ats", "<a@b@c>", False),
    case("literal", "<a@[127.0.0.1]>", False),
    case("literal-v6", "<a@[IPv6:::1]>", False),
    case("utf8-local", "<é@b.test>", False),
    case("utf8-domain", "<a@é.test>", False),
    case("encoded-word-local", "<=?utf-8?q?x?=@b>", False),
    case("encoded-word-domain", "<a@=?utf-8?q?x?=>", False),
    case("encoded-word-inside", "<a=?b@c>", False),
    case("nested", "<<a@b>>", False),
    case("comment-local", "<a(b)@c>", False),
    case("comment-domain", "<a@b(c)>", False),
    case("backslash", "<a\\b@c>", False),
    case("comma", "<a@b,c>", False),
    case("semicolon", "<a@b;c>", False),
    case("colon", "<a:b@c>", False),
    case("nul", "<\x00@b>", False),
    case("empty", "", False),
    case("lone-open", "<", False),
    case("lone-close", ">", False),
    case("open-null", "<<>", False),
    case("null-close", "<>>", True),
    case("garbage", "!!", False),
    case("long-local", "<" + "x" * 300 + "@b.test>", True),
]


@pytest.mark.parametrize(("arg", "fast"), ADDRESSES)
def test_getaddr_matches_stock(parsers: tuple[RelaySMTP, RelaySMTP], arg: str,
                               fast: bool) -> None:
    """Every MAIL/RCPT address form parses as in aiosmtpd; the plain ones skip the email parser."""
    assert_same_address(parsers, arg)
    assert (plain_angle_addr(arg) is not None) == fast


ADDR_CHARS = st.sampled_from(list("ab.Z9-_+=?!~") + list('<>@"()[]:,;\\ \t\x0b\u2003é'))
ATEXT_ISH = st.text(st.sampled_from(list("ab.Z9-=?'{}") + list(' "(@é')), max_size=8)
TAILS = st.text(st.sampled_from(list(" \t\x0b\u2003(x)=S>")), max_size=6)


@settings(max_examples=1500, deadline=None)
@given(arg=st.one_of(
    st.text(ADDR_CHARS, max_size=24),
    st.builds(lambda lp, dom, tail: f"<{lp}@{dom}>{tail}", ATEXT_ISH, ATEXT_ISH, TAILS),
    st.builds(lambda tail: f"<>{tail}", TAILS),
))
@example(arg="<a@b> (x")
def test_getaddr_random_matches_stock(parsers: tuple[RelaySMTP, RelaySMTP], arg: str) -> None:
    """Random address arguments, mostly near the plain form: same answer as aiosmtpd's parser."""
    assert_same_address(parsers, arg)


class Recorder:
    """Handler that records what MAIL and RCPT gave it, as aiosmtpd's defaults would store it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, list[str]]] = []

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        self.seen.append(("MAIL", address, options))
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        self.seen.append(("RCPT", address, options))
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.mark.parametrize("greeting", [b"EHLO client.test\r\n", b"HELO client.test\r\n"])
async def test_address_commands_match_stock(greeting: bytes) -> None:
    """MAIL/RCPT with every address form: same replies and same hook arguments as aiosmtpd."""
    lines = [greeting]
    for param in ADDRESSES:
        if param.id == "lone-open":  # aiosmtpd's parser raises: 500 with stock, 451 from us
            continue
        arg = param.values[0].replace("\r\n", "").encode("utf-8")
        lines += [b"MAIL FROM:" + arg + b"\r\n", b"RCPT TO:" + arg + b"\r\n",
                  b"MAIL FROM:<s@shop.test>\r\n", b"RCPT TO:" + arg + b"\r\n", b"RSET\r\n"]
    payload = b"".join([*lines, b"QUIT\r\n"])
    results = []
    for factory in (SMTP, RelaySMTP):
        handler = Recorder()
        async with serve(lambda f=factory, h=handler: f(h, hostname="test")) as port:
            results.append((await converse(port, payload, None), handler.seen))
    assert results[0] == results[1]
    assert (b"250 OK" in results[0][0]) and len(results[0][1]) > 20


# -- per-connection setup: cached hook tables, same attributes as aiosmtpd's __init__ ------------

RELAY_ONLY = {"bare_newline", "in_data", "_limiter", "_refused", "data_timeout", "_hook_tables"}


def snapshot(smtp: SMTP) -> list[tuple[str, Any]]:
    """The instance's attributes in order, with per-instance objects reduced to what they are."""
    def norm(value: Any) -> Any:
        if isinstance(value, types.MethodType):
            owner = "self" if value.__self__ is smtp else value.__self__
            return ("method", value.__func__, owner)
        if isinstance(value, stock_smtp._AuthMechAttr):
            return ("auth", norm(value.method), value.is_builtin)
        if isinstance(value, dict):
            return [(k, norm(v)) for k, v in value.items()]
        if isinstance(value, asyncio.StreamReader | asyncio.Future | weakref.ref | deque):
            return type(value)
        return value
    return [(k, norm(v)) for k, v in vars(smtp).items() if k not in RELAY_ONLY]


class Records(logging.Handler):
    """Keeps what aiosmtpd's ``mail.log`` logger emits."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


def built(cls: type[RelaySMTP], handler: Any, kwargs: dict[str, Any], stock_init: bool) -> Any:
    """snapshot of cls(handler, **kwargs), built by aiosmtpd's __init__ or ours, with what it
    warned and logged; or the exception it raised."""
    logger, records = logging.getLogger("mail.log"), Records()
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not .level: it clears the isEnabledFor caches
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if stock_init:
                smtp = cls.__new__(cls)
                SMTP.__init__(smtp, handler, **kwargs)
            else:
                smtp = cls(handler, **kwargs)
    except Exception as error:  # "f() got an unexpected keyword": the same but for f
        return type(error), str(error).rpartition("() ")[2], records.lines
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return snapshot(smtp), [(w.category, str(w.message)) for w in caught], records.lines


class ExtraCommand(RelaySMTP):
    """A protocol subclass with its own command and its own AUTH mechanism."""

    async def smtp_XYZZY(self, arg: str) -> None:
        await self.push("250 nothing happens")

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> None:
        return None


class MechanismHandler(Capture):
    """AUTH mechanisms on the handler: one named by decorator, one overriding a built-in."""

    @auth_mechanism("X-TOKEN")
    async def auth_token(self, server: SMTP, args: list[str]) -> None:
        return None

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> None:
        return None


class OldEhlo(Capture):
    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        return "250 old"


class BadEhlo(Capture):
    async def handle_EHLO(self, server: SMTP, session: Session) -> str:
        return "250 bad"


class OwnHook(Capture):
    """Has a hook as an instance attribute, which only dir() of the instance shows."""

    def __init__(self, rcpt_reply: str = "550 5.7.1 no") -> None:
        super().__init__()

        async def handle_RCPT(*args: Any) -> str:
            return rcpt_reply
        self.handle_RCPT = handle_RCPT


def bare_handler(cls: type) -> Any:
    """An instance of a product handler class without its runtime wiring (only hooks matter)."""
    return object.__new__(cls)


def server_tls(verify_mode: ssl.VerifyMode, check_hostname: bool) -> ssl.SSLContext:
    """A server context with client-certificate settings aiosmtpd warns about."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.verify_mode = verify_mode
    context.check_hostname = check_hostname
    return context


INIT_CASES = [  # (protocol class, handler factory, kwargs)
    case("capture", RelaySMTP, Capture, {"hostname": "test"}),
    case("relay-handler", RelaySMTP, lambda: bare_handler(RelayHandler), {
        "hostname": "h", "ident": "mailrelay", "data_size_limit": 10, "enable_SMTPUTF8": True,
        "timeout": 5, "command_call_limit": {"RCPT": 100, "*": 20}, "auth_require_tls": False,
        "auth_exclude_mechanism": ["PLAIN", "LOGIN"]}),
    case("auth-relay-handler", RelaySMTP, lambda: bare_handler(AuthRelayHandler),
         {"hostname": "h", "auth_required": True, "auth_require_tls": False}),
    case("mechanisms", RelaySMTP, MechanismHandler,
         {"hostname": "h", "auth_exclude_mechanism": ["LOGIN"], "auth_callback": lambda *a: True}),
    case("subclass", ExtraCommand, MechanismHandler, {"hostname": "h", "command_call_limit": 3}),
    case("old-ehlo", RelaySMTP, OldEhlo, {"hostname": "h"}),
    case("bad-ehlo", RelaySMTP, BadEhlo, {"hostname": "h"}),
    case("instance-hook", RelaySMTP, OwnHook, {"hostname": "h"}),
    case("class-as-handler", RelaySMTP, lambda: OldEhlo, {"hostname": "h"}),
    case("no-hostname", RelaySMTP, Capture, {"data_size_limit": None}),
    case("tls-verify", RelaySMTP, Capture, {
        "hostname": "h", "tls_context": server_tls(ssl.CERT_REQUIRED, False),
        "require_starttls": True}),
    case("tls-check-hostname", RelaySMTP, Capture,
         {"hostname": "h", "tls_context": server_tls(ssl.CERT_OPTIONAL, True)}),
    case("authenticator", RelaySMTP, Capture,
         {"hostname": "h", "authenticator": lambda *a: None, "proxy_protocol_timeout": 1}),
    case("proxy-zero", RelaySMTP, Capture, {"hostname": "h", "proxy_protocol_timeout": 0}),
    case("limit-not-int", RelaySMTP, Capture, {"hostname": "h", "command_call_limit": {"*": "9"}}),
    case("limit-bad-type", RelaySMTP, Capture, {"hostname": "h", "command_call_limit": "9"}),
    case("unknown-option", RelaySMTP, Capture, {"hostname": "h", "colour": "blue"}),
]


@pytest.mark.parametrize(("cls", "make_handler", "kwargs"), INIT_CASES)
async def test_setup_matches_stock(cls: type[RelaySMTP], make_handler: Callable[[], Any],
                                   kwargs: dict[str, Any]) -> None:
    """Our per-connection setup leaves the same attributes, warnings and errors as aiosmtpd's,
    for the first connection of a (protocol, handler) pair and for later ones."""
    handler = make_handler()
    reference = built(cls, handler, kwargs, stock_init=True)
    assert built(cls, handler, kwargs, stock_init=False) == reference
    assert built(cls, handler, kwargs, stock_init=False) == reference
    other = make_handler()  # a second handler of the same class
    assert built(cls, other, kwargs, stock_init=False) == built(cls, other, kwargs, stock_init=True)


@pytest.mark.parametrize("handler_cls", [RelayHandler, AuthRelayHandler])
async def test_product_handlers_are_cached(handler_cls: type) -> None:
    """The daemon's own protocol/handler pairs take the cached route (or the speed-up is lost)."""
    first = RelaySMTP(bare_handler(handler_cls), hostname="h")
    second = RelaySMTP(bare_handler(handler_cls), hostname="h")
    assert first._hook_tables.cacheable
    assert first._hook_tables is second._hook_tables
    assert "DATA" in second._handle_hooks and "MAIL" in second._smtp_methods


async def test_connections_share_hook_tables() -> None:
    """Two connections reuse one set of hook tables, each bound to its own protocol instance."""
    handler, protocols = Capture(), []

    def factory() -> RelaySMTP:
        protocols.append(RelaySMTP(handler, hostname="test"))
        return protocols[-1]

    async with serve(factory) as port:
        for n in range(2):
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
                await client.sendmail("a@b.test", ["c@d.test"], HEAD + b"%d\r\n" % n)
    first, second = protocols
    assert first._hook_tables is second._hook_tables
    assert first._smtp_methods["MAIL"].__self__ is first
    assert second._smtp_methods["MAIL"].__self__ is second
    assert second._handle_hooks["DATA"].__self__ is handler
    assert handler.contents == [HEAD + b"0\r\n", HEAD + b"1\r\n"]


async def test_instance_hooks_are_not_served_from_cache() -> None:
    """A handler whose hook is an instance attribute gets it even after its class was cached."""
    session_payload = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nQUIT\r\n"
    replies = []
    for handler in (OwnHook("250 fine"), OwnHook("550 5.7.1 no"), Capture()):
        async with serve(relay(handler)) as port:
            replies.append((await converse(port, session_payload, None))[-3])
    assert replies == [b"250 fine", b"550 5.7.1 no", b"250 OK"]
