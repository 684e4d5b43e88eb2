"""ImapSession against a real Dovecot on 127.0.0.1 (plus table tests of its pure helpers)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dovecot import (  # the fixtures are imported so this file also runs without conftest.py
    DEFAULT_PASSWORD,
    DEFAULT_USER,
    DovecotServer,
    _free_port,
    dovecot_fixture,  # noqa: F401
    dovecot_tls_fixture,  # noqa: F401
)

from mailrelay.imap import client as client_module
from mailrelay.imap.client import (
    FetchedMessage,
    ImapAuthError,
    ImapConnectionError,
    ImapError,
    ImapSession,
    encode_mailbox_name,
    parse_fetch_bodies,
    push_kind,
    uid_set,
)

pytestmark = pytest.mark.timeout(30)
integration = pytest.mark.integration

SAMPLES = Path(__file__).parent / "data" / "samples"
TIMEOUT = 5.0
FOLDER = "Processed/Opt-outs"


def message(n: int) -> bytes:
    """A small distinct message; the body holds IMAP-looking text to stress literal parsing."""
    return (
        f"From: buyer{n}@marketplace.amazon.com\r\nTo: seller@shop.example\r\n"
        f"Subject: test {n}\r\nMessage-ID: <m{n}@test>\r\n\r\n"
        f"line {{5}}\r\n)\r\n* {n} FETCH (UID 99 BODY[] {{3}}\r\n.\r\nend\r\n"
    ).encode()


def crlf(raw: bytes) -> bytes:
    """Normalise line endings (servers store CRLF; sample files may use LF)."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def open_session(server: DovecotServer, password: str = DEFAULT_PASSWORD) -> ImapSession:
    session = ImapSession()
    await session.connect(server.host, server.port, "off", DEFAULT_USER, password, TIMEOUT)
    return session


@pytest.fixture
async def session(dovecot: DovecotServer) -> AsyncIterator[ImapSession]:
    """A logged-in session with INBOX selected."""
    imap = await open_session(dovecot)
    await imap.select("INBOX")
    yield imap
    await imap.logout()


# ----- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("INBOX", "INBOX"),
        ("Processed/Opt-outs", "Processed/Opt-outs"),
        ("Entwürfe", "Entw&APw-rfe"),
        ("Tom & Jerry", "Tom &- Jerry"),
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 example
    ],
)
def test_encode_mailbox_name(name: str, wire: str) -> None:
    """Folder names are sent in modified UTF-7 so non-ASCII folders work on every server."""
    assert encode_mailbox_name(name) == wire


@pytest.mark.parametrize(
    ("uids", "expected"),
    [([5], "5"), ([1, 2, 3, 7], "1:3,7"), ([9, 3, 2, 2, 10], "2:3,9:10"), ([4, 6, 8], "4,6,8")],
)
def test_uid_set(uids: list[int], expected: str) -> None:
    """UID lists are compressed into ranges to keep command lines short."""
    assert uid_set(uids) == expected


def test_parse_fetch_bodies_pairs_literals_with_uids() -> None:
    """Each literal is paired with its UID, even when the UID follows the literal."""
    lines = [
        b"1 FETCH (UID 10 BODY[] {3}", bytearray(b"abc"), b")",
        b"2 FETCH (FLAGS (\\Seen))",
        b"3 FETCH (BODY[] {2}", bytearray(b"de"), b" UID 12)",
        b"Fetch completed.",
    ]
    assert parse_fetch_bodies(lines) == [FetchedMessage(10, b"abc"), FetchedMessage(12, b"de")]


@pytest.mark.parametrize(
    ("lines", "kind"),
    [
        ([b"3 EXISTS", b"1 RECENT"], "event"),
        ([b"2 EXPUNGE"], "event"),
        ([b"OK Still here"], "noise"),
        ([b"BYE Server shutting down."], "bye"),
    ],
)
def test_push_kind(lines: list[bytes], kind: str) -> None:
    """Only mailbox changes wake the poller; keepalives do not, BYE is a disconnect."""
    assert push_kind(lines) == kind


@pytest.mark.parametrize("tls", ["starttls", "ssl", ""])
async def test_unsupported_tls_mode_is_a_clear_error(tls: str) -> None:
    """STARTTLS (unsupported by aioimaplib) and typos fail before any connection is made."""
    with pytest.raises(ValueError, match="implicit"):
        await ImapSession().connect("127.0.0.1", 1, tls, "u", "p", 1.0)  # type: ignore[arg-type]


