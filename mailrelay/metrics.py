"""What the running daemon tells the outside: Prometheus metrics, /healthz, systemd's STATUS= line.

The metrics live in their own ``CollectorRegistry`` (the process-global one would also export
whatever a library registers there). They are served by a tiny HTTP/1.0 server in the daemon's
own event loop, not by prometheus_client's threaded server: /healthz has to ask the store, whose
connections belong to this loop, and a server thread would keep answering while the loop is stuck.
The server is bounded: a request head of at most 8 KiB read within 5 s, a few connections at once,
one request per connection, GET and HEAD only.

Counters count what this process saw since it started (Prometheus copes with resets). Gauges that
describe the database (queue depth by state, blocklist size) are read from the store at each scrape,
so they include changes made meanwhile with the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from mailrelay.imap.poller import PassSummary, State
from mailrelay.logs import get_logger
from mailrelay.store.records import FINAL_STATES, MessageState

if TYPE_CHECKING:
    from mailrelay.imap.poller import ImapPoller
    from mailrelay.intake import IntakePlan
    from mailrelay.smtp.upstream import RecipientResult
    from mailrelay.store import Store
    from mailrelay.store.records import QueuedMessage

log = get_logger("mailrelay.metrics")

DROP_REASONS = ("reject", "discard", "quarantine")
IMAP_STATES: tuple[str, ...] = get_args(State)
#: Delivery latency runs from well under a second to hours of retries.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
MAX_HEAD = 8192
REQUEST_TIMEOUT = 5.0
MAX_CLIENTS = 8
#: /healthz answers 503 when the store probe has not finished by then (it keeps running).
HEALTH_WAIT = 5.0
#: The classic text format, what generate_latest writes and every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class MailboxView:
    """One IMAP poller as the status line and the state gauge see it."""

    account: str
    mailbox: str
    state: str
    last_pass: float | None
    last_error: str | None


def mailbox_views(pollers: Iterable[ImapPoller]) -> list[MailboxView]:
    return [MailboxView(p.account.name, p.mailbox, p.state, p.last_pass, p.last_error)
            for p in pollers]


def ago(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: an age short enough for one status line."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def status_line(queue: Mapping[str, int], blocklist: int, mailboxes: Sequence[MailboxView],
                now: float) -> str:
    """Pure: the one line ``systemctl status`` shows, e.g.
    ``queue: 3 waiting (1 deferred), 0 quarantined; blocklist: 17; imap shop/INBOX: idle,
    last pass 40s ago``."""
    waiting = sum(queue.get(s, 0) for s in ("queued", "sending", "deferred"))
    parts = [f"queue: {waiting} waiting ({queue.get('deferred', 0)} deferred), "
             f"{queue.get('quarantined', 0)} quarantined", f"blocklist: {blocklist}"]
    for box in mailboxes:
        last = f"last pass {ago(now - box.last_pass)} ago" if box.last_pass else "no pass yet"
        error = f" ({box.last_error[:60]})" if box.last_error else ""
        parts.append(f"imap {box.account}/{box.mailbox}: {box.state}{error}, {last}")
    return "; ".join(parts)


class Metrics:
    """The daemon's Prometheus metrics; the ``on_*`` methods are the SMTP/queue/IMAP hooks."""

    def __init__(self) -> None:
        # No ``*_created`` twin for every counter: it doubles the series and nobody reads it.
        disable_created_metrics()
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.accepted = Counter("mailrelay_messages_accepted", "SMTP messages answered 250 "
                                "(queued, or discarded for every recipient)", registry=registry)
        self.delivered = Counter("mailrelay_messages_delivered",
                                 "Recipients delivered upstream", registry=registry)
        self.deferred = Counter("mailrelay_messages_deferred", "Delivery attempts deferred "
                                "for a recipient (retried later)", registry=registry)
        self.failed = Counter("mailrelay_messages_failed",
                              "Recipients whose delivery failed for good", registry=registry)
        self.dropped = Counter("mailrelay_messages_dropped", "Recipients the policy dropped, by "
                               "action", ["reason"], registry=registry)
        self.cancelled = Counter("mailrelay_messages_cancelled", "Queued non-critical recipients "
                                 "cancelled by an opt-out notice", registry=registry)
        self.notices = Counter("mailrelay_notices_detected", "Opt-out notices found over IMAP",
                               registry=registry)
        self.queue = Gauge("mailrelay_queue_messages", "Messages in the database by state",
                           ["state"], registry=registry)
        self.blocklist = Gauge("mailrelay_blocklist_size", "Buyers on the blocklist",
                               registry=registry)
        self.imap_state = Gauge("mailrelay_imap_connection_state", "1 for the state each IMAP "
                                "poller is in, 0 for the others",
                                ["account", "mailbox", "state"], registry=registry)
        self.imap_last_pass = Gauge("mailrelay_imap_last_pass_timestamp_seconds", "When each "
                                    "mailbox was last caught up", ["account", "mailbox"],
                                    registry=registry)
        self.latency = Histogram("mailrelay_delivery_latency_seconds", "From acceptance to "
                                 "delivery upstream", buckets=LATENCY_BUCKETS, registry=registry)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)  # exported as 0 before the first drop

    def on_accept(self, outcome: str, plan: IntakePlan, size: int) -> None:
        """RelayHandler hook: ``outcome`` is queued, discarded or rejected."""
        if outcome != "rejected":
            self.accepted.inc()
        for decision in plan.decisions:
            if str(decision.action) in DROP_REASONS:
                self.dropped.labels(str(decision.action)).inc()

    def on_result(self, message: QueuedMessage, results: list[RecipientResult], state: str,
                  latency: float) -> None:
        """DeliveryWorkers hook, once per attempt; a deferral that ends the message is a failure."""
        final = state in FINAL_STATES
        for result in results:
            if result.outcome == "sent":
                self.delivered.inc()
            elif result.outcome == "failed" or final:
                self.failed.inc()
            else:
                self.deferred.inc()
        if any(r.outcome == "sent" for r in results):
            self.latency.observe(latency)

    def on_pass(self, summary: PassSummary) -> None:
        """ImapPoller hook, after each catch-up pass."""
        self.notices.inc(summary.notices)
        self.cancelled.inc(summary.cancelled)

    async def refresh(self, store: Store, pollers: Iterable[ImapPoller], now: float) -> str:
        """Read the database-backed gauges again; returns the STATUS= line for systemd."""
        counts = await store.queue.counts()
        size = await store.optout.size()
        for state in MessageState:
            self.queue.labels(state.value).set(counts.get(state.value, 0))
        self.blocklist.set(size)
        views = mailbox_views(pollers)
        self.imap_state.clear()  # accounts removed by a reload disappear
        self.imap_last_pass.clear()
        for box in views:
            for state_name in IMAP_STATES:
                self.imap_state.labels(box.account, box.mailbox, state_name).set(
                    1 if box.state == state_name else 0)
            if box.last_pass is not None:
                self.imap_last_pass.labels(box.account, box.mailbox).set(box.last_pass)
        return status_line(counts, size, views, now)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SharedProbe:
    """Runs a slow check at most once at a time and lets callers stop waiting without cancelling.

    Concurrent /healthz requests share the probe in flight; one that gives up after ``wait``
    seconds leaves it running (see ``store.status.probe_writable`` for why it must not be cut).
    """

    def __init__(self, probe: Callable[[], Awaitable[bool]], wait: float = HEALTH_WAIT) -> None:
        self.probe = probe
        self.wait = wait
        self._task: asyncio.Task[bool] | None = None

    async def check(self) -> bool | None:
        """The probe's answer, or None when it is still running after ``wait`` seconds."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.probe(), name="health-probe")
        done, _ = await asyncio.wait({self._task}, timeout=self.wait)
        if not done:
            return None
        return bool(self._task.result())

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


def parse_request(head: bytes) -> tuple[str, str] | None:
    """Pure: ``(method, path)`` from a request head (query string dropped); None if malformed."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return None
    return parts[0], parts[1].split("?", 1)[0]


