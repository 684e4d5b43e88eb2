"""The SMTP server protocol: aiosmtpd's ``SMTP`` with a fast, strict DATA phase and limits.

Why a subclass: aiosmtpd 1.4.6 reads DATA one ``readuntil(b"\\r\\n")`` per line in Python,
which is the relay's bottleneck for large mail (performance.md: 1.6-2x at 100 KB). It also
passes bare CR/LF through untouched, which lets a sender inject headers that our parser and
the upstream server see differently (libraries.md §1), it has no connection limit (#282), it
answers unexpected errors with a permanent ``500`` that leaks the exception text, and it has
no way to drain sessions on shutdown. ``RelaySMTP`` fixes those and changes nothing else.
Two more overrides only save CPU (at 2 KB most of it goes to per-connection and per-command
overhead): ``SMTP.__init__`` is replayed with the hook/command/AUTH tables found once per
(protocol class, handler class) instead of by ``inspect.getmembers``/``dir`` per connection,
and ``_getaddr`` answers plain ``<local@domain>`` and ``<>`` with a regex instead of the email
header parser; differential tests check that both give exactly what aiosmtpd gives.

DATA semantics kept from aiosmtpd 1.4.6 (checked by a differential test against it):
only ``<CRLF>.<CRLF>`` (or ``.<CRLF>`` as the whole data) ends DATA; leading dots are
unstuffed; the size limit counts the raw octets before the final dot; a line of 1000+ octets
before its CRLF gets ``500 Line too long``, too much data gets ``552`` (whichever aiosmtpd
would have reported first), both only after the final dot, and the session continues; bytes
after the final dot stay in the reader, so pipelined commands work.

Differences on purpose: bare CR/LF are rejected (``550 5.6.2``) or normalised to CRLF
(``bare_newline``); in normalise mode ``original_content`` is the normalised bytes too, so
nothing downstream can see the bare LF. ``decode_data=True`` and the deprecated
``process_message`` handler API are not supported. Handler exceptions always answer
``451 4.3.0`` (a ``handle_exception`` on the handler is not consulted).

aiosmtpd internals used (pin ``aiosmtpd>=1.4.6,<1.5`` and keep the differential test):
``SMTP._reader``, ``SMTP._writer``, ``SMTP._call_handler_hook``, ``SMTP._set_post_data_state``,
``SMTP.transport``/``session``/``envelope``/``data_size_limit``/``line_length_limit``,
``SMTP.check_helo_needed``/``check_auth_needed``/``push``, ``aiosmtpd.smtp.MISSING`` and
``aiosmtpd.smtp.syntax``; that ``SMTP.__init__`` gives the StreamReader
``limit=line_length_limit`` (``read_data`` relies on its LimitOverrunError); and that
``connection_made`` is called a second time, with ``self.transport`` already set, after STARTTLS.
``RelaySMTP._smtp_init`` copies the body of 1.4.6's ``SMTP.__init__`` (every attribute it sets,
with ``aiosmtpd.smtp``'s ``log``, ``make_loop``, ``_AuthMechAttr``, ``is_int``,
``login_always_fail`` and constants) and ``_getaddr`` mirrors 1.4.6's ``_getaddr``: a new
aiosmtpd must be re-checked against both (tests ``test_setup_matches_stock`` and
``test_getaddr_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import re
import socket
import ssl
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import aiosmtpd.smtp as stock
import structlog
from aiosmtpd.smtp import MISSING, SMTP, syntax

log = structlog.get_logger("mailrelay.smtp")

BareNewline = Literal["reject", "normalize"]

REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down"
REPLY_LOCAL_ERROR = "451 4.3.0 Temporary local error"
REPLY_BARE_NEWLINE = "550 5.6.2 Bare CR or LF in message data not allowed"
REPLY_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"  # aiosmtpd's wording
REPLY_TOO_MUCH_DATA = "552 Error: Too much mail data"  # aiosmtpd's wording

END_OF_DATA = b"\r\n.\r\n"
_DOT_CRLF = b".\r\n"


@dataclass(frozen=True)
class DataResult:
    """One finished DATA phase: the unstuffed content, or the reply that replaces it."""

    content: bytes
    error: str | None = None


class DataDecoder:
    """Sans-IO accumulator for one DATA phase, fed the chunks ``read_data`` takes off the wire.

    Chunks never split a ``.<CRLF>`` and hold one only at their end (``readuntil(b".\\r\\n")``
    guarantees both), so the end of data is found from a chunk's last octets and the two
    before it; everything else (line lengths, size) is chunking-independent.
    The verdict matches aiosmtpd 1.4.6 exactly: the first CRLF-delimited line that is too
    long (``line_length_limit - 1`` octets or more) or ends past the size limit decides; it is
    500 if its content exceeds ``line_length_limit`` (aiosmtpd's reader overruns before
    counting it) or the line still fits the limit, else 552. Data is dropped from then on.
    """

    def __init__(self, size_limit: int | None, line_length_limit: int) -> None:
        self._limit: float = size_limit or math.inf
        self._too_long = line_length_limit - 1
        self._overrun = line_length_limit + 1
        self._parts: list[bytes | memoryview] = []
        self._tail = b"\r\n"  # last 2 octets seen; the data's start counts as after a CRLF
        self._received = 0  # octets before the final ".<CRLF>"
        self._carry = 0  # octets of the current line that have no CRLF yet
        self._dropping = False
        self._error: str | None = None

    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk as ``read_data`` cuts them; return True when it ends the data."""
        final = chunk.endswith(_DOT_CRLF) and (self._tail + chunk[-5:]).endswith(END_OF_DATA)
        size = len(chunk) - 3 if final else len(chunk)
        straddle = self._tail[-1:] == b"\r" and chunk[:1] == b"\n"
        if self._error is None:
            self._scan(chunk, size, final, straddle)
        if not self._dropping:
            self._parts.append(memoryview(chunk)[:size] if final else chunk)
        self._received += size
        self._tail = (self._tail + chunk[-2:])[-2:]
        return final

    def finish(self) -> DataResult:
        """Return the unstuffed content, or the 500/552 reply aiosmtpd would have sent."""
        if self._error is not None:
            return DataResult(b"", self._error)
        assert not self._dropping, "a dropped line always completes before the final dot"
        raw = b"".join(self._parts)
        self._parts.clear()
        return DataResult(unstuff(raw))

    def _scan(self, chunk: bytes, size: int, final: bool, straddle: bool) -> None:
        end = self._received + size
        if self._carry + size < self._too_long and end <= self._limit:
            crlf = chunk.rfind(b"\r\n", 0, size)  # fast path: no line can be too long here
            if crlf >= 0:
                self._carry = size - crlf - 2
            else:
                self._carry = size - 1 if straddle else self._carry + size
            return
        lengths = self._line_lengths(chunk, final, straddle)
        partial = lengths.pop()
        if (not lengths or max(lengths) < self._too_long) and end - partial <= self._limit:
            self._carry = partial
            if end > self._limit:  # the limit falls inside a line: it decides once complete
                self._drop()
            return
        self._judge(lengths)

    def _line_lengths(self, chunk: bytes, final: bool, straddle: bool) -> list[int]:
        """Lengths (without CRLF) of the lines this chunk completes, then of the unfinished one."""
        parts = chunk.split(b"\r\n")
        if final:
            parts[-2:] = [parts[-2][:-1]]  # drop the final ".<CRLF>"
        lengths = list(map(len, parts))
        if straddle:  # the previous chunk ended in CR and this one starts with its LF
            lengths[0] -= 1
            lengths.insert(0, self._carry - 1)
        else:
            lengths[0] += self._carry
        return lengths

    def _judge(self, complete: list[int]) -> None:
        start = self._received - self._carry
        for length in complete:
            end = start + length + 2
            if length >= self._too_long or end > self._limit:
                line_first = length >= self._overrun or end <= self._limit
                self._error = REPLY_LINE_TOO_LONG if line_first else REPLY_TOO_MUCH_DATA
                self._drop()
                return
            start = end

    def _drop(self) -> None:
        self._dropping = True
        self._parts.clear()