# ----- connection and login -------------------------------------------------------------------


@integration
async def test_login_and_capabilities(dovecot: DovecotServer) -> None:
    """Login works and post-login capabilities (MOVE, UIDPLUS, IDLE) are known."""
    imap = await open_session(dovecot)
    assert {"IMAP4REV1", "IDLE", "MOVE", "UIDPLUS"} <= imap.capabilities
    await imap.logout()
    assert imap.connection_lost.is_set()


@integration
@pytest.mark.parametrize(
    ("user", "password"), [(DEFAULT_USER, "wrong"), ("nobody@example.test", DEFAULT_PASSWORD)]
)
async def test_wrong_credentials_raise_auth_error(
    dovecot: DovecotServer, user: str, password: str
) -> None:
    """A wrong password or unknown user is an ImapAuthError, distinct from network trouble."""
    session = ImapSession()
    with pytest.raises(ImapAuthError, match="login refused"):
        await session.connect(dovecot.host, dovecot.port, "off", user, password, TIMEOUT)
    assert session.connection_lost.is_set()


async def test_connection_refused_is_connection_error() -> None:
    """Nothing listening: ImapConnectionError wrapping the OSError, raised at once."""
    with pytest.raises(ImapConnectionError) as info:
        await ImapSession().connect("127.0.0.1", _free_port(), "off", "u", "p", TIMEOUT)
    assert isinstance(info.value.__cause__, OSError)


@integration
async def test_implicit_tls_with_trusted_ca(dovecot_tls: DovecotServer) -> None:
    """Implicit TLS (port 993 style) logs in when the CA is trusted."""
    imap = ImapSession()
    context = ssl.create_default_context()
    dovecot_tls.ca.configure_trust(context)  # type: ignore[attr-defined]
    await imap.connect(
        "127.0.0.1", dovecot_tls.tls_port, "implicit", DEFAULT_USER, DEFAULT_PASSWORD, TIMEOUT,
        ssl_context=context,
    )
    assert (await imap.select("INBOX")).exists == 0
    await imap.logout()


