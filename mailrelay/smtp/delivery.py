"""Queue workers: take due messages from the store and hand them to the upstream.

Each worker owns one upstream connection and reuses it across messages. A message is claimed
(state ``sending``) before it is sent and its outcome recorded after, so a crash in between sends
it again on the next start: delivery is at-least-once, never at-most-once. An upstream that
refuses our credentials pauses all workers instead of burning every message's retries.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from mailrelay.config import Config
from mailrelay.logs import get_logger
from mailrelay.smtp.dsn import build_dsn
from mailrelay.smtp.headers import split_headers
from mailrelay.smtp.maildir import deliver_to_maildir
from mailrelay.smtp.retry import next_attempt_delay, should_expire
from mailrelay.smtp.upstream import RecipientResult, SmtpUpstream, UpstreamAuthError
from mailrelay.store import Store
from mailrelay.store.records import (
    PENDING_STATES,
    Attempt,
    MessageState,
    NewMessage,
    NewRecipient,
    QueuedMessage,
)

log = get_logger("mailrelay.delivery")
IDLE_POLL = 1.0  # seconds between looks at the queue when nothing woke a worker
# Messages a worker claims in one transaction: under a backlog this divides the claim cost
# (a write transaction) by up to this much; with no backlog there is one message to claim.
CLAIM_BATCH = 4
AUTH_PAUSE = 300.0


class Deliverer(Protocol):
    async def send(self, mail_from: str, rcpts: Sequence[str], raw: bytes,
                   mail_options: Sequence[str] = ()) -> list[RecipientResult]: ...

    async def close(self) -> None: ...


class MaildirDeliverer:
    """``upstream.maildir``: every recipient's copy is one file, written durably."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, mail_from: str, rcpts: Sequence[str], raw: bytes,
                   mail_options: Sequence[str] = ()) -> list[RecipientResult]:
        try:
            await asyncio.to_thread(deliver_to_maildir, self.path, raw, time.time())
        except OSError as exc:
            return [RecipientResult(r, "deferred", None, f"maildir: {exc}") for r in rcpts]
        return [RecipientResult(r, "sent", 250, "delivered to maildir") for r in rcpts]

    async def close(self) -> None:
        return None


def make_deliverer_factory(config: Config, hostname: str) -> Callable[[], Deliverer]:
    upstream = config.upstream
    if upstream.smtp is None:
        path = upstream.maildir or Path("outbox")
        return lambda: MaildirDeliverer(path)
    smtp = upstream.smtp

    def factory() -> Deliverer:
        return SmtpUpstream(
            host=smtp.host, port=smtp.port, tls=smtp.tls, username=smtp.username,
            password=smtp.password.get_secret_value() if smtp.password else None,
            timeout=smtp.timeout, local_hostname=hostname,
        )

    return factory


ResultHook = Callable[[QueuedMessage, list[RecipientResult], str, float], None]


