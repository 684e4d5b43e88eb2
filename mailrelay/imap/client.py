"""Thin async IMAP session over aioimaplib 2.0.3, shaped for the opt-out poller.

Why a wrapper: aioimaplib leaves the hard parts to the caller (docs/libraries.md section 2).
Literals arrive as separate list items, ``UID n:*`` returns the last message even below n, a
dropped connection leaves commands and IDLE waiting for ever, and IDLE answered with BYE hangs.
This module hides that behind a few methods that either finish within ``timeout`` or raise.

Errors (one family, so the poller needs a single ``except ImapError``):

* ``ImapAuthError``: the server refused the credentials (or forbids LOGIN). Retrying soon
  will not help; alert the operator.
* ``ImapConnectionError``: network failure, TLS failure, timeout, BYE, lost connection or a
  confused aioimaplib. OSError and TimeoutError are wrapped into it (chained with ``from``).
  The session is then closed and unusable: create a new ``ImapSession`` (with backoff).
* ``ImapError`` itself: the server answered NO/BAD to a command (e.g. SELECT of a missing
  mailbox). The connection is still usable.

``ValueError`` is raised for caller mistakes (unsupported TLS mode, bad flag syntax).
One session is one connection; it is not safe to run two methods of it concurrently.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import aioimaplib

T = TypeVar("T")
TlsMode = Literal["implicit", "off", "starttls"]

FETCH_BATCH = 100
UID_BATCH = 500
FETCH_TIMEOUT_FACTOR = 10  # a whole FETCH batch may take this many `timeout`s (data trickles)
LOGOUT_TIMEOUT = 5.0

_FETCH_LINE_RE = re.compile(rb"^\d+ FETCH \(")
_LITERAL_END_RE = re.compile(rb"\{\d+\}$")
_UID_RE = re.compile(rb"\bUID (\d+)")
_CODE_RE = re.compile(rb"\[(UIDVALIDITY|UIDNEXT) (\d+)\]")
_EXISTS_RE = re.compile(rb"^(\d+) EXISTS")
_MAILBOX_EVENT_RE = re.compile(rb"^\d+ (EXISTS|EXPUNGE|RECENT|FETCH)\b")
_FLAG_RE = re.compile(r"^\\?[A-Za-z0-9$_.\-]+$")


class ImapError(Exception):
    """The IMAP server refused a command; the session is still usable."""


class ImapAuthError(ImapError):
    """Login refused: wrong credentials, or plaintext LOGIN disabled by the server."""


class ImapConnectionError(ImapError):
    """Transport-level failure; the session is closed and must be replaced."""


class SelectResult(NamedTuple):
    """State of the selected mailbox; ``uidnext`` is None when the server omits it."""

    uidvalidity: int
    uidnext: int | None
    exists: int


class FetchedMessage(NamedTuple):
    uid: int
    raw: bytes


# ----- pure helpers (no I/O) ------------------------------------------------------------------


def encode_mailbox_name(name: str) -> str:
    """Encode a mailbox name in IMAP modified UTF-7 (RFC 3501 5.1.3); ASCII stays readable."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            utf16 = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(utf16).rstrip(b"=").decode().replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def mailbox_arg(name: str) -> str:
    """A mailbox name as a command argument: modified UTF-7, then quoted (aioimaplib sends raw)."""
    return aioimaplib.quoted(encode_mailbox_name(name))