def encode_response(response: Response, head_only: bool = False) -> bytes:
    """Pure: an HTTP/1.1 response that closes the connection."""
    status = response.status
    head = (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: {response.content_type}"
            f"\r\nContent-Length: {len(response.body)}\r\nConnection: close\r\n"
            "Cache-Control: no-store\r\n\r\n")
    return head.encode("latin-1") + (b"" if head_only else response.body)


Route = Callable[[], Awaitable[Response]]


class HttpServer:
    """GET /metrics and /healthz; everything else 404 (or 405 for other methods)."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None
        self._clients = 0

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, host, port, limit=MAX_HEAD,
                                                 reuse_address=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients <= MAX_CLIENTS:
                async with asyncio.timeout(REQUEST_TIMEOUT * 3):
                    await self._serve(reader, writer)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._clients -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request: tuple[str, str] | None = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return  # the client went away before finishing its request
        except (asyncio.LimitOverrunError, ValueError):
            response = Response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"too large\n")
        else:
            request = parse_request(head)
            response = await self._respond(request)
        writer.write(encode_response(response, request is not None and request[0] == "HEAD"))
        await writer.drain()

    async def _respond(self, request: tuple[str, str] | None) -> Response:
        if request is None:
            return Response(HTTPStatus.BAD_REQUEST, b"bad request\n")
        method, path = request
        route = self.routes.get(path)
        if route is None:
            return Response(HTTPStatus.NOT_FOUND, b"not found: try /metrics or /healthz\n")
        if method not in ("GET", "HEAD"):
            return Response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n")
        try:
            return await route()
        except Exception as exc:
            log.exception("metrics_request_failed", path=path)
            return Response(HTTPStatus.INTERNAL_SERVER_ERROR, f"error: {exc}\n".encode())


def metrics_response(body: bytes) -> Response:
    return Response(HTTPStatus.OK, body, CONTENT_TYPE)


def health_response(checks: Mapping[str, str]) -> Response:
    """Pure: 200 when every check says ``ok``, else 503; one ``name: verdict`` line each."""
    healthy = all(v == "ok" for v in checks.values())
    body = "".join(f"{k}: {v}\n" for k, v in checks.items()).encode()
    return Response(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE, body)