@integration
async def test_implicit_tls_untrusted_certificate(dovecot_tls: DovecotServer) -> None:
    """An untrusted server certificate is a connection error naming the verification failure."""
    with pytest.raises(ImapConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await ImapSession().connect(
            "127.0.0.1", dovecot_tls.tls_port, "implicit", DEFAULT_USER, DEFAULT_PASSWORD, TIMEOUT
        )


# ----- select / search / fetch ----------------------------------------------------------------


@integration
async def test_select_reports_mailbox_state(dovecot: DovecotServer) -> None:
    """SELECT returns the server's UIDVALIDITY, UIDNEXT and message count."""
    dovecot.append(DEFAULT_USER, message(1))
    imap = await open_session(dovecot)
    state = await imap.select("INBOX")
    assert state.uidvalidity == dovecot.uidvalidity(DEFAULT_USER)
    assert (state.uidnext, state.exists) == (2, 1)
    await imap.logout()


@integration
async def test_select_missing_mailbox_keeps_session(session: ImapSession) -> None:
    """SELECT of a missing mailbox is an ImapError; the connection stays usable."""
    with pytest.raises(ImapError) as info:
        await session.select("No/Such/Box")
    assert not isinstance(info.value, ImapConnectionError)
    assert (await session.select("INBOX")).exists == 0


@integration
async def test_uids_since(dovecot: DovecotServer, session: ImapSession) -> None:
    """uids_since returns only newer UIDs, also when none is newer ('n:*' quirk)."""
    assert await session.uids_since(0) == []
    uids = [dovecot.append(DEFAULT_USER, message(n)) for n in range(3)]
    assert await session.uids_since(0) == uids
    assert await session.uids_since(uids[0]) == uids[1:]
    assert await session.uids_since(uids[-1]) == []
    assert await session.uids_since(uids[-1] + 100) == []


@integration
async def test_fetch_is_byte_identical_and_keeps_unseen(
    dovecot: DovecotServer, session: ImapSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetched bytes equal what was delivered, across batches, and nothing becomes \\Seen."""
    monkeypatch.setattr(client_module, "FETCH_BATCH", 2)  # exercise batching with few messages
    raws = [crlf(p.read_bytes()) for p in sorted(SAMPLES.glob("*.eml"))[:3]]
    raws += [message(1), message(2)]
    uids = [dovecot.append(DEFAULT_USER, raw) for raw in raws]
    fetched = await session.fetch([*uids, 999])
    assert [m.uid for m in fetched] == uids
    assert [crlf(m.raw) for m in fetched] == raws
    assert all("\\Seen" not in flags for _uid, flags, _raw in dovecot.fetch_all(DEFAULT_USER))


# ----- IDLE -----------------------------------------------------------------------------------


@integration
async def test_idle_wakes_on_new_mail(dovecot: DovecotServer, session: ImapSession) -> None:
    """IDLE returns True soon after another client delivers a message, then False when quiet."""
    idle = asyncio.create_task(session.idle(10))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    uid = await asyncio.to_thread(dovecot.append, DEFAULT_USER, message(1))
    assert await idle is True
    assert time.monotonic() - started < 2.5
    assert await session.uids_since(0) == [uid]
    assert await session.idle(0.5) is False  # no stale push left over


@integration
async def test_idle_times_out_without_activity(session: ImapSession) -> None:
    """A quiet IDLE returns False after about its timeout."""
    started = time.monotonic()
    assert await session.idle(0.5) is False
    assert 0.4 < time.monotonic() - started < 2.0


@integration
@pytest.mark.slow
async def test_idle_ignores_keepalives(dovecot: DovecotServer) -> None:
    """Dovecot's '* OK Still here' keepalives do not count as new mail."""
    dovecot.configure(imap_idle_notify_interval="1 secs")
    imap = await open_session(dovecot)
    await imap.select("INBOX")
    assert await imap.idle(2.5) is False
    await imap.logout()


@integration
@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_server_gone_during_idle(
    dovecot: DovecotServer, session: ImapSession, how: str
) -> None:
    """A crash (SIGKILL) or shutdown (BYE) mid-IDLE raises promptly and sets connection_lost."""
    idle = asyncio.create_task(session.idle(60))
    await asyncio.sleep(0.3)
    await asyncio.to_thread(getattr(dovecot, how))
    with pytest.raises(ImapConnectionError):
        async with asyncio.timeout(5):
            await idle
    assert session.connection_lost.is_set()
    async with asyncio.timeout(2):
        await session.logout()


@integration
async def test_server_killed_between_commands(dovecot: DovecotServer, session: ImapSession) -> None:
    """After a crash the next command fails fast with ImapConnectionError."""
    await asyncio.to_thread(dovecot.kill)
    started = time.monotonic()
    with pytest.raises(ImapConnectionError):
        await session.uids_since(0)
    assert time.monotonic() - started < 2
    assert session.connection_lost.is_set()


@integration
async def test_cancelled_idle_leaves_session_usable(
    dovecot: DovecotServer, session: ImapSession
) -> None:
    """Cancelling idle() (daemon shutdown) ends IDLE cleanly; the session keeps working."""
    idle = asyncio.create_task(session.idle(60))
    await asyncio.sleep(0.3)
    idle.cancel()
    with pytest.raises(asyncio.CancelledError):
        await idle
    uid = dovecot.append(DEFAULT_USER, message(1))
    assert await session.uids_since(0) == [uid]


@integration
async def test_hung_server_never_hangs_the_client(dovecot: DovecotServer) -> None:
    """A server that stops answering (SIGSTOP) fails idle() and connect() within their limits."""
    imap = ImapSession()
    await imap.connect(dovecot.host, dovecot.port, "off", DEFAULT_USER, DEFAULT_PASSWORD, 1.0)
    await imap.select("INBOX")
    started = time.monotonic()
    idle = asyncio.create_task(imap.idle(0.5))
    await asyncio.sleep(0.2)  # IDLE is running now
    dovecot.pause()
    try:
        with pytest.raises(ImapConnectionError, match="IDLE DONE: no answer"):
            await idle
        assert time.monotonic() - started < 3
        assert imap.connection_lost.is_set()
        with pytest.raises(ImapConnectionError, match="no answer"):
            await ImapSession().connect(dovecot.host, dovecot.port, "off", "u", "p", 0.5)
    finally:
        dovecot.resume()


@integration
async def test_without_idle_capability_poll_mode(dovecot: DovecotServer) -> None:
    """When IDLE is not advertised, idle() refuses clearly and searching still finds new mail."""
    dovecot.set_idle_support(False)
    imap = await open_session(dovecot)
    await imap.select("INBOX")
    assert not imap.supports_idle
    with pytest.raises(ImapError, match="IDLE"):
        await imap.idle(1)
    uid = dovecot.append(DEFAULT_USER, message(1))
    assert await imap.uids_since(0) == [uid]
    await imap.logout()


# ----- move / flag / delete -------------------------------------------------------------------


@integration
@pytest.mark.parametrize("dropped", [(), ("MOVE",), ("MOVE", "UIDPLUS")])
async def test_move_creates_folder_and_removes_from_inbox(
    dovecot: DovecotServer, dropped: tuple[str, ...]
) -> None:
    """Moved messages land in a new nested folder and leave INBOX, with or without MOVE."""
    if dropped:
        dovecot.drop_capabilities(*dropped)
    uids = [dovecot.append(DEFAULT_USER, message(n)) for n in range(3)]
    imap = await open_session(dovecot)
    assert not set(dropped) & imap.capabilities
    await imap.select("INBOX")
    await imap.move(uids[:2], FOLDER)
    await imap.move([uids[2]], FOLDER)  # folder exists now
    await imap.logout()
    assert FOLDER in dovecot.mailboxes(DEFAULT_USER)
    assert dovecot.list_uids(DEFAULT_USER) == []
    moved = [raw for _uid, _flags, raw in dovecot.fetch_all(DEFAULT_USER, FOLDER)]
    assert moved == [message(n) for n in range(3)]


@integration
async def test_move_fallback_leaves_other_messages(dovecot: DovecotServer) -> None:
    """Without MOVE the COPY+EXPUNGE fallback removes only the moved messages."""
    dovecot.set_move_support(False)
    keep, go = (dovecot.append(DEFAULT_USER, message(n)) for n in range(2))
    imap = await open_session(dovecot)
    await imap.select("INBOX")
    await imap.move([go], FOLDER)
    await imap.logout()
    assert dovecot.list_uids(DEFAULT_USER) == [keep]


@integration
async def test_move_to_non_ascii_folder(dovecot: DovecotServer, session: ImapSession) -> None:
    """Non-ASCII folder names are created in modified UTF-7."""
    dovecot.append(DEFAULT_USER, message(1))
    await session.move(await session.uids_since(0), "Entwürfe/Opt-outs")
    assert "Entw&APw-rfe/Opt-outs" in dovecot.mailboxes(DEFAULT_USER)


@integration
async def test_flag_and_delete(dovecot: DovecotServer, session: ImapSession) -> None:
    """flag() adds a flag or keyword; delete() expunges exactly the given messages."""
    for n in range(3):
        dovecot.append(DEFAULT_USER, message(n))
    uids = await session.uids_since(0)  # as the poller does: UIDs come from a search
    await session.flag(uids[:2], "\\Seen")
    await session.flag([uids[0]], "$MailrelayOptOut")
    await session.delete([uids[1]])
    flags = {uid: f for uid, f, _raw in dovecot.fetch_all(DEFAULT_USER)}
    assert set(flags) == {uids[0], uids[2]}
    assert {"\\Seen", "$MailrelayOptOut"} <= flags[uids[0]]
    assert "\\Seen" not in flags[uids[2]]
    with pytest.raises(ValueError, match="flag"):
        await session.flag(uids, "bad flag)")


# ----- UIDVALIDITY ----------------------------------------------------------------------------


@integration
async def test_uidvalidity_change_is_visible(dovecot: DovecotServer) -> None:
    """After the server rebuilds its index, a new session sees another UIDVALIDITY."""
    dovecot.append(DEFAULT_USER, message(1))
    imap = await open_session(dovecot)
    before = await imap.select("INBOX")
    await imap.logout()
    await asyncio.to_thread(dovecot.change_uidvalidity, DEFAULT_USER, "INBOX")
    imap = await open_session(dovecot)
    after = await imap.select("INBOX")
    assert after.uidvalidity != before.uidvalidity
    assert after.exists == 1
    await imap.logout()