def uid_set(uids: Iterable[int]) -> str:
    """Compact sequence-set for UIDs, e.g. [1, 2, 3, 7] -> '1:3,7'."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in [*ordered[1:], None]:
        if uid is not None and uid == prev + 1:
            prev = uid
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        if uid is not None:
            start = prev = uid
    return ",".join(parts)


def chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def parse_select(lines: Sequence[Any]) -> SelectResult:
    """Read UIDVALIDITY, UIDNEXT and EXISTS from a SELECT response."""
    codes: dict[bytes, int] = {}
    exists = 0
    for line in lines:
        if not isinstance(line, bytes):
            continue
        for match in _CODE_RE.finditer(line):
            codes[match.group(1)] = int(match.group(2))
        if match_exists := _EXISTS_RE.match(line):
            exists = int(match_exists.group(1))
    if b"UIDVALIDITY" not in codes:
        raise ImapError("server did not report UIDVALIDITY on SELECT")
    return SelectResult(codes[b"UIDVALIDITY"], codes.get(b"UIDNEXT"), exists)


def parse_search(lines: Sequence[Any]) -> list[int]:
    """UIDs from the untagged SEARCH lines (all but the last, tagged, line)."""
    return [
        int(tok)
        for line in lines[:-1]
        if isinstance(line, bytes)
        for tok in line.split()
        if tok.isdigit()
    ]


def parse_fetch_bodies(lines: Sequence[Any]) -> list[FetchedMessage]:
    """Pair each 'n FETCH (UID u BODY[] {size}' line with the bytearray literal that follows.

    The UID may also come after the literal (in the closing line), so both are searched.
    Unsolicited FETCH lines without a literal (flag updates) are skipped.
    """
    found: list[FetchedMessage] = []
    for i, line in enumerate(lines[:-1]):
        literal = lines[i + 1]
        if not (isinstance(line, bytes) and isinstance(literal, bytearray)):
            continue
        if not (_FETCH_LINE_RE.match(line) and _LITERAL_END_RE.search(line)):
            continue
        tail = lines[i + 2] if i + 2 < len(lines) and isinstance(lines[i + 2], bytes) else b""
        match = _UID_RE.search(line) or _UID_RE.search(tail)
        if match:
            found.append(FetchedMessage(int(match.group(1)), bytes(literal)))
    return found


def push_kind(lines: Sequence[Any]) -> Literal["event", "bye", "stop", "noise"]:
    """Classify one batch of lines pushed during IDLE ('* OK Still here' is noise)."""
    if lines is aioimaplib.STOP_WAIT_SERVER_PUSH or list(lines) == aioimaplib.STOP_WAIT_SERVER_PUSH:
        return "stop"
    byte_lines = [line for line in lines if isinstance(line, bytes | bytearray)]
    if any(line.startswith(b"BYE") for line in byte_lines):
        return "bye"
    if any(_MAILBOX_EVENT_RE.match(line) for line in byte_lines):
        return "event"
    return "noise"


def _text(response: Any) -> str:
    last = response.lines[-1] if response.lines else b""
    return bytes(last).decode(errors="replace")


def _ssl_context(tls: str, ssl_context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    if tls == "implicit":
        return ssl_context or ssl.create_default_context()
    if tls == "off":
        return None
    if tls == "starttls":
        raise ValueError("aioimaplib has no STARTTLS: use tls 'implicit' (port 993) or 'off'")
    raise ValueError(f"unknown tls mode {tls!r}: expected 'implicit' or 'off'")


# ----- the session ----------------------------------------------------------------------------


class ImapSession:
    """One IMAP connection: connect, select one mailbox, then search/fetch/idle/move."""

    def __init__(self) -> None:
        self.connection_lost = asyncio.Event()
        self._imap: aioimaplib.IMAP4 | None = None
        self._timeout = 30.0
        self._known_folders: set[str] = set()

    @property
    def capabilities(self) -> frozenset[str]:
        """Capabilities advertised after login (upper case)."""
        if self._imap is None:
            return frozenset()
        return frozenset(c.upper() for c in self._imap.protocol.capabilities)

    @property
    def supports_idle(self) -> bool:
        return "IDLE" in self.capabilities

    async def connect(
        self,
        host: str,
        port: int,
        tls: TlsMode,
        username: str,
        password: str,
        timeout: float,  # noqa: ASYNC109 - per-command limit, not a deadline for connect
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Open the connection, read the greeting, LOGIN and refresh the capabilities."""
        if self._imap is not None:
            raise RuntimeError("ImapSession.connect() may be called only once")
        context = _ssl_context(tls, ssl_context)
        self._timeout = timeout
        self._imap = aioimaplib.IMAP4(
            host=host, port=port, timeout=timeout,
            conn_lost_cb=self._on_connection_lost, ssl_context=context,
        )
        try:
            await self._call("connect", self._imap.wait_hello_from_server())
            await self._login(username, password)
        except BaseException:
            self._abort()
            raise

    async def _login(self, username: str, password: str) -> None:
        assert self._imap is not None
        if "LOGINDISABLED" in self.capabilities:
            raise ImapAuthError("server disables LOGIN on this connection: use tls 'implicit'")
        response = await self._call(
            "LOGIN", self._imap.login(aioimaplib.quoted(username), password)
        )
        if response.result == "NO" and not re.search(r"\[(UNAVAILABLE|SERVERBUG)", _text(response)):
            raise ImapAuthError(f"login refused for {username!r}: {_text(response)}")
        self._expect_ok("LOGIN", response)
        # The pre-login list lacks MOVE/UIDPLUS; the LOGIN response code may be absent.
        await self._call("CAPABILITY", self._imap.protocol.capability())

    async def select(self, mailbox: str = "INBOX") -> SelectResult:
        """SELECT ``mailbox`` (read-write, so move/flag/delete work)."""
        imap = self._live()
        response = await self._call("SELECT", imap.select(mailbox_arg(mailbox)))
        self._expect_ok(f"SELECT {mailbox!r}", response)
        return parse_select(response.lines)

    async def uids_since(self, last_uid: int) -> list[int]:
        """UIDs greater than ``last_uid``, ascending ('n:*' also matches the highest UID < n)."""
        imap = self._live()
        await self._sync()
        response = await self._call(
            "UID SEARCH", imap.uid_search("UID", f"{last_uid + 1}:*", charset=None)
        )
        self._expect_ok("UID SEARCH", response)
        return sorted(uid for uid in set(parse_search(response.lines)) if uid > last_uid)

    async def fetch(self, uids: Sequence[int]) -> list[FetchedMessage]:
        """Raw bytes of ``uids`` via BODY.PEEK[] (\\Seen stays unset); vanished UIDs are skipped."""
        imap = self._live()
        await self._sync()
        found: list[FetchedMessage] = []
        for batch in chunks(sorted(set(uids)), FETCH_BATCH):
            response = await self._call(
                "UID FETCH",
                imap.uid("fetch", uid_set(batch), "(UID BODY.PEEK[])"),
                limit=self._timeout * FETCH_TIMEOUT_FACTOR,
            )
            self._expect_ok("UID FETCH", response)
            wanted = set(batch)
            found.extend(m for m in parse_fetch_bodies(response.lines) if m.uid in wanted)
        return sorted(found, key=lambda m: m.uid)

    async def _sync(self) -> None:
        """NOOP, so the server adds messages delivered by others since our last command.

        Dovecot evaluates a command against the mailbox view the client was last told about
        (new mail is announced at the end of a command), so without this a UID SEARCH right
        after another client's APPEND misses the new messages until the next command.
        """
        imap = self._live()
        self._expect_ok("NOOP", await self._call("NOOP", imap.noop()))

    async def move(self, uids: Sequence[int], folder: str) -> None:
        """Move ``uids`` to ``folder`` (created if missing; name used verbatim, '/' is not mapped).

        Uses UID MOVE when advertised, else UID COPY + \\Deleted + UID EXPUNGE (UIDPLUS) or,
        lacking UIDPLUS, a plain EXPUNGE, which also removes other messages already \\Deleted.
        """
        if not uids:
            return
        imap = self._live()
        target = mailbox_arg(folder)
        await self._ensure_folder(target, folder)
        for batch in chunks(sorted(set(uids)), UID_BATCH):
            if "MOVE" in self.capabilities:
                response = await self._call("UID MOVE", imap.uid("move", uid_set(batch), target))
                self._expect_ok(f"UID MOVE to {folder!r}", response)
            else:
                response = await self._call("UID COPY", imap.uid("copy", uid_set(batch), target))
                self._expect_ok(f"UID COPY to {folder!r}", response)
                await self._delete_batch(batch)

    async def flag(self, uids: Sequence[int], flag: str) -> None:
        """Add ``flag`` (e.g. '\\Seen' or a keyword like '$MailrelayOptOut') to ``uids``."""
        if not _FLAG_RE.match(flag):
            raise ValueError(f"not a valid IMAP flag: {flag!r}")
        imap = self._live()
        for batch in chunks(sorted(set(uids)), UID_BATCH):
            response = await self._call(
                "UID STORE", imap.uid("store", uid_set(batch), "+FLAGS.SILENT", f"({flag})")
            )
            self._expect_ok(f"UID STORE {flag}", response)

    async def delete(self, uids: Sequence[int]) -> None:
        """Mark ``uids`` \\Deleted and expunge them (UID EXPUNGE when UIDPLUS is available)."""
        for batch in chunks(sorted(set(uids)), UID_BATCH):
            await self._delete_batch(batch)

    async def _delete_batch(self, batch: Sequence[int]) -> None:
        await self.flag(batch, "\\Deleted")
        imap = self._live()
        if "UIDPLUS" in self.capabilities:
            response = await self._call("UID EXPUNGE", imap.uid("expunge", uid_set(batch)))
        else:
            response = await self._call("EXPUNGE", imap.expunge())
        self._expect_ok("EXPUNGE", response)

    async def _ensure_folder(self, target: str, folder: str) -> None:
        """CREATE once per session; 'already exists' is success (checked with LIST if unsure)."""
        if target in self._known_folders:
            return
        imap = self._live()
        response = await self._call("CREATE", imap.create(target))
        if response.result != "OK" and "ALREADYEXISTS" not in _text(response):
            listed = await self._call("LIST", imap.list('""', target))
            if not any(line for line in listed.lines[:-1]):
                raise ImapError(f"cannot create folder {folder!r}: {_text(response)}")
        self._known_folders.add(target)

    async def idle(self, timeout: float) -> bool:  # noqa: ASYNC109 - IDLE duration
        """IDLE up to ``timeout`` s: True if the mailbox changed (EXISTS, EXPUNGE...), else False.

        Keepalives ('* OK Still here') are ignored. BYE or a lost connection raise
        ImapConnectionError. IDLE is always ended (DONE) before returning.
        """
        imap = self._live()
        if not self.supports_idle:
            raise ImapError("server does not advertise IDLE: poll instead")
        self._drain_pushes()
        idle_task = await self._call("IDLE", imap.idle_start(timeout=timeout))
        try:
            changed = await self._wait_push(timeout)
        finally:
            await self._end_idle(idle_task)
        return self._drain_pushes() or changed

    async def _wait_push(self, seconds: float) -> bool:
        imap = self._live()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            getter = asyncio.ensure_future(imap.protocol.idle_queue.get())
            lost = asyncio.ensure_future(self.connection_lost.wait())
            try:
                await asyncio.wait(
                    {getter, lost}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                lost.cancel()
                getter.cancel()
            if not getter.cancelled() and getter.done():
                kind = push_kind(getter.result())
                if kind == "bye":
                    self._abort()
                    raise ImapConnectionError("server sent BYE during IDLE")
                if kind != "noise":
                    return kind == "event"
            if self.connection_lost.is_set():
                raise ImapConnectionError("connection lost during IDLE")
        return False

    async def _end_idle(self, idle_task: asyncio.Future[Any]) -> None:
        """Send DONE and wait for the IDLE command's tagged OK (bounded)."""
        if self._imap is None or self.connection_lost.is_set():
            return
        if self._imap.has_pending_idle():
            self._imap.idle_done()
        response = await self._call("IDLE DONE", idle_task)
        self._expect_ok("IDLE", response)

    def _drain_pushes(self) -> bool:
        """Empty the push queue; True if it held a mailbox event (e.g. EXISTS after our STOP)."""
        if self._imap is None:
            return False
        queue = self._imap.protocol.idle_queue
        changed = False
        while not queue.empty():
            changed = push_kind(queue.get_nowait()) == "event" or changed
        return changed

    async def logout(self) -> None:
        """LOGOUT if the connection is alive (bounded, errors ignored), then close it."""
        if self._imap is None:
            return
        try:
            if not self.connection_lost.is_set():
                await self._call("LOGOUT", self._imap.logout(), limit=LOGOUT_TIMEOUT)
        except ImapError:
            pass
        finally:
            self._abort()

    # ----- plumbing ---------------------------------------------------------------------------

    def _live(self) -> aioimaplib.IMAP4:
        if self._imap is None:
            raise RuntimeError("ImapSession is not connected")
        if self.connection_lost.is_set():
            raise ImapConnectionError("connection is closed: reconnect")
        return self._imap

    def _on_connection_lost(self, exc: Exception | None) -> None:
        self.connection_lost.set()

    def _expect_ok(self, what: str, response: Any) -> None:
        if response.result != "OK":
            raise ImapError(f"{what} failed: {response.result} {_text(response)}")

    async def _call(self, what: str, aw: Awaitable[T], limit: float | None = None) -> T:
        """Await one aioimaplib call, bounded by ``limit`` s, failing fast if the link drops."""
        self._live()
        task = asyncio.ensure_future(aw)
        lost = asyncio.ensure_future(self.connection_lost.wait())
        limit = limit or self._timeout
        try:
            async with asyncio.timeout(limit):
                await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            self._abort()
            raise ImapConnectionError(f"{what}: no answer within {limit:g} s") from None
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            self._abort()
            raise ImapConnectionError(f"{what}: connection lost")
        try:
            return task.result()
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            self._abort()
            raise ImapConnectionError(f"{what}: {type(exc).__name__}: {exc}") from exc

    def _abort(self) -> None:
        """Close the transport and cancel aioimaplib's leftover tasks; the session is done."""
        self.connection_lost.set()
        if self._imap is None:
            return
        transport = self._imap.protocol.transport
        if transport is not None:
            transport.abort()
        if not self._imap._client_task.done():
            self._imap._client_task.cancel()
        for task in [*self._imap.tasks, *self._imap.protocol.tasks]:
            task.cancel()
        if self._imap._idle_waiter is not None:
            self._imap._idle_waiter.cancel()
