"""Send queued mail to the upstream smarthost over one reused SMTP connection.

A queue worker owns one ``SmtpUpstream`` and calls ``send`` per message; sends on one
instance are serialised because an SMTP connection carries one transaction at a time (run
several workers for concurrency). The connection stays open between messages because a new
TCP + TLS + EHLO + AUTH per message costs about as much as the message itself
(performance.md). It is dropped after any transport error or timeout and reopened on the
next send; a reused connection the server has silently closed is detected at MAIL FROM,
before any recipient was accepted, and the message is retried once on a fresh connection.

aiosmtplib does the connection work (TCP, TLS, EHLO, AUTH); the transaction itself is
written here with ``execute_command`` so that every recipient gets its own result, addresses
are sent exactly as received, and the body goes out as the raw bytes with one
``bytes.replace`` for dot-stuffing instead of aiosmtplib's per-message regex pass.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPException,
    SMTPHeloError,
    SMTPResponse,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import normalize_message_line_endings

from mailrelay.smtp.retry import Outcome, classify_reply

TlsMode = Literal["starttls", "implicit", "off"]

#: MAIL FROM parameter keyword -> EHLO keyword that must be advertised to pass it through.
_OPTION_EXTENSION = {"SMTPUTF8": "smtputf8", "RET": "dsn", "ENVID": "dsn", "AUTH": "auth"}


@dataclass(frozen=True)
class RecipientResult:
    """What happened to one recipient: ``code`` is None when no server reply was involved."""

    rcpt: str
    outcome: Outcome
    code: int | None
    message: str


class UpstreamAuthError(Exception):
    """The upstream refused our credentials (or offers no usable AUTH).

    Raised instead of per-recipient results because every message would fail the same way:
    the caller pauses delivery and alerts the operator rather than bouncing the queue.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class _NoStartTls(SMTPException):
    """tls=starttls but the server does not offer STARTTLS: never fall back to clear text."""


class _StaleConnection(Exception):
    """A reused connection was found closed at MAIL FROM, before anything was accepted."""


