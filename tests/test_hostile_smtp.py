"""Hostile SMTP clients against the real daemon (a subprocess) and a real sink, on 127.0.0.1.

A seeded protocol fuzzer, STARTTLS injection (CVE-2024-34083 style), SMTP smuggling with a
hidden second envelope, open-relay address tricks, and resource limits (connections, RSS,
oversized messages). What a user checks: nobody without permission gets mail through, one
message never becomes two, and the relay keeps serving honest clients whatever arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import resource
import smtplib
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from daemon_helpers import DaemonProcess, write_config
from sink import Sink

from mailrelay.smtp.auth import set_password

pytestmark = pytest.mark.integration

USER, PASSWORD = "seller@shop.test", "correct horse battery"
UNTRUSTED = {"allowed_networks": ["10.9.9.0/24"]}  # 127.0.0.1 is outside: no relay without AUTH
FUZZ_SESSIONS, FUZZ_SEED, FUZZ_PARALLEL = 300, 20240611, 20


# ---- a raw SMTP client ---------------------------------------------------------------------


class Client:
    """Raw bytes over asyncio streams: what a hostile client can send, nothing normalised."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> tuple[Client, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self, timeout: float = 10.0) -> bytes:
        """One (possibly multi-line) reply; b"" at EOF."""
        lines = b""
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                lines += line
                if not line or line[3:4] != b"-":
                    return lines

    async def cmd(self, line: bytes, timeout: float = 10.0) -> bytes:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply(timeout)

    def close(self) -> None:
        self.writer.transport.abort()


def code(reply: bytes) -> int:
    return int(reply[:3]) if reply[:3].isdigit() else 0


# ---- daemons -----------------------------------------------------------------------------


def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    set_password(path, USER, PASSWORD, None)
    return path


@asynccontextmanager
async def daemon(tmp_path: Path, sink: Sink, **smtp: Any) -> AsyncIterator[DaemonProcess]:
    """The daemon with ``smtp`` merged into its smtp section; it must stop cleanly."""
    config = write_config(tmp_path, sink.port, smtp=smtp,
                          queue={"workers": 4, "retry_initial": "1s", "retry_max": "2s"})
    proc = await DaemonProcess(config).astart()
    try:
        yield proc
    finally:
        assert await proc.astop() == 0, proc.output()[-3000:]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def good_send(port: int, tag: str, login: bool = True) -> None:
    """A well-behaved client (smtplib): AUTH when asked, one message tagged ``tag``."""
    body = f"From: {USER}\r\nTo: buyer@example.test\r\nSubject: {tag}\r\n\r\nhello {tag}\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        if login:
            client.login(USER, PASSWORD)
        client.sendmail(USER, ["buyer@example.test"], body.encode())


# ---- the fuzzer ----------------------------------------------------------------------------

