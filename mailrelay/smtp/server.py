"""The aiosmtpd handler: who may relay, AUTH, and what happens when DATA ends.

Relay rules: a client may send when it has authenticated, or (unless ``smtp.auth.required``)
when it connects from ``allowed_networks``; nobody else, whatever the recipient. When DATA ends
the policy plans the delivery and the store commits it; only then does the client get its 250.
Forwarding happens later, in the delivery workers, never inside the hook.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import inspect
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from mailrelay.config import Config
from mailrelay.intake import Envelope as IntakeEnvelope
from mailrelay.intake import Intake, IntakePlan
from mailrelay.logs import get_logger
from mailrelay.smtp import replies
from mailrelay.smtp.auth import User, check_password
from mailrelay.smtp.headers import prepend_header
from mailrelay.store import Store
from mailrelay.store.queue import new_queue_id
from mailrelay.store.records import NewMessage

log = get_logger("mailrelay.smtp")


@dataclass
class SessionState:
    """What mailrelay keeps per connection beyond aiosmtpd's Session."""

    user: User | None = None
    auth_failures: int = 0


def _state(session: Session) -> SessionState:
    state = getattr(session, "mailrelay", None)
    if state is None:
        state = SessionState()
        session.mailrelay = state  # type: ignore[attr-defined]
    return state


def _peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "unknown")


