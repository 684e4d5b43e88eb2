"""The IMAP poller: one supervisor per account and mailbox that learns opt-outs from the inbox.

``ImapPoller.run_forever`` connects, logs in, selects, catches up from the last stored UID, then
waits in IDLE (or sleeps ``poll_interval`` when the server lacks IDLE or ``idle: false``) and
catches up again, for ever. Whatever goes wrong (refused login, lost connection, hung IDLE, BYE,
a store error) is logged and retried with jittered exponential backoff (:mod:`.backoff`); the
supervisor raises nothing but ``CancelledError``, so a broken mailbox never stops the SMTP side.

Handled once: the last UID is stored per (account, mailbox, UIDVALIDITY) after every batch, and
every handled message is remembered by Message-ID, so a UIDVALIDITY change (a restored or
rebuilt mailbox) rescans from UID 0 without blocking, moving or recording anything twice. A batch
interrupted by a lost connection is redone; its store effects are idempotent (:mod:`.actions`).
Messages are fetched with BODY.PEEK[], so the seller still sees them as unread.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from mailrelay.config import ImapAccount
from mailrelay.imap.actions import ActionResult, apply_finding, message_key
from mailrelay.imap.backoff import DEFAULT_BACKOFF, Backoff
from mailrelay.imap.client import (
    FetchedMessage,
    ImapAuthError,
    ImapConnectionError,
    ImapError,
    ImapSession,
    SelectResult,
    chunks,
)
from mailrelay.imap.detect import BuyerMessage, Finding, OptOutNotice, Other, detect
from mailrelay.logs import get_logger
from mailrelay.store import Store

log = get_logger("mailrelay.imap")

State = Literal["stopped", "connecting", "catching-up", "idle", "polling", "backoff",
                "auth-failed"]

#: Messages fetched per UID FETCH: small, because a seller's inbox holds 25 MB attachments too.
BATCH = 25
#: RFC 2177: re-issue IDLE at least every 29 minutes; servers log out idle clients after 30.
IDLE_MAX = 25 * 60.0
IDLE_MIN = 1.0
#: Extra seconds the supervisor allows an IDLE beyond its own limits before giving up on it.
IDLE_GUARD = 5.0
#: Connect + greeting + LOGIN + CAPABILITY + SELECT are each bounded by ``timeout``.
CONNECT_CALLS = 5
#: Consecutive connection failures logged as warnings before they become errors.
QUIET_FAILURES = 5
ERROR_REASONS = ("unparseable", "detector-failed")


def idle_renewal(poll_interval: float) -> float:
    """Seconds one IDLE may last before DONE, a catch-up pass and a new IDLE.

    Five poll intervals (5 min with the default 60 s), at most 25 min. The renewal doubles as
    the liveness check: aioimaplib has no TCP keepalive, so a silently dropped connection (a NAT
    timeout, a server that vanished) is only noticed when the client sends something; a short
    renewal bounds how long a dead IDLE can hide new mail.
    """
    return min(max(poll_interval * 5, IDLE_MIN), IDLE_MAX)


@dataclass(frozen=True, slots=True)
class PassSummary:
    """What one catch-up pass over one mailbox did (``failure`` set: the pass could not run)."""

    account: str
    mailbox: str
    seen: int = 0  # messages fetched and looked at
    skipped: int = 0  # already handled under the same Message-ID (e.g. after UIDVALIDITY)
    notices: int = 0  # opt-out notices applied
    blocked: int = 0  # buyers newly blocked (by a notice or a buyer message resolving one)
    unresolved: int = 0  # orders noticed in this pass whose buyer is still unknown at its end
    buyer_messages: int = 0  # buyer messages newly recorded
    cancelled: int = 0  # queued non-critical recipients cancelled by the blocks
    errors: int = 0  # unreadable messages and failed after_notice actions
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


_COUNTERS = tuple(f.name for f in fields(PassSummary) if f.type == "int")


def total(summaries: Sequence[PassSummary]) -> PassSummary:
    """Sum of the counters of ``summaries`` (failures are not summed)."""
    sums = {name: sum(getattr(s, name) for s in summaries) for name in _COUNTERS}
    return PassSummary("*", "*", **sums)


class _Counts:
    """Mutable tally of one pass, frozen into a PassSummary at its end."""

    def __init__(self) -> None:
        self.values = dict.fromkeys(_COUNTERS, 0)
        self.orders: set[str] = set()  # noticed orders that had no known buyer

    def add(self, finding: Finding, result: ActionResult) -> None:
        self.values["notices"] += isinstance(finding, OptOutNotice)
        self.values["blocked"] += len(result.blocked)
        self.orders.update(result.unresolved)
        self.values["buyer_messages"] += result.recorded
        self.values["cancelled"] += result.cancelled
        self.values["errors"] += _unreadable(finding)

    def summary(self, account: str, mailbox: str) -> PassSummary:
        return PassSummary(account, mailbox, **self.values)


def _unreadable(finding: Finding) -> bool:
    return isinstance(finding, Other) and finding.reason.startswith(ERROR_REASONS)


def _detect_all(raws: list[bytes]) -> list[Finding]:
    return [detect(raw) for raw in raws]


def one_line(exc: BaseException) -> str:
    """An exception as one log/terminal line (server texts may carry CR/LF)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, ImapError) else f"{type(exc).__name__}: {text}"