SMUGGLE = [b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\r\n.\r", b"\n.\r"]
ADDRESSES = [b"<a@b.test>", b"<>", b"a@b.test", b"<@x.test:a@b.test>", b"<\"a b\"@c.test>",
             b"<a%b@c.test>", b"<\x00@x>", b"<" + b"x" * 600 + b"@y.test>", b"<a@[127.0.0.1]>",
             b"<\xc3\xa9@\xc3\xa9.test>", b"<a@b.test> SIZE=999999999999", b"<a@b.test> BODY=x",
             b"<a@b.test> SMTPUTF8", b":<a@b>", b""]


class Fuzzer:
    """Seeded generator of hostile sessions. ``trusted``: every DATA block opens its own
    transaction first, so its body (with the hidden envelope) is really inside DATA."""

    def __init__(self, seed: int, trusted: bool = False) -> None:
        self.rng = random.Random(seed)
        self.trusted = trusted
        self.blocks = 0

    def data_block(self) -> bytes:
        """DATA, then a body with a smuggling probe and a hidden envelope; terminated or not."""
        rng, tag = self.rng, self.blocks
        self.blocks += 1
        hidden = (b"MAIL FROM:<hidden@evil.test>\r\nRCPT TO:<hidden-%d@victim.test>\r\nDATA\r\n"
                  b"Subject: hidden\r\n\r\nsmuggled\r\n" % tag)
        body = b"Subject: fuzz %d\r\n\r\n" % tag + rng.choice(SMUGGLE) + hidden
        body += rng.choice([b"", b".\r\n", b"..\r\n", b"\x00\xff", b"x" * rng.randrange(900, 1100)])
        end = rng.choice([b"\r\n.\r\n", b"\r\n.\r\n", b"", b".\r\n"])
        opening = (b"EHLO fuzz.test\r\nRSET\r\nMAIL FROM:<fuzz@shop.test>\r\n"
                   b"RCPT TO:<fuzz-rcpt@example.test>\r\n") if self.trusted else b""
        return opening + b"DATA\r\n" + body + end

    def piece(self) -> bytes:
        rng = self.rng
        verb = rng.choice([b"EHLO", b"HELO", b"ehlo", b"MAIL FROM:", b"RCPT TO:", b"mail from:",
                           b"RCPT TO: ", b"RSET", b"NOOP", b"VRFY", b"EXPN", b"HELP", b"STARTTLS",
                           b"BDAT 10 LAST", b"ETRN", b"XCLIENT ADDR=10.9.9.9", b"GET / HTTP/1.1"])
        kind = rng.randrange(16)
        if kind == 0:
            return self.data_block()
        if kind == 1:  # AUTH garbage
            return rng.choice([b"AUTH PLAIN ", b"AUTH LOGIN ", b"AUTH CRAM-MD5 ", b"AUTH XYZ ",
                               b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n"]) + rng.choice(
                [b"AGEAYg==", b"!!!", b"=", b"*", b"AHNlbGxlckBzaG9wLnRlc3QAd3Jvbmc=", b"",
                 b"A" * 5000]) + b"\r\n"
        if kind == 2:  # overlong line
            return b"NOOP " + rng.randbytes(50).hex().encode() * rng.randrange(15, 1500)
        if kind == 3:  # bare CR, bare LF, NUL inside commands
            return verb + rng.choice([b" x\n", b" x\r", b"\x00\r\n", b" \r\r\n", b"\n\n"])
        if kind == 4:  # random bytes
            return rng.randbytes(rng.randrange(1, 300))
        if kind == 5:  # pipelining abuse: many commands in one write
            return b"".join(self.piece() for _ in range(rng.randrange(2, 12)))
        if kind == 6:
            return b"QUIT\r\n"
        if verb.endswith((b":", b": ")):
            return verb + rng.choice(ADDRESSES) + b"\r\n"
        return verb + rng.choice([b"", b" fuzz.test", b" " + b"h" * 300, b" [127.0.0.1]"]) + b"\r\n"

    def session(self) -> list[bytes]:
        """One session's bytes, cut into the writes the client makes (1 byte to everything)."""
        stream = b"".join(self.piece() for _ in range(self.rng.randrange(1, 20)))
        writes, i = [], 0
        while i < len(stream):
            step = self.rng.choice([1, 7, 64, 1000, len(stream)])
            writes.append(stream[i : i + step])
            i += step
        return writes


async def run_fuzz_session(port: int, writes: list[bytes]) -> bytes:
    """Send the writes, read whatever comes back for a moment, hang up; return the replies."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        for chunk in writes[:200]:
            writer.write(chunk)
            await writer.drain()
            if len(chunk) < 8:
                await asyncio.sleep(0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                while data := await reader.read(65536):
                    got += data
    except (ConnectionError, OSError):
        pass  # the server hung up on us: allowed
    finally:
        writer.transport.abort()
    return got


async def fuzz(port: int, fuzzer: Fuzzer, sessions: int = FUZZ_SESSIONS) -> list[bytes]:
    """Run ``sessions`` fuzz sessions, FUZZ_PARALLEL at a time; return each one's replies."""
    planned = [fuzzer.session() for _ in range(sessions)]
    gate = asyncio.Semaphore(FUZZ_PARALLEL)

    async def one(writes: list[bytes]) -> bytes:
        async with gate:
            return await run_fuzz_session(port, writes)

    return await asyncio.gather(*(one(w) for w in planned))


async def fuzz_with_honest_client(proc: DaemonProcess, fuzzer: Fuzzer,
                                  login: bool) -> tuple[list[bytes], list[str]]:
    """Fuzz while an honest client keeps sending (each must succeed), then send once more."""
    stop, sent = asyncio.Event(), []

    async def honest() -> None:
        while not stop.is_set():
            sent.append(f"honest-{len(sent)}")
            await asyncio.to_thread(good_send, proc.port, sent[-1], login)
            await asyncio.sleep(0.2)

    task = asyncio.create_task(honest())
    try:
        replies = await fuzz(proc.port, fuzzer)
    finally:
        stop.set()
        await task
    sent.append("honest-after")
    await asyncio.to_thread(good_send, proc.port, sent[-1], login)
    assert proc.proc is not None and proc.proc.poll() is None
    return replies, sent


def subject(data: bytes) -> str:
    return data.split(b"Subject: ", 1)[1].split(b"\r\n")[0].decode()


@pytest.mark.slow
async def test_fuzzer_never_relays_for_an_untrusted_client(tmp_path: Path, sink: Sink) -> None:
    """300 hostile sessions from an untrusted peer: nothing relayed; honest AUTH clients served."""
    async with daemon(tmp_path, sink, **UNTRUSTED,
                      auth={"users_file": str(users_file(tmp_path))}) as proc:
        started = time.monotonic()
        replies, sent = await fuzz_with_honest_client(proc, Fuzzer(FUZZ_SEED), login=True)
        await sink.wait_for(len(sent))
        await asyncio.sleep(1.0)  # anything the fuzzer slipped through would arrive by now
        log = proc.output()
    assert sorted(subject(m.data) for m in sink.messages) == sorted(sent)
    assert all(m.rcpts == ["buyer@example.test"] for m in sink.messages)
    joined = b"".join(replies)
    assert b"500 Error: (" not in joined  # aiosmtpd's leak of exception texts
    assert "smtp_unexpected_error" not in log, log[-3000:]
    print(f"fuzz (untrusted): {FUZZ_SESSIONS} sessions in {time.monotonic() - started:.1f}s, "
          f"{len(sent)} honest messages, {joined.count(b'530 5.7.0')} relay denials")


@pytest.mark.slow
async def test_fuzzer_never_splits_for_a_trusted_client(tmp_path: Path, sink: Sink) -> None:
    """300 hostile sessions that may relay: no hidden envelope is ever delivered, no split."""
    async with daemon(tmp_path, sink, bare_newline="normalize") as proc:
        started = time.monotonic()
        replies, sent = await fuzz_with_honest_client(proc, Fuzzer(FUZZ_SEED + 1, True), False)
        accepted = b"".join(replies).count(b"250 2.0.0 Ok: queued")
        await sink.wait_for(accepted + len(sent), timeout=60)
        await asyncio.sleep(1.0)
        log = proc.output()
    assert not [m.rcpts for m in sink.messages if any("hidden" in r for r in m.rcpts)]
    fuzzed = [m for m in sink.messages if not subject(m.data).startswith("honest-")]
    assert sorted(subject(m.data) for m in sink.messages if m not in fuzzed) == sorted(sent)
    tags = [t for m in fuzzed for t in set(re.findall(rb"Subject: fuzz (\d+)\r\n", m.data))]
    assert len(tags) == len(set(tags)), "one DATA block became two messages"
    for message in fuzzed:
        assert message.rcpts == ["fuzz-rcpt@example.test"]
        assert b"\n" not in message.data.replace(b"\r\n", b"")
    assert "smtp_unexpected_error" not in log, log[-3000:]
    print(f"fuzz (trusted): {FUZZ_SESSIONS} sessions in {time.monotonic() - started:.1f}s, "
          f"{len(fuzzed)} fuzzed messages relayed, {len(sent)} honest")


# ---- smuggling and STARTTLS injection (trusted client) --------------------------------------


def smuggling_session(probe: bytes, tag: int) -> bytes:
    hidden = (b"MAIL FROM:<hidden@evil.test>\r\nRCPT TO:<hidden-%d@victim.test>\r\nDATA\r\n"
              b"Subject: hidden %d\r\n\r\nsmuggled\r\n" % (tag, tag))
    return (b"EHLO fuzz.test\r\nMAIL FROM:<seller@shop.test>\r\nRCPT TO:<buyer@example.test>\r\n"
            b"DATA\r\nSubject: probe %d\r\n\r\nfirst" % tag + probe + hidden + b"\r\n.\r\nQUIT\r\n")


@pytest.mark.parametrize("bare_newline", ["reject", "normalize"])
async def test_smuggling_never_splits_a_message(tmp_path: Path, sink: Sink,
                                                bare_newline: str) -> None:
    """Each smuggling probe yields one reply and at most one message; the hidden rcpt gets none."""
    async with daemon(tmp_path, sink, bare_newline=bare_newline) as proc:
        accepted = 0
        for tag, (probe, piece) in enumerate((p, n) for p in SMUGGLE for n in (None, 1, 3)):
            session = smuggling_session(probe, tag)
            reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            step = piece or len(session)
            for i in range(0, len(session), step):
                writer.write(session[i : i + step])
                await writer.drain()
            replies = (await asyncio.wait_for(reader.read(), 15)).split(b"\r\n")
            writer.close()
            finals = [r for r in replies if r[:3].isdigit() and r[3:4] == b" "]
            # greeting, EHLO, MAIL, RCPT, 354, the DATA verdict, 221: never the hidden MAIL's
            assert [r[:3] for r in finals[:5]] == [b"220", b"250", b"250", b"250", b"354"], finals
            assert len(finals) == 7 and finals[6].startswith(b"221"), (probe, piece, finals)
            verdict = finals[5]
            expect = b"550 5.6.2" if bare_newline == "reject" else b"250 "
            assert verdict.startswith(expect), (probe, verdict)
            accepted += verdict.startswith(b"250")
        if accepted:
            await sink.wait_for(accepted)
        await asyncio.sleep(1.0)
    assert len(sink.messages) == accepted
    for message in sink.messages:
        assert message.rcpts == ["buyer@example.test"]
        assert b"\n" not in message.data.replace(b"\r\n", b"")  # no bare LF goes upstream
        assert b"\r" not in message.data.replace(b"\r\n", b"")
    tags = [m.data.split(b"Subject: probe ", 1)[1].split(b"\r\n")[0] for m in sink.messages]
    assert len(tags) == len(set(tags)), "one probe became two messages"


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, trustme.CA]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    return tmp_path / "cert.pem", tmp_path / "key.pem", ca


async def test_starttls_injection_is_not_executed(tmp_path: Path, sink: Sink,
                                                  tls_files: tuple[Path, Path, Any]) -> None:
    """Commands pipelined after STARTTLS in plaintext are discarded, not run inside TLS."""
    cert, key, ca = tls_files
    tls = {"mode": "starttls", "cert": str(cert), "key": str(key)}
    async with daemon(tmp_path, sink, tls=tls) as proc:
        client, greeting = await Client.connect(proc.port)
        assert code(greeting) == 220
        assert b"STARTTLS" in await client.cmd(b"EHLO inject.test")
        client.writer.write(b"STARTTLS\r\nMAIL FROM:<inject@evil.test>\r\n"
                            b"RCPT TO:<victim@victim.test>\r\nDATA\r\n")
        assert code(await client.reply()) == 220
        context = ssl.create_default_context()
        ca.configure_trust(context)
        await client.writer.start_tls(context, server_hostname="127.0.0.1")
        ehlo = await client.cmd(b"EHLO inject.test")
        assert code(ehlo) == 250 and b"STARTTLS" not in ehlo  # the EHLO's own reply, first
        assert code(await client.cmd(b"RCPT TO:<victim@victim.test>")) == 503  # no MAIL ran
        assert code(await client.cmd(b"DATA")) == 503
        assert code(await client.cmd(b"MAIL FROM:<seller@shop.test>")) == 250  # fresh state
        assert code(await client.cmd(b"QUIT")) == 221
        client.close()
        await asyncio.sleep(1.0)
    assert sink.messages == []


# ---- open relay ------------------------------------------------------------------------------

TRICKS = [
    "user%victim.example@relay.test", "user%victim.example", "@a.example:b@c.example",
    "@a.example,@b.example:user@victim.example", '"a@b"@c.example', '"user@victim.example"',
    "victim.example!user", "victim.example!user@relay.test", "user@victim.example.",
    "USER@VICTIM.EXAMPLE", "user@xn--bcher-kva.example", "user@bücher.example",
    "user@[10.9.9.9]", "user@[IPv6:::1]", "postmaster", "Postmaster", "postmaster@relay.test",
    "postmaster@victim.example", "abuse", "", "user@localhost", "user@relay.test",
]


async def relay_attempt(port: int, sender: str, rcpt: str) -> tuple[int, int, int]:
    client, _ = await Client.connect(port)
    try:
        await client.cmd(b"EHLO attacker.test")
        mail = code(await client.cmd(f"MAIL FROM:<{sender}>".encode()))
        rcpt_code = code(await client.cmd(f"RCPT TO:<{rcpt}>".encode()))
        data = code(await client.cmd(b"DATA"))
        if data == 354:
            await client.cmd(b"Subject: open relay\r\n\r\nrelayed\r\n.")
        return mail, rcpt_code, data
    finally:
        client.close()


async def test_open_relay_tricks_are_refused(tmp_path: Path, sink: Sink) -> None:
    """From an untrusted peer, every address trick is refused at MAIL or RCPT; nothing relayed."""
    async with daemon(tmp_path, sink, **UNTRUSTED) as proc:
        for trick in TRICKS:
            for sender, rcpt in ((trick, "user@victim.example"), ("a@relay.test", trick),
                                 ("", trick), ("postmaster@relay.test", trick)):
                mail, rcpt_code, data = await relay_attempt(proc.port, sender, rcpt)
                assert mail >= 500 or rcpt_code >= 500, (sender, rcpt, mail, rcpt_code)
                assert data != 354, (sender, rcpt)
        pipelined, _ = await Client.connect(proc.port)
        pipelined.writer.write(b"EHLO a\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<v@victim.example>\r\n"
                               b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        replies = await asyncio.wait_for(pipelined.reader.read(), 10)
        assert b"\r\n354 " not in replies and b"554 5.7.1" in replies
        await asyncio.sleep(1.0)
    assert sink.messages == []


async def test_auth_required_refuses_trusted_network(tmp_path: Path, sink: Sink) -> None:
    """With auth.required, a client on an allowed network still needs AUTH to relay."""
    auth = {"required": True, "users_file": str(users_file(tmp_path))}
    async with daemon(tmp_path, sink, auth=auth) as proc:
        mail, rcpt_code, data = await relay_attempt(proc.port, USER, "buyer@example.test")
        assert mail == 530 and rcpt_code >= 500 and data == 503
        with pytest.raises(smtplib.SMTPSenderRefused):
            await asyncio.to_thread(good_send, proc.port, "no-login", False)
        await asyncio.to_thread(good_send, proc.port, "with-login")
        await sink.wait_for(1)
        await asyncio.sleep(0.5)
    assert [b"with-login" in m.data for m in sink.messages] == [True]


@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
async def test_overlong_auth_answer_is_a_client_error(tmp_path: Path, sink: Sink,
                                                      mechanism: bytes) -> None:
    """An AUTH answer line over the limit gets a 501 and the session goes on; nothing is logged
    as an unexpected error."""
    async with daemon(tmp_path, sink, auth={"users_file": str(users_file(tmp_path))}) as proc:
        client, _ = await Client.connect(proc.port)
        await client.cmd(b"EHLO a.test")
        assert code(await client.cmd(b"AUTH " + mechanism)) == 334
        reply = await client.cmd(b"A" * 5000)
        if mechanism == b"LOGIN":  # the password is asked for before the verdict
            assert code(reply) == 334
            reply = await client.cmd(b"cGFzcw==")
        assert code(reply) == 501, reply
        assert code(await client.cmd(b"NOOP")) == 250
        client.close()
        log = proc.output()
    assert "smtp_unexpected_error" not in log


# ---- resources ------------------------------------------------------------------------------


def _reset_peak(pid: int) -> bool:
    """Reset the daemon's VmHWM (needs root or the same user); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def open_many(port: int, count: int) -> list[tuple[Client, bytes]]:
    out: list[tuple[Client, bytes]] = []
    for start in range(0, count, 50):
        out += await asyncio.gather(*(Client.connect(port) for _ in range(start,
                                                                          min(count, start + 50))))
    return out


async def load(client: Client, worker: int, count: int) -> None:
    """``count`` 2 KB messages over one already open connection."""
    await client.cmd(b"EHLO load.test")
    for n in range(count):
        assert code(await client.cmd(b"MAIL FROM:<seller@shop.test>")) == 250
        assert code(await client.cmd(b"RCPT TO:<buyer@example.test>")) == 250
        assert code(await client.cmd(b"DATA")) == 354
        body = b"Subject: load %d-%d\r\n\r\n" % (worker, n) + (b"x" * 78 + b"\r\n") * 25 + b"."
        assert code(await client.cmd(body)) == 250
    await client.cmd(b"QUIT")


@pytest.mark.slow
async def test_500_connections_bounded_rss_and_421(tmp_path: Path, sink: Sink) -> None:
    """500 open connections plus load: RSS stays bounded, connection 501+ gets 421."""
    fds = raise_fd_limit(4096)  # the daemon inherits it; it needs one fd per connection
    limit = min(500, fds - 150)  # fewer connections where the fd limit cannot be raised
    assert limit >= 100, f"fd limit {fds} too low for this test"
    async with daemon(tmp_path, sink, max_connections=limit, max_message_size="1MiB") as proc:
        assert proc.proc is not None
        pid = proc.proc.pid
        limits = Path(f"/proc/{pid}/limits").read_text()
        daemon_fds = next(line for line in limits.splitlines() if "open files" in line)
        base = rss_kib(pid)
        reset = _reset_peak(pid)  # VmHWM then covers the load, not start-up (argon2's 64 MiB)
        idle = await open_many(proc.port, limit)
        assert [g[:3] for _, g in idle] == [b"220"] * limit, proc.output()[-2000:]
        extra = await open_many(proc.port, 20)
        assert [g[:3] for _, g in extra] == [b"421"] * 20
        await asyncio.gather(*(load(client, w, 5) for w, (client, _) in enumerate(idle[:20])))
        full = rss_kib(pid)
        peak = rss_kib(pid, "VmHWM") if reset else full
        for client, _ in idle + extra:
            client.close()
        await sink.wait_for(100, timeout=60)
        for _ in range(50):  # connection_lost frees the slots on the daemon's next loop turns
            client, greeting = await Client.connect(proc.port)
            client.close()
            if code(greeting) == 220:
                break
            await asyncio.sleep(0.1)
        assert code(greeting) == 220
        print(f"daemon fd limit {daemon_fds.split()[3]}; RSS {base // 1024} MiB at start, "
              f"{full // 1024} MiB with {limit} connections, peak {peak // 1024} MiB")
    assert peak < 300 * 1024
    assert len(sink.messages) == 100


async def test_oversized_message_refused_without_buffering(tmp_path: Path, sink: Sink) -> None:
    """20 MiB against a 1 MiB limit: 552 after the dot, RSS grows far less than 20 MiB."""
    async with daemon(tmp_path, sink, max_message_size="1MiB") as proc:
        assert proc.proc is not None
        pid = proc.proc.pid
        client, _ = await Client.connect(proc.port)
        assert b"SIZE 1048576" in await client.cmd(b"EHLO big.test")
        refused = await client.cmd(b"MAIL FROM:<seller@shop.test> SIZE=20971520")
        assert code(refused) == 552
        assert code(await client.cmd(b"MAIL FROM:<seller@shop.test>")) == 250
        assert code(await client.cmd(b"RCPT TO:<buyer@example.test>")) == 250
        assert code(await client.cmd(b"DATA")) == 354
        before, samples = rss_kib(pid), []
        reset = _reset_peak(pid)
        client.writer.write(b"Subject: big\r\n\r\n")
        line = b"y" * 998 + b"\r\n"
        for _ in range(20):
            client.writer.write(line * 1048)  # about 1 MiB per write
            await client.writer.drain()
            samples.append(rss_kib(pid))
        reply = await client.cmd(b".", timeout=60)
        peak = max([*samples, rss_kib(pid, "VmHWM") if reset else 0])
        growth = peak - before
        assert code(reply) == 552, reply
        assert code(await client.cmd(b"RSET")) == 250  # the session goes on
        assert code(await client.cmd(b"MAIL FROM:<seller@shop.test>")) == 250
        assert code(await client.cmd(b"RCPT TO:<buyer@example.test>")) == 250
        assert code(await client.cmd(b"DATA")) == 354
        assert code(await client.cmd(b"Subject: small\r\n\r\nfits\r\n.")) == 250
        client.close()
        await sink.wait_for(1)
        print(f"oversized: RSS {before // 1024} MiB before, peak growth {growth} KiB")
    assert growth < 8 * 1024, f"RSS grew {growth} KiB while refusing a 20 MiB message"
    assert [b"Subject: small" in m.data for m in sink.messages] == [True]


async def test_connect_and_close_frees_the_slot_at_once(tmp_path: Path, sink: Sink) -> None:
    """Port scans and TCP health checks (connect, hang up) never use up max_connections."""
    async with daemon(tmp_path, sink, max_connections=5) as proc:
        for _ in range(30):
            _, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.5)
        clients = await open_many(proc.port, 5)
        assert [g[:3] for _, g in clients] == [b"220"] * 5
        for client, _ in clients:
            client.close()