class DeliveryWorkers:
    def __init__(self, store: Store, config: Config, factory: Callable[[], Deliverer],
                 hostname: str, on_result: ResultHook | None = None) -> None:
        self.store = store
        self.config = config
        self.factory = factory
        self.hostname = hostname
        self.on_result = on_result
        self.paused_until = 0.0
        self._stopping = asyncio.Event()
        self._claim_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(n), name=f"delivery-{n}")
                       for n in range(self.config.queue.workers)]

    async def stop(self, deadline: float) -> None:
        """Let messages in flight finish within ``deadline`` seconds, then cancel."""
        self._stopping.set()
        self.store.queue.wakeup.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self, number: int) -> None:
        deliverer = self.factory()
        try:
            while not self._stopping.is_set():
                now = time.time()
                if now < self.paused_until:
                    await self._sleep(self.paused_until - now)
                    continue
                claimed = await self._next_batch()
                if claimed:
                    await self._deliver_claimed(deliverer, claimed)
        finally:
            await asyncio.shield(deliverer.close())

    async def _next_batch(self) -> list[QueuedMessage]:
        """Wait for due messages and claim them; [] when stopping or paused.

        One idle worker at a time watches the queue (the others queue up on the lock), so a
        new message wakes one worker instead of all of them each running an empty claim
        transaction; a worker that got a full batch hands the watch on at once.
        """
        wakeup = self.store.queue.wakeup
        async with self._claim_lock:
            while not self._stopping.is_set() and time.time() >= self.paused_until:
                now = time.time()
                wakeup.clear()
                try:
                    claimed = await self.store.queue.claim_due(now, CLAIM_BATCH)
                except Exception:
                    log.exception("queue_claim_failed")
                    await self._sleep(IDLE_POLL)
                    continue
                if claimed:
                    return claimed
                await self._wait(wakeup, await self._idle_timeout(now))
        return []

    async def _deliver_claimed(self, deliverer: Deliverer, claimed: list[QueuedMessage]) -> None:
        """Deliver claimed messages in turn; put back unchanged those not started.

        A stop or an upstream AUTH pause ends the batch early; so does cancellation (the
        message in hand is released by ``_deliver``, the rest here).
        """
        pending = list(claimed)
        try:
            while pending and not self._stopping.is_set() and time.time() >= self.paused_until:
                message = pending.pop(0)
                try:
                    await self._deliver(deliverer, message)
                except Exception:  # a store error (disk full, ...) must not end this worker
                    log.exception("delivery_failed", queue_id=message.id)
                    await self._sleep(IDLE_POLL)
        finally:
            for message in pending:
                try:
                    await asyncio.shield(self.store.queue.release_claim(message.id))
                except Exception:  # left "sending": requeue_stale puts it back at next start
                    log.exception("release_claim_failed", queue_id=message.id)

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            pass

    async def _idle_timeout(self, now: float) -> float:
        """Sleep until the next retry is due, but look again at least every IDLE_POLL seconds.

        Without this, a retry was up to IDLE_POLL late; the poll remains because ``mailrelay
        queue retry`` changes the queue from another process, which cannot set ``wakeup``.
        """
        try:
            due = await self.store.queue.next_due()
        except Exception:
            return IDLE_POLL
        if due is None:
            return IDLE_POLL
        return min(IDLE_POLL, max(due - now, 0.01))

    async def _wait(self, wakeup: asyncio.Event, seconds: float = IDLE_POLL) -> None:
        try:
            async with asyncio.timeout(seconds):
                await wakeup.wait()
        except TimeoutError:
            pass

    async def _deliver(self, deliverer: Deliverer, message: QueuedMessage) -> None:
        rcpts = [r.rcpt for r in message.recipients if r.state in PENDING_STATES]
        if not rcpts or message.raw is None:
            await self._record_attempt(message.id, [], time.time(), time.time())
            return
        started = time.time()
        try:
            results = await deliverer.send(message.mail_from, rcpts, message.raw,
                                           message.mail_options)
        except UpstreamAuthError as exc:
            self.paused_until = time.time() + AUTH_PAUSE
            log.error("upstream_auth_failed", error=str(exc), paused_seconds=AUTH_PAUSE,
                      hint="check upstream.smtp.username and its password; delivery is paused")
            await asyncio.shield(self.store.queue.release_claim(message.id))
            return
        except asyncio.CancelledError:
            await asyncio.shield(self.store.queue.release_claim(message.id))
            raise
        except Exception as exc:  # a bug: keep the message, retry later
            log.exception("delivery_crashed", queue_id=message.id)
            results = [RecipientResult(r, "deferred", None, f"internal error: {exc}")
                       for r in rcpts]
        await self._record(message, results, started)

    async def _record(self, message: QueuedMessage, results: list[RecipientResult],
                      started: float) -> None:
        now = time.time()
        queue = self.config.queue
        retry_at: float | None = None
        if any(r.outcome == "deferred" for r in results) and not should_expire(
            message.created, now, queue.lifetime
        ):
            delay = next_attempt_delay(message.attempts + 1, queue.retry_initial,
                                       queue.retry_max, random.random())
            retry_at = now + delay
        attempts = [Attempt(r.rcpt, r.outcome, "" if r.outcome == "sent" else
                            f"{r.code or ''} {r.message}".strip()) for r in results]
        state = await self._record_attempt(message.id, attempts, now, retry_at)
        log.info("delivery", queue_id=message.id, mail_from=message.mail_from,
                 rcpts=[r.rcpt for r in results], size=message.size, outcome=state,
                 attempt=message.attempts + 1, retry_at=retry_at,
                 errors=[a.error for a in attempts if a.error] or None)
        if self.on_result:
            self.on_result(message, results, state, now - message.created)
        failed = [r for r in results if r.outcome == "failed" or
                  (r.outcome == "deferred" and retry_at is None)]
        if failed and queue.bounce_to_sender:
            await self._bounce(message, failed, now)

    async def _record_attempt(self, queue_id: str, attempts: list[Attempt], now: float,
                              retry_at: float | None) -> str:
        """Store an attempt's outcome, retrying while the database refuses (disk full, locked).

        The upstream has answered already: giving up would leave the message ``sending`` until
        the next start, and recording "sent" late beats sending it again. A stop ends the wait;
        ``requeue_stale`` then puts the message back at the next start (at-least-once).
        """
        while True:
            try:
                return await asyncio.shield(
                    self.store.queue.record_attempt(queue_id, attempts, now, retry_at))
            except Exception:
                if self._stopping.is_set():
                    raise
                log.exception("record_attempt_failed", queue_id=queue_id)
                await self._sleep(IDLE_POLL)

    async def _bounce(self, message: QueuedMessage, failed: list[RecipientResult],
                      now: float) -> None:
        if message.mail_from in ("", "<>") or message.raw is None:
            return  # never bounce a bounce
        headers, _ = split_headers(message.raw)
        try:
            dsn = build_dsn(self.hostname, message.mail_from, message.id,
                            [(r.rcpt, r.code, r.message) for r in failed], headers, now)
        except ValueError as exc:
            log.warning("dsn_not_built", queue_id=message.id, error=str(exc))
            return
        ids = await self.store.queue.enqueue(
            [NewMessage("<>", dsn, (NewRecipient(message.mail_from),))], now=now)
        log.info("dsn_queued", queue_id=message.id, dsn_id=ids[0], to=message.mail_from)


__all__ = ["DeliveryWorkers", "MaildirDeliverer", "MessageState", "make_deliverer_factory"]