def unstuff(raw: bytes) -> bytes:
    """Remove the transparency dot from every line that starts with one (RFC 5321 4.5.2)."""
    if raw[:1] == b".":
        raw = raw[1:]
    return raw.replace(b"\r\n.", b"\r\n")


def has_bare_newline(data: bytes) -> bool:
    """True if data holds a CR not followed by LF or an LF not preceded by CR."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def normalize_newlines(data: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF, leaving existing CRLFs alone."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


async def read_data(reader: asyncio.StreamReader, decoder: DataDecoder) -> None:
    """Feed decoder from reader up to the final dot, leaving later octets in the reader.

    Each pass takes what the socket delivered up to the next ``.<CRLF>``: when none is
    buffered yet, the reader's line limit makes ``readuntil`` raise and we take the octets
    it has already searched.
    """
    while True:
        try:
            chunk = await reader.readuntil(_DOT_CRLF)
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(exc.consumed)
        if decoder.feed(chunk):
            return


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext, ASCII only
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_PLAIN_ANGLE_ADDR = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})?>")
_BLANKS = (" ", "\t")


def plain_angle_addr(arg: str) -> tuple[str, str] | None:
    """``(address, rest)`` as aiosmtpd's ``_getaddr`` finds them in ``<local@domain>`` or ``<>``.

    None for every other form (quotes, source routes, comments, blanks inside the brackets,
    non-ASCII, RFC 2047 look-alikes): those go to aiosmtpd's email-parser route, which costs
    about 50 µs per MAIL/RCPT. What the email parser does after the ``>`` is mirrored: after
    an address it eats the blanks (``str.lstrip``: any Unicode white space once a SP or HT
    starts it), after ``<>`` it eats nothing.
    """
    match = _PLAIN_ANGLE_ADDR.match(arg)
    if match is None:
        return None
    rest = arg[match.end():]
    address = match.group(1)
    if address is None:
        return "<>", rest
    if "=?" in address:  # the email parser would try an encoded word here
        return None
    if rest[:1] in _BLANKS:
        rest = rest.lstrip()
    if rest[:1] == "(":  # a comment, which the email parser would eat too
        return None
    return address, rest


_HOOK_PREFIXES = ("auth_", "handle_", "smtp_")


def _prefixed(names: Iterable[str], prefix: str) -> dict[str, str]:
    """aiosmtpd's ``{m.replace(prefix, ""): m for m in dir(obj) if m.startswith(prefix)}``."""
    return {name.replace(prefix, ""): name for name in names if name.startswith(prefix)}