@functools.lru_cache(maxsize=4096)
def peer_in_networks(peer: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                 ...]) -> bool:
    """Whether ``peer`` is inside ``networks``; cached, since it is asked on every command."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def is_encrypted(server: SMTP) -> bool:
    transport = server.transport
    return server._tls_protocol is not None or (
        transport is not None and transport.get_extra_info("ssl_object") is not None
    )


class RelayHandler:
    """aiosmtpd hooks; all policy and storage work is delegated."""

    def __init__(self, config: Config, store: Store, intake: Intake,
                 users: Callable[[], dict[str, User]],
                 on_accept: Callable[[str, IntakePlan, int], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.intake = intake
        self.users = users
        self.on_accept = on_accept
        self.hostname = config.smtp.hostname or "localhost"

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """Drop aiosmtpd's ``250-AUTH`` line when it names no mechanism (no users configured).

        aiosmtpd advertises AUTH whenever TLS allows it, even with every mechanism excluded;
        an AUTH keyword without mechanisms is invalid (RFC 4954) and invites clients to log in.
        """
        session.host_name = hostname
        return [line for line in responses if line.rstrip() != "250-AUTH"]

    # -- who may relay ---------------------------------------------------------------------

    def _from_allowed_network(self, session: Session) -> bool:
        return peer_in_networks(_peer_ip(session), tuple(self.config.smtp.allowed_networks))

    def _trusted(self, session: Session) -> bool:
        if _state(session).user is not None:
            return True
        return not self.config.smtp.auth.required and self._from_allowed_network(session)

    def _deny_reply(self) -> str:
        return str(replies.AUTH_REQUIRED if self.users() else replies.RELAY_DENIED)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if not self._trusted(session):
            log.warning("relay_denied", peer=_peer_ip(session), mail_from=address)
            return self._deny_reply()
        user = _state(session).user
        if user and self.config.smtp.auth.enforce_sender and not user.may_send_as(address):
            log.warning("sender_refused", user=user.name, mail_from=address)
            return str(replies.SENDER_NOT_OWNED)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not self._trusted(session):
            return self._deny_reply()
        if address.lower() in (r.lower() for r in envelope.rcpt_tos):
            return str(replies.RCPT_OK)  # a repeated RCPT: one copy is enough
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return str(replies.TOO_MANY_RECIPIENTS)
        if not address or "@" not in address or any(c in address for c in "\r\n\0 "):
            return str(replies.BAD_ADDRESS)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.RCPT_OK)

    # -- DATA ------------------------------------------------------------------------------

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if not isinstance(raw, bytes | bytearray):
            raw = bytes(raw)
        now = time.time()
        intake_envelope = IntakeEnvelope(
            mail_from=envelope.mail_from or "", rcpt_tos=tuple(envelope.rcpt_tos),
            raw=bytes(raw), mail_options=tuple(envelope.mail_options),
            trusted=self._trusted(session),
            auth_user=_state(session).user.name if _state(session).user else None,
            peer=_peer_ip(session),
        )
        try:
            plan = await self.intake.plan(intake_envelope, now)
            if plan.reject:
                await self.store.audit(plan.audits)
                self._log(intake_envelope, "", "rejected", plan)
                if self.on_accept:  # metrics count the policy's drops here too
                    self.on_accept("rejected", plan, len(raw))
                return plan.reject
            messages = self._messages(server, session, intake_envelope, plan, now)
            ids = await self.store.queue.enqueue(messages, plan.audits, plan.relayed, now)
        except Exception:
            log.exception("store_failed", mail_from=intake_envelope.mail_from,
                          size=len(raw))
            return str(replies.STORE_FAILURE)
        outcome = "queued" if ids else "discarded"
        self._log(intake_envelope, ",".join(ids), outcome, plan)
        if self.on_accept:
            self.on_accept(outcome, plan, len(raw))
        if not ids:
            return replies.QUEUED.with_text("Ok: accepted")
        return replies.QUEUED.with_text(f"Ok: queued as {' '.join(ids)}")

    def _messages(self, server: SMTP, session: Session, envelope: IntakeEnvelope,
                  plan: IntakePlan, now: float) -> list[NewMessage]:
        messages = []
        for index, variant in enumerate(plan.variants):
            queue_id = new_queue_id(now)
            rcpts = [r.rcpt for r in variant.recipients]
            received = self._received(server, session, queue_id, rcpts, now)
            messages.append(NewMessage(
                mail_from=envelope.mail_from, raw=prepend_header(variant.raw, received),
                recipients=variant.recipients, mail_options=envelope.mail_options,
                message_id=plan.message_id, auth_user=envelope.auth_user, peer=envelope.peer,
                queue_id=queue_id,
            ))
            plan.bind_queue_id(index, queue_id)
        return messages

    def _received(self, server: SMTP, session: Session, queue_id: str, rcpts: list[str],
                  now: float) -> str:
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if is_encrypted(server):
            protocol += "S"
        if _state(session).user is not None:
            protocol += "A"
        helo = (session.host_name or "unknown").replace("\r", "").replace("\n", "")[:200]
        clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        return (f"Received: from {helo} ([{_peer_ip(session)}])\r\n\tby {self.hostname} "
                f"(mailrelay) with {protocol} id {queue_id}{clause};\r\n\t"
                f"{formatdate(now, usegmt=True)}")

    def _log(self, envelope: IntakeEnvelope, ids: str, outcome: str, plan: IntakePlan) -> None:
        log.info("message", queue_id=ids, mail_from=envelope.mail_from,
                 rcpts=list(envelope.rcpt_tos), size=len(envelope.raw), outcome=outcome,
                 decisions={d.recipient: str(d.action) for d in plan.decisions} or None)

# aiosmtpd inspects the EHLO hook's signature for every connection; a precomputed one makes
# that about 3x cheaper (inspect.signature looks for __signature__ first).
RelayHandler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    RelayHandler.handle_EHLO)


class AuthRelayHandler(RelayHandler):
    """The handler with AUTH PLAIN and LOGIN, used when a users file is configured.

    A separate class because aiosmtpd advertises AUTH whenever the handler has ``auth_*``
    methods: without users, AUTH must not be offered at all.
    """

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await _challenge(server, "")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            blob = _b64(args[1])
        if not isinstance(blob, bytes) or blob.count(b"\0") != 2:
            await server.push("501 5.5.2 Can't decode AUTH PLAIN data")
            return AuthResult(success=False, handled=True)
        _, login, password = blob.split(b"\0")
        return await self._check(server, login, password)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        login: Any = _b64(args[1]) if len(args) > 1 else await _challenge(
            server, server.AuthLoginUsernameChallenge)
        if login is MISSING:
            return AuthResult(success=False)
        password = await _challenge(server, server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        if not isinstance(login, bytes) or not isinstance(password, bytes):
            await server.push("501 5.5.2 Can't decode AUTH LOGIN data")
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        session = server.session
        state = _state(session)
        name = login.decode("utf-8", "replace")
        user = await check_password(self.users(), name, password.decode("utf-8", "replace"))
        if user is not None:
            state.user = user
            log.info("auth_ok", user=name, peer=_peer_ip(session))
            return AuthResult(success=True, auth_data=LoginPassword(login, b""))
        state.auth_failures += 1
        log.warning("auth_failed", user=name, peer=_peer_ip(session),
                    failures=state.auth_failures)
        await asyncio.sleep(min(2.0, 0.25 * state.auth_failures))  # slow down guessing
        if state.auth_failures >= self.config.smtp.auth.max_failures:
            await server.push(str(replies.AUTH_TOO_MANY))
            if server.transport is not None:
                server.transport.close()
            return AuthResult(success=False, handled=True)
        # handled=False: aiosmtpd's AuthResult defaults to handled=True, which sends no reply
        # at all and leaves the client waiting for one.
        return AuthResult(success=False, handled=False, message=str(replies.AUTH_FAILED))



async def _challenge(server: SMTP, prompt: str) -> Any:
    """The client's answer to an AUTH challenge: bytes, MISSING (aborted), or None (unusable).

    aiosmtpd reads the answer with ``readline()``, which raises ValueError for a line over the
    reader's limit; that is the client's error (answered 501 by the caller), not an unexpected
    one (451 and a logged traceback).
    """
    try:
        return await server.challenge_auth(prompt)
    except ValueError:
        return None


def _b64(text: str) -> bytes | None:
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