class SmtpUpstream:
    """One upstream smarthost with one lazily opened, reused connection."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: TlsMode,
        username: str | None,
        password: str | None,
        timeout: float,
        local_hostname: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if tls not in ("starttls", "implicit", "off"):
            raise ValueError(f"tls must be starttls, implicit or off, not {tls!r}")
        self._host = host
        self._port = port
        self._tls = tls
        self._username = username
        self._password = password
        self._timeout = timeout
        self._local_hostname = local_hostname
        self._ssl_context = ssl_context
        self._smtp: SMTP | None = None
        self._lock = asyncio.Lock()

    async def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        raw: bytes,
        mail_options: Sequence[str] = (),
    ) -> list[RecipientResult]:
        """Deliver ``raw`` (CRLF line endings) to ``rcpts``; one result per recipient, in order.

        ``mail_from`` "" or "<>" (as aiosmtpd reports it) sends the null sender MAIL FROM:<>.

        Never raises for delivery problems: refusals become sent/deferred/failed by reply
        code, and network errors, timeouts and TLS problems make unresolved recipients
        deferred. Raises UpstreamAuthError when authentication fails. ``mail_options``
        (e.g. BODY=8BITMIME, SMTPUTF8) are passed on only if the upstream advertises them.
        """
        results: dict[str, RecipientResult] = {}
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout) as deadline:
                    await self._send_locked(mail_from, rcpts, raw, mail_options, results)
            except TimeoutError as exc:
                self._drop()
                reason = str(exc) or type(exc).__name__
                if deadline.expired():
                    reason = f"no complete answer within the {self._timeout:g}s deadline"
                return self._finish(rcpts, results, reason)
            except (SMTPException, OSError) as exc:
                self._drop()
                return self._finish(rcpts, results, str(exc) or type(exc).__name__)
            except BaseException:  # UpstreamAuthError, cancellation: connection state unknown
                self._drop()
                raise
        return self._finish(rcpts, results, "no reply")

    async def close(self) -> None:
        """QUIT politely (bounded by the timeout) and close the connection if one is open."""
        async with self._lock:
            smtp, self._smtp = self._smtp, None
            if smtp is None or not smtp.is_connected:
                return
            try:
                async with asyncio.timeout(min(self._timeout, 5.0)):
                    await smtp.quit()
            except (SMTPException, OSError, TimeoutError):
                pass
            finally:
                smtp.close()

    async def _send_locked(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        raw: bytes,
        mail_options: Sequence[str],
        results: dict[str, RecipientResult],
    ) -> None:
        """Run the transaction, retrying once on a fresh connection if the old one was stale."""
        reused = self._smtp is not None and self._smtp.is_connected
        if not reused:
            await self._connect()
        try:
            await self._transaction(mail_from, rcpts, raw, mail_options, results, reused)
        except _StaleConnection:
            self._drop()
            await self._connect()
            await self._transaction(mail_from, rcpts, raw, mail_options, results, False)

    async def _connect(self) -> None:
        """Open the connection: TLS as configured (no downgrade), EHLO, then AUTH."""
        smtp = SMTP(
            hostname=self._host,
            port=self._port,
            timeout=self._timeout,
            use_tls=self._tls == "implicit",
            start_tls=False,
            tls_context=self._client_context() if self._tls != "off" else None,
            local_hostname=self._local_hostname,
        )
        self._smtp = smtp
        await smtp.connect()
        await self._greet(smtp)
        if self._tls == "starttls":
            if not smtp.supports_extension("starttls"):
                raise _NoStartTls(
                    f"upstream {self._host}:{self._port} does not offer STARTTLS "
                    "(tls: starttls); nothing was sent in clear text"
                )
            await smtp.starttls()
            await self._greet(smtp)
        if self._username is not None:
            await self._login(smtp)

    def _client_context(self) -> ssl.SSLContext:
        """The configured context, else the system default (certificate and name checked)."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    @staticmethod
    async def _greet(smtp: SMTP) -> None:
        """EHLO, falling back to HELO for a server without ESMTP (then: no extensions)."""
        try:
            await smtp.ehlo()
        except SMTPHeloError:
            await smtp.helo()

    async def _login(self, smtp: SMTP) -> None:
        """AUTH with the configured credentials; every failure is an UpstreamAuthError."""
        where = f"upstream {self._host}:{self._port}"
        if not smtp.supports_extension("auth") or not smtp.supported_auth_methods:
            raise UpstreamAuthError(f"{where} offers no usable AUTH mechanism")
        try:
            await smtp.login(self._username or "", self._password or "")
        except SMTPAuthenticationError as exc:
            raise UpstreamAuthError(
                f"{where} rejected AUTH for {self._username!r}: {exc.code} {exc.message}",
                exc.code,
            ) from exc

    async def _transaction(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        raw: bytes,
        mail_options: Sequence[str],
        results: dict[str, RecipientResult],
        reused: bool,
    ) -> None:
        """MAIL, RCPT per recipient, DATA; record a result for each recipient decided."""
        smtp = self._smtp
        if smtp is None:
            raise SMTPServerDisconnected("Server not connected")
        options = filter_mail_options(mail_options, smtp.esmtp_extensions)
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        if "size" in smtp.esmtp_extensions:
            options.insert(0, f"SIZE={len(raw)}")
        try:  # aiosmtpd reports the null sender MAIL FROM:<> as "<>"
            sender = envelope_address("" if mail_from == "<>" else mail_from, encoding)
        except ValueError as exc:
            for rcpt in rcpts:
                results[rcpt] = RecipientResult(rcpt, "failed", None, f"sender: {exc}")
            return
        reply = await self._mail(smtp, sender, options, reused)
        if reply.code != 250:
            _record_all(rcpts, results, reply)
            await self._reset()
            return
        accepted = await self._recipients(smtp, rcpts, encoding, results)
        if not accepted:
            await self._reset()
            return
        await self._data(smtp, accepted, raw, results)

    async def _mail(
        self, smtp: SMTP, sender: bytes, options: list[str], reused: bool
    ) -> SMTPResponse:
        """MAIL FROM; on a reused connection a drop or 421 here means it had gone stale."""
        args = [option.encode("ascii") for option in options]
        try:
            reply = await smtp.execute_command(b"MAIL", b"FROM:" + sender, *args)
        except SMTPServerDisconnected:
            if reused:
                raise _StaleConnection from None
            raise
        if reply.code == 421 and reused:
            raise _StaleConnection
        return reply

    @staticmethod
    async def _recipients(
        smtp: SMTP, rcpts: Sequence[str], encoding: str, results: dict[str, RecipientResult]
    ) -> list[str]:
        """RCPT TO for each recipient; return those accepted, record the refused."""
        accepted: list[str] = []
        for rcpt in rcpts:
            try:
                address = envelope_address(rcpt, encoding)
            except ValueError as exc:
                results[rcpt] = RecipientResult(rcpt, "failed", None, str(exc))
                continue
            reply = await smtp.execute_command(b"RCPT", b"TO:" + address)
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                results[rcpt] = _result(rcpt, reply)
        return accepted

    async def _data(
        self, smtp: SMTP, accepted: list[str], raw: bytes, results: dict[str, RecipientResult]
    ) -> None:
        """DATA, then the raw dot-stuffed body; the final reply decides for all accepted."""
        reply = await smtp.execute_command(b"DATA")
        if reply.code != 354:
            _record_all(accepted, results, reply)
            await self._reset()
            return
        reply = await self._send_body(smtp, raw)
        _record_all(accepted, results, reply)

    async def _send_body(self, smtp: SMTP, raw: bytes) -> SMTPResponse:
        """Write the message and the final dot, and read the reply to it.

        Goes below ``SMTP.data()``, which would normalise line endings with a regex and
        dot-stuff with another one on every message; ``dot_stuff`` does the same job with
        three ``bytes.count`` and one ``bytes.replace``.
        """
        protocol = smtp.protocol
        if protocol is None:
            raise SMTPServerDisconnected("Connection lost")
        protocol.write(dot_stuff(raw))
        protocol.write(b".\r\n")
        try:
            reply = await protocol.read_response(timeout=self._timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError):
            smtp.close()
            raise
        if reply.code == 421:
            smtp.close()
        return reply

    async def _reset(self) -> None:
        """RSET after an unfinished transaction so the connection can be reused; else drop it."""
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            return
        try:
            reply = await smtp.execute_command(b"RSET")
        except (SMTPException, OSError):
            self._drop()
            return
        if reply.code != 250:
            self._drop()

    def _drop(self) -> None:
        """Forget the connection after an error: its protocol state is unknown."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def _finish(
        self, rcpts: Sequence[str], results: dict[str, RecipientResult], reason: str
    ) -> list[RecipientResult]:
        """One result per recipient in order; undecided ones are deferred with ``reason``."""
        where = f"upstream {self._host}:{self._port}: "
        text = reason if reason.startswith("upstream ") else where + reason
        deferred = [RecipientResult(rcpt, "deferred", None, text) for rcpt in rcpts]
        return [results.get(result.rcpt, result) for result in deferred]


def filter_mail_options(options: Sequence[str], extensions: dict[str, str]) -> list[str]:
    """Keep the MAIL FROM parameters whose extension the upstream advertised (pure).

    SIZE is dropped (the caller recomputes it for the bytes actually sent); BODY=8BITMIME
    needs ``8bitmime``; SMTPUTF8 needs ``smtputf8``; RET/ENVID need ``dsn``. Options holding
    control characters are dropped (they would inject commands).
    """
    kept: list[str] = []
    for option in options:
        if not option.isascii() or not option.isprintable() or " " in option:
            continue
        keyword, _, value = option.partition("=")
        keyword = keyword.upper()
        if keyword == "SIZE":
            continue
        if keyword == "BODY":
            needed = "8bitmime" if value.upper() in ("8BITMIME", "7BIT") else value.lower()
        else:
            needed = _OPTION_EXTENSION.get(keyword, keyword.lower())
        if needed in extensions:
            kept.append(keyword if not value else f"{keyword}={value}")
    return kept


def envelope_address(address: str, encoding: str) -> bytes:
    """``<address>`` as bytes for MAIL/RCPT, exactly as received (no re-parsing).

    Raises ValueError for control characters or angle brackets (command injection) and for
    a non-ASCII address when the upstream does not offer SMTPUTF8.
    """
    if any(ch in address for ch in "<>") or not address.isprintable():
        raise ValueError(f"address {address!r} cannot be sent in an SMTP command")
    try:
        return b"<" + address.encode(encoding) + b">"
    except UnicodeEncodeError:
        raise ValueError(
            f"address {address!r} is not ASCII and the upstream does not offer SMTPUTF8"
        ) from None


def dot_stuff(raw: bytes) -> bytes:
    """The DATA payload for ``raw``: lines starting with a dot get another, ends with CRLF.

    ``raw`` should have CRLF line endings only (the SMTP server guarantees it). If a bare CR
    or LF slipped through anyway, the message is normalised first, as aiosmtplib would,
    because a bare ``\\n.\\r\\n`` could end DATA early at a lax upstream (SMTP smuggling).
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        raw = normalize_message_line_endings(raw)
    stuffed = raw.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed


def _result(rcpt: str, reply: SMTPResponse) -> RecipientResult:
    """A recipient's result from a server reply."""
    return RecipientResult(rcpt, classify_reply(reply.code), reply.code, reply.message)


def _record_all(
    rcpts: Sequence[str], results: dict[str, RecipientResult], reply: SMTPResponse
) -> None:
    """The same reply decides for every recipient in ``rcpts`` (MAIL or DATA stage)."""
    for rcpt in rcpts:
        results[rcpt] = _result(rcpt, reply)