def _has_own_hooks(obj: object) -> bool:
    """True if obj's instance dict holds an ``auth_``/``handle_``/``smtp_`` name."""
    own = getattr(obj, "__dict__", None)
    return isinstance(own, dict) and any(
        isinstance(name, str) and name.startswith(_HOOK_PREFIXES) for name in own)


def _class_defined(obj: object, names: Iterable[str]) -> bool:
    """True if ``dir(obj)`` and these names' values depend on obj's class alone."""
    cls = type(obj)
    if cls.__dir__ is not object.__dir__ or cls.__getattribute__ is not object.__getattribute__:
        return False
    return not _has_own_hooks(obj) and all(
        isinstance(inspect.getattr_static(cls, name, None), types.FunctionType) for name in names)


@dataclass(frozen=True)
class HookTables:
    """What aiosmtpd's ``SMTP.__init__`` finds by introspection, as attribute names.

    aiosmtpd 1.4.6 runs ``inspect.getmembers`` and ``dir`` on the protocol and on the handler
    for every connection (about 70 µs, a sixth of the relay's CPU at 2 KB). When every name
    found is a plain function of the two classes (no instance attributes, no custom
    ``__dir__``/``__getattribute__``), the names depend on the classes alone, so they are found
    once per (protocol class, handler class) and each connection only binds them. Adding or
    removing such a method on a class after its first connection is not seen.
    """

    auth: dict[str, tuple[str, bool]]  # mechanism -> (attribute, is built in), aiosmtpd's order
    hooks: dict[str, str]  # command -> handler attribute
    commands: dict[str, str]  # command -> protocol attribute
    ehlo_params: int | None  # parameter count of the bound handle_EHLO; None without one
    cacheable: bool

    @classmethod
    def discover(cls, smtp: SMTP, handler: Any) -> HookTables:
        """Look the names up the way aiosmtpd does."""
        auth: dict[str, tuple[str, bool]] = {}
        for obj in (smtp, handler):
            for name, member in inspect.getmembers(obj):
                if name.startswith("auth_"):
                    default = name.replace("auth_", "").replace("__", "-")
                    auth[getattr(member, "__auth_mechanism_name__", default)] = (name, obj is smtp)
        hooks = _prefixed(dir(handler), "handle_")
        commands = _prefixed(dir(smtp), "smtp_")
        ehlo = hooks.get("EHLO")
        ehlo_params = None if ehlo is None else len(
            inspect.signature(getattr(handler, ehlo)).parameters)
        cacheable = _class_defined(
            smtp, [n for n, builtin in auth.values() if builtin] + list(commands.values())
        ) and _class_defined(
            handler, [n for n, builtin in auth.values() if not builtin] + list(hooks.values()))
        return cls(auth, hooks, commands, ehlo_params, cacheable)


