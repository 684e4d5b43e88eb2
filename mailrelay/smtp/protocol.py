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
header parser; differential tests check that both give exactly what aiosmtpd gives. The
sans-I/O DATA decoder lives in ``smtp/data.py``, the two fast paths in ``smtp/fastpaths.py``.

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
import logging
import socket
import ssl
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import aiosmtpd.smtp as stock
import structlog
from aiosmtpd.smtp import MISSING, SMTP, syntax

from mailrelay.smtp import replies
from mailrelay.smtp.data import (
    DataDecoder,
    DataResult,
    has_bare_newline,
    normalize_newlines,
    read_data,
)
from mailrelay.smtp.fastpaths import HookTables, has_own_hooks, hook_tables, plain_angle_addr

__all__ = [  # the DATA and fast-path helpers are re-exported for callers and tests
    "REPLY_BARE_NEWLINE", "REPLY_LOCAL_ERROR", "REPLY_SHUTTING_DOWN",
    "REPLY_TOO_MANY_CONNECTIONS", "ConnectionLimiter", "DataDecoder", "DataResult", "HookTables",
    "RelaySMTP", "has_own_hooks", "hook_tables", "normalize_newlines", "plain_angle_addr",
]

log = structlog.get_logger("mailrelay.smtp")

BareNewline = Literal["reject", "normalize"]

REPLY_TOO_MANY_CONNECTIONS = str(replies.TOO_MANY_CONNECTIONS)
REPLY_SHUTTING_DOWN = str(replies.SHUTTING_DOWN)
REPLY_LOCAL_ERROR = str(replies.LOCAL_ERROR)
REPLY_BARE_NEWLINE = str(replies.BARE_NEWLINE)

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
        self._smtp_init(handler, smtp_plain=not has_own_hooks(self), **kwargs)
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