class ImapPoller:
    """Keeps one mailbox of one account handled; ``state`` and ``last_pass`` are for status.

    ``state``: "connecting" (connect, login, select), "catching-up" (a pass), "idle" (in IDLE),
    "polling" (sleeping between passes without IDLE), "backoff" (waiting after a failure),
    "auth-failed" (waiting after a refused login: the operator must act), "stopped".
    ``last_error`` holds the last failure as one line until a pass succeeds again.
    """

    def __init__(
        self,
        store: Store,
        account: ImapAccount,
        mailbox: str,
        *,
        on_pass: Callable[[PassSummary], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.account = account
        self.mailbox = mailbox
        self.on_pass = on_pass
        self.ssl_context = ssl_context
        self.backoff = backoff
        self.clock = clock
        self.state: State = "stopped"
        self.last_pass: float | None = None
        self.last_error: str | None = None
        self.failures = 0  # consecutive failed attempts; reset by a completed pass
        self._ctx = {"account": account.name, "mailbox": mailbox}

    # ----- entry points -----------------------------------------------------------------------

    async def run_once(self) -> PassSummary:
        """Connect, run one catch-up pass, log out. Raises ImapError/OSError/... on failure."""
        session, selected = await self._open()
        try:
            return await self._pass(session, selected)
        finally:
            await session.logout()
            self.state = "stopped"

    async def run_forever(self) -> None:
        """The supervisor: serve the mailbox until cancelled; never raises anything else."""
        try:
            while True:
                try:
                    await self._serve()
                except Exception as exc:  # anything at all: log, back off, retry
                    await self._back_off(exc)
        finally:
            self.state = "stopped"

    # ----- the connection's life --------------------------------------------------------------

    async def _open(self) -> tuple[ImapSession, SelectResult]:
        """A logged-in session with the mailbox selected (bounded as a whole, too)."""
        self.state = "connecting"
        account = self.account
        password = account.password.get_secret_value() if account.password else ""
        session = ImapSession()
        try:
            async with asyncio.timeout(CONNECT_CALLS * account.timeout + IDLE_GUARD):
                await session.connect(account.host, account.port, account.tls, account.username,
                                      password, account.timeout, self.ssl_context)
                selected = await session.select(self.mailbox)
        except BaseException:
            await session.logout()
            raise
        return session, selected

    async def _serve(self) -> None:
        """One connection: catch up, then IDLE (or sleep) and catch up again until it fails."""
        session, selected = await self._open()
        try:
            use_idle = self.account.idle and session.supports_idle
            log.info("imap_connected", **self._ctx, uidvalidity=selected.uidvalidity,
                     messages=selected.exists, mode="idle" if use_idle else "poll",
                     after_failures=self.failures or None)
            if self.account.idle and not use_idle:
                log.info("imap_idle_unsupported", **self._ctx,
                         poll_interval=self.account.poll_interval)
            await self._pass(session, selected)
            renew = idle_renewal(self.account.poll_interval)
            while True:
                if use_idle:
                    self.state = "idle"
                    async with asyncio.timeout(renew + 2 * self.account.timeout + IDLE_GUARD):
                        await session.idle(renew)
                else:
                    self.state = "polling"
                    await asyncio.sleep(self.account.poll_interval)
                await self._pass(session, selected)
        finally:
            await session.logout()

    async def _back_off(self, exc: Exception) -> None:
        self.failures += 1
        auth = isinstance(exc, ImapAuthError)
        delay = round(self.backoff.delay(self.failures, random.random(), auth=auth), 1)
        self.last_error = one_line(exc)
        self.state = "auth-failed" if auth else "backoff"
        fields_ = {**self._ctx, "error": self.last_error, "failures": self.failures,
                   "retry_in": delay}
        if auth:
            log.error("imap_login_refused", **fields_, username=self.account.username,
                      hint="check username and password_file/password_env of this account")
        elif isinstance(exc, ImapError | OSError | TimeoutError):
            level = log.warning if self.failures < QUIET_FAILURES else log.error
            level("imap_connection_failed", **fields_, host=self.account.host,
                  port=self.account.port)
        else:
            log.error("imap_poller_failed", **fields_, exc_info=exc)
        await asyncio.sleep(delay)

    # ----- one catch-up pass ------------------------------------------------------------------

    async def _pass(self, session: ImapSession, selected: SelectResult) -> PassSummary:
        """Handle every message above the stored UID, batch by batch; store the UID after each."""
        self.state = "catching-up"
        name, counts = self.account.name, _Counts()
        last_uid = await self._start_uid(selected.uidvalidity)
        uids = await session.uids_since(last_uid)
        for batch in chunks(uids, BATCH):
            await self._handle_batch(session, await session.fetch(batch), counts)
            last_uid = batch[-1]
            await self.store.set_imap_state(name, self.mailbox, selected.uidvalidity, last_uid,
                                            self.clock())
        if not uids:  # still record the pass (status shows when the mailbox was last checked)
            await self.store.set_imap_state(name, self.mailbox, selected.uidvalidity, last_uid,
                                            self.clock())
        if counts.orders:  # a buyer message later in the pass may have resolved some
            still = await self.store.optout.unresolved_orders()
            counts.values["unresolved"] = len(counts.orders.intersection(still))
        summary = counts.summary(name, self.mailbox)
        self.last_pass, self.failures, self.last_error = self.clock(), 0, None
        self._report(summary)
        return summary

    async def _start_uid(self, uidvalidity: int) -> int:
        stored = await self.store.imap_state(self.account.name, self.mailbox)
        if stored is None:
            return 0
        if stored[0] == uidvalidity:
            return stored[1]
        log.warning("imap_uidvalidity_changed", **self._ctx, old=stored[0], new=uidvalidity,
                    action="rescanning; messages already handled are skipped by Message-ID")
        return 0

    async def _handle_batch(self, session: ImapSession, fetched: list[FetchedMessage],
                            counts: _Counts) -> None:
        """Apply each new message, then the after_notice action, then mark them handled.

        Marking comes last so that a connection lost mid-batch redoes the whole batch (the store
        effects are idempotent) instead of leaving a notice applied but never moved.
        """
        name = self.account.name
        findings = await asyncio.to_thread(_detect_all, [m.raw for m in fetched])
        keys = [message_key(f, m.raw) for f, m in zip(findings, fetched, strict=True)]
        handled = await self.store.imap_handled(name, self.mailbox, list(dict.fromkeys(keys)))
        done: list[tuple[str, ActionResult]] = []
        notice_uids: list[int] = []
        for message, finding, key in zip(fetched, findings, keys, strict=True):
            counts.values["seen"] += 1
            if key in handled:
                counts.values["skipped"] += 1
                continue
            handled.add(key)
            result = await apply_finding(self.store, finding, key, self.clock())
            counts.add(finding, result)
            self._log_message(message.uid, finding, result)
            done.append((key, result))
            if isinstance(finding, OptOutNotice):
                notice_uids.append(message.uid)
        counts.values["errors"] += await self._after_notice(session, notice_uids)
        for key, result in done:
            await self.store.mark_imap_handled(name, self.mailbox, key, result.kind, self.clock())

    async def _after_notice(self, session: ImapSession, uids: list[int]) -> int:
        """Move, flag or delete the applied notices; returns the number that failed."""
        action = self.account.after_notice
        if not uids or action == "keep":
            return 0
        try:
            if action.startswith("move:"):
                folder = action.removeprefix("move:")
                if folder.upper() != self.mailbox.upper():
                    await session.move(uids, folder)
            elif action == "flag":
                await session.flag(uids, "\\Flagged")
            elif action == "delete":
                await session.delete(uids)
        except ImapConnectionError:
            raise
        except ImapError as exc:  # the server refused (e.g. no right to create the folder)
            log.error("imap_after_notice_failed", **self._ctx, action=action, uids=uids,
                      error=one_line(exc))
            return len(uids)
        return 0

    # ----- reporting --------------------------------------------------------------------------

    def _log_message(self, uid: int, finding: Finding, result: ActionResult) -> None:
        """One line per notice and buyer message: ids and outcomes, never subjects or bodies."""
        base: dict[str, Any] = {**self._ctx, "uid": uid, "message_id": finding.message_id}
        if isinstance(finding, OptOutNotice):
            log.info("imap_optout_notice", **base, orders=list(finding.order_ids),
                     detector=finding.detector, blocked=list(result.blocked),
                     already_blocked=list(result.already_blocked),
                     unresolved=list(result.unresolved), cancelled=result.cancelled)
        elif isinstance(finding, BuyerMessage):
            log.info("imap_buyer_message", **base, buyer_key=finding.buyer_key,
                     order_id=finding.order_id, recorded=result.recorded,
                     blocked=list(result.blocked), cancelled=result.cancelled)
        elif _unreadable(finding):
            log.warning("imap_message_unreadable", **base, reason=finding.reason)  # type: ignore[union-attr]

    def _report(self, summary: PassSummary) -> None:
        busy = summary.seen or summary.errors
        (log.info if busy else log.debug)(
            "imap_pass", **self._ctx,
            **{name: getattr(summary, name) for name in _COUNTERS},
        )
        if self.on_pass is not None:
            try:
                self.on_pass(summary)
            except Exception as exc:  # a metrics hook must not stop the poller
                log.error("imap_on_pass_failed", **self._ctx, error=one_line(exc), exc_info=exc)


async def poll_once(store: Store, accounts: Sequence[ImapAccount], only: str | None = None, *,
                    ssl_context: ssl.SSLContext | None = None) -> list[PassSummary]:
    """One pass over every mailbox of every account (or of account ``only``), concurrently.

    A mailbox that cannot be polled (refused login, unreachable server, missing mailbox) gives a
    summary with ``failure`` set instead of an exception, so the others are still reported.
    Raises ValueError when ``only`` names no configured account.
    """
    chosen = [a for a in accounts if only is None or a.name == only]
    if only is not None and not chosen:
        raise ValueError(f"no IMAP account named {only!r}")
    pollers = [ImapPoller(store, a, box, ssl_context=ssl_context)
               for a in chosen for box in a.mailboxes]
    return list(await asyncio.gather(*(_attempt(p) for p in pollers)))


async def _attempt(poller: ImapPoller) -> PassSummary:
    try:
        return await poller.run_once()
    except Exception as exc:  # reported per mailbox, the others still run
        return PassSummary(poller.account.name, poller.mailbox, failure=one_line(exc))