_TABLES: dict[tuple[type, type], HookTables] = {}


def hook_tables(smtp: SMTP, handler: Any, smtp_plain: bool) -> HookTables:
    """The tables for one connection; smtp_plain: smtp had no hook-like attribute of its own."""
    key = (type(smtp), type(handler))
    tables = _TABLES.get(key)
    if tables is None or not smtp_plain or _has_own_hooks(handler):
        tables = HookTables.discover(smtp, handler)
        if tables.cacheable and smtp_plain:
            _TABLES[key] = tables
    return tables


class ConnectionLimiter:
    """Caps concurrent SMTP sessions and drains them on shutdown; share one per listener set.

    aiosmtpd has no connection limit (#282, wontfix) and ``Server.close()`` leaves clients
    connected, so the sessions are tracked here.
    """

    def __init__(self, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.draining = False  # True: refuse new connections and new MAIL transactions
        self._sessions: set[RelaySMTP] = set()
        self._emptied: asyncio.Event | None = None

    @property
    def active(self) -> int:
        """Number of sessions currently admitted."""
        return len(self._sessions)

    def admit(self, session: RelaySMTP) -> str | None:
        """Register session; return the 421 reply to send instead when it must be refused."""
        if self.draining:
            return REPLY_SHUTTING_DOWN
        if len(self._sessions) >= self.max_connections:
            return REPLY_TOO_MANY_CONNECTIONS
        self._sessions.add(session)
        return None

    def release(self, session: RelaySMTP) -> None:
        """Forget session (its connection is gone)."""
        self._sessions.discard(session)
        if not self._sessions and self._emptied is not None:
            self._emptied.set()

    async def close_all(self, deadline: float) -> None:
        """Drain every session, aborting what is left at ``deadline`` (``loop.time()`` clock).

        Idle sessions get ``421 4.3.2`` and are closed now; a session inside DATA gets its
        final reply, then the 421. New connections and new MAIL are refused meanwhile.
        """
        self.draining = True
        for session in list(self._sessions):
            if not session.in_data:
                session.close_for_shutdown()
        self._emptied = asyncio.Event()
        if not self._sessions:
            return
        try:
            async with asyncio.timeout_at(deadline):
                await self._emptied.wait()
        except TimeoutError:
            log.warning("smtp_shutdown_deadline", aborted=len(self._sessions))
            for session in list(self._sessions):
                session.abort()
            with contextlib.suppress(TimeoutError):  # connection_lost runs on later loop turns
                async with asyncio.timeout(1.0):
                    await self._emptied.wait()


class RelaySMTP(SMTP):
    """aiosmtpd ``SMTP`` with the chunked DATA reader, bare-newline policy, limits, draining."""

    def __init__(
        self,
        handler: Any,
        *,
        bare_newline: BareNewline = "reject",
        connection_limiter: ConnectionLimiter | None = None,
        data_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        if bare_newline not in ("reject", "normalize"):
            raise ValueError(f"bare_newline must be 'reject' or 'normalize', not {bare_newline!r}")
        if kwargs.get("decode_data"):
            raise ValueError("RelaySMTP keeps message content as bytes (decode_data=False)")
        self._smtp_init(handler, smtp_plain=not _has_own_hooks(self), **kwargs)
        self.bare_newline: BareNewline = bare_newline
        self.in_data = False  # inside DATA: from the 354 until the final reply is written
        self._limiter = connection_limiter
        self._refused = False
        # The whole DATA phase (reading and storing) must end within this many seconds; the
        # idle timer is not reset while data streams in, so a trickling sender cannot hold
        # a connection for ever, and a big message on a slow link is not cut at idle_timeout.
        self.data_timeout = data_timeout

    def _smtp_init(  # aiosmtpd's signature, plus smtp_plain
        self,
        handler: Any,
        *,
        smtp_plain: bool,
        data_size_limit: int | None = stock.DATA_SIZE_DEFAULT,
        enable_SMTPUTF8: bool = False,
        decode_data: bool = False,
        hostname: str | None = None,
        ident: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        timeout: float = 300,
        auth_required: bool = False,
        auth_require_tls: bool = True,
        auth_exclude_mechanism: Iterable[str] | None = None,
        auth_callback: stock.AuthCallbackType | None = None,
        command_call_limit: int | dict[str, int] | None = None,
        authenticator: stock.AuthenticatorType | None = None,
        proxy_protocol_timeout: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """aiosmtpd 1.4.6's ``SMTP.__init__`` statement for statement, hook tables from the cache.

        Kept identical by a differential test on the instance's attributes.
        """
        self.__ident__ = ident or stock.__ident__
        # make_loop() is asyncio.get_event_loop() inside warnings.catch_warnings(), which
        # rewrites the process's warning filters; in a running loop it returns that loop.
        self.loop = loop or asyncio._get_running_loop() or stock.make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.event_handler = handler
        assert data_size_limit is None or isinstance(data_size_limit, int)
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.command_size_limits.clear()
        self.hostname = hostname if hostname else socket.getfqdn()
        self.tls_context = tls_context
        if tls_context:
            if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
                stock.log.warning("tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
                                  "this might cause client connection problems")
            elif tls_context.check_hostname:
                stock.log.warning("tls_context.check_hostname == True; "
                                  "this might cause client connection problems")
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._smtp_init_auth(auth_required, auth_require_tls, proxy_protocol_timeout,
                             authenticator, auth_callback)
        self._bind_hooks(handler, hook_tables(self, handler, smtp_plain), auth_exclude_mechanism)
        self._smtp_init_call_limit(command_call_limit)

    def _smtp_init_auth(self, auth_required: bool, auth_require_tls: bool,
                        proxy_protocol_timeout: float | None,
                        authenticator: stock.AuthenticatorType | None,
                        auth_callback: stock.AuthCallbackType | None) -> None:
        """The AUTH and PROXY part of aiosmtpd's ``__init__``."""
        if not auth_require_tls and auth_required:
            warnings.warn("Requiring AUTH while not requiring TLS "
                          "can lead to security vulnerabilities!", stacklevel=1)
            stock.log.warning("auth_required == True but auth_require_tls == False")
        self._auth_require_tls = auth_require_tls
        if proxy_protocol_timeout is not None:
            if proxy_protocol_timeout <= 0:
                raise ValueError("proxy_protocol_timeout must be > 0")
            if proxy_protocol_timeout < 3.0:
                stock.log.warning("proxy_protocol_timeout < 3.0")
        self._proxy_timeout = proxy_protocol_timeout
        if authenticator is not None:
            self._authenticator = authenticator
            self._auth_callback = None
        else:
            self._auth_callback = auth_callback or stock.login_always_fail
            self._authenticator = None
        self._auth_required = auth_required

    def _bind_hooks(self, handler: Any, tables: HookTables,
                    auth_exclude_mechanism: Iterable[str] | None) -> None:
        """Fill aiosmtpd's per-connection tables from the names: bound methods of this pair."""
        self._hook_tables = tables
        self._auth_methods = {
            mechanism: stock._AuthMechAttr(getattr(self if builtin else handler, name), builtin)
            for mechanism, (name, builtin) in tables.auth.items()
        }
        for mechanism in auth_exclude_mechanism or []:
            self._auth_methods.pop(mechanism, None)
        if stock.log.isEnabledFor(logging.INFO):
            stock.log.info("Available AUTH mechanisms: " + " ".join(
                m + "(builtin)" if impl.is_builtin else m
                for m, impl in sorted(self._auth_methods.items())))
        self._handle_hooks = {cmd: getattr(handler, name) for cmd, name in tables.hooks.items()}
        if tables.ehlo_params is None:
            self._ehlo_hook_ver = None
        elif tables.ehlo_params == 4:
            self._ehlo_hook_ver = "old"
            warnings.warn("Use the 5-argument handle_EHLO() hook instead of "
                          "the 4-argument handle_EHLO() hook; "
                          "support for the 4-argument handle_EHLO() hook will be "
                          "removed in version 2.0", DeprecationWarning, stacklevel=1)
        elif tables.ehlo_params == 5:
            self._ehlo_hook_ver = "new"
        else:
            raise RuntimeError("Unsupported EHLO Hook")
        self._smtp_methods = {cmd: getattr(self, name) for cmd, name in tables.commands.items()}

    def _smtp_init_call_limit(self, command_call_limit: int | dict[str, int] | None) -> None:
        """The command call limit part of aiosmtpd's ``__init__``."""
        if command_call_limit is None:
            self._enforce_call_limit = False
            return
        self._enforce_call_limit = True
        if isinstance(command_call_limit, int):
            self._call_limit_base = {}
            self._call_limit_default = command_call_limit
        elif isinstance(command_call_limit, dict):
            if not all(map(stock.is_int, command_call_limit.values())):
                raise TypeError("All command_call_limit values must be int")
            self._call_limit_base = command_call_limit
            self._call_limit_default = command_call_limit.get("*", stock.CALL_LIMIT_DEFAULT)
        else:
            raise TypeError("command_call_limit must be int or Dict[str, int]")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT/VRFY address parser with a fast path for ``<local@domain>``.

        aiosmtpd builds a ``typing.Protocol`` class and runs the email header parser for every
        address (about 13 % of the relay's CPU at 2 KB); ``plain_angle_addr`` gives the same
        answer for the plain form, everything else still goes to aiosmtpd.
        """
        plain = plain_angle_addr(arg) if arg else None
        if plain is None:
            return super()._getaddr(arg)
        address, rest = plain
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection, or answer 421 and close it before aiosmtpd sees it."""
        first_call = self.transport is None  # the second call comes after STARTTLS
        if first_call and self._limiter is not None:
            refusal = self._limiter.admit(self)
            if refusal is not None:
                self._refused = True
                log.warning(
                    "smtp_connection_refused",
                    peer=transport.get_extra_info("peername"),
                    reply=refusal,
                    active=self._limiter.active,
                )
                transport.write(refusal.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:  # aiosmtpd never set this connection up
            return
        try:
            super().connection_lost(error)
        finally:
            if self._limiter is not None:
                self._limiter.release(self)

    def eof_received(self) -> bool | None:
        """The client hung up: close our side as well, so its connection slot is freed now.

        aiosmtpd cancels its handler task here and leaves closing to that task; under uvloop
        the EOF of a connect-and-close client can arrive before the task first runs, the
        cancellation then skips its cleanup, and the half-open connection held its slot until
        the idle timeout (a port scan or TCP health check could exhaust max_connections).
        """
        if self._refused:
            return False
        super().eof_received()
        return False  # the transport closes itself; connection_lost releases the slot

    def close_for_shutdown(self) -> None:
        """Send ``421 4.3.2`` and close; for sessions not inside DATA."""
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(REPLY_SHUTTING_DOWN.encode("ascii") + b"\r\n")
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (shutdown deadline passed)."""
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    async def handle_exception(self, error: Exception) -> str:
        """Answer any unexpected error with a temporary failure and log its traceback.

        aiosmtpd's default is ``500 Error: (Type) text``: permanent, and it leaks internals.
        """
        peer = self.session.peer if self.session is not None else None
        log.error("smtp_unexpected_error", peer=peer, exc_info=error)
        return REPLY_LOCAL_ERROR

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._limiter is not None and self._limiter.draining:
            self.close_for_shutdown()
            return
        await super().smtp_MAIL(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        if self.data_timeout:
            self._reset_timeout(self.data_timeout)
        self.in_data = True
        try:
            try:
                reply = await self._receive_message()
            finally:
                self._set_post_data_state()
            await self.push(reply)
        finally:
            self.in_data = False
        if self._limiter is not None and self._limiter.draining:
            self.close_for_shutdown()

    async def _receive_message(self) -> str:
        """Read the data, apply the limits and the bare-newline policy, run handle_DATA."""
        decoder = DataDecoder(self.data_size_limit, self.line_length_limit)
        await read_data(self._reader, decoder)
        result = decoder.finish()
        if result.error is not None:
            return result.error
        content = result.content
        if has_bare_newline(content):
            if self.bare_newline == "reject":
                assert self.session is not None
                log.info("smtp_bare_newline_rejected", peer=self.session.peer)
                return REPLY_BARE_NEWLINE
            content = normalize_newlines(content)
        assert self.envelope is not None
        self.envelope.content = self.envelope.original_content = content
        try:
            status = await self._call_handler_hook("DATA")
        except Exception as error:  # replied here so the 421 of a drain comes after it
            return await self.handle_exception(error)
        return "250 OK" if status is MISSING else status
