"""The one place that wires mailrelay together and runs it.

Reads top to bottom: open the store, bind the listeners (SMTP, then metrics when configured),
start the workers and pollers, report ready, wait for a signal, report stopping, drain with a
deadline, close in reverse order. SIGHUP reloads what can change while running (``reload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

from mailrelay.config import EX_CONFIG, Config, ConfigError, load_config
from mailrelay.imap.poller import ImapPoller, PassSummary
from mailrelay.intake import Intake
from mailrelay.logs import get_logger, setup_logging
from mailrelay.metrics import (
    HEALTH_WAIT,
    HttpServer,
    Metrics,
    Response,
    SharedProbe,
    health_response,
    metrics_response,
)
from mailrelay.sdnotify import notify, watchdog_interval
from mailrelay.smtp.auth import User, UsersFileError, load_users
from mailrelay.smtp.delivery import DeliveryWorkers, make_deliverer_factory
from mailrelay.smtp.listeners import start_listeners
from mailrelay.smtp.protocol import ConnectionLimiter
from mailrelay.smtp.server import AuthRelayHandler, RelayHandler
from mailrelay.store import Store, StoreError
from mailrelay.store.status import probe_writable

log = get_logger("mailrelay.daemon")
EX_UNAVAILABLE = 69
STATUS_INTERVAL = 10.0  # seconds between STATUS= updates (and after every IMAP pass)
#: Read once at start (listeners, workers, upstream, metrics): a reload that changes one of
#: these names it in the log; the running listeners keep the old value until a restart.
RESTART_KEYS = ("database", "smtp.listen", "smtp.hostname", "smtp.tls", "smtp.max_message_size",
                "smtp.max_connections", "smtp.max_recipients", "smtp.command_limit",
                "smtp.idle_timeout", "smtp.data_timeout", "smtp.bare_newline", "upstream",
                "queue.workers", "metrics")


class Daemon:
    """Holds the running parts so that signals (stop, reload) can reach them."""

    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.started_with = config  # what the listeners, workers and metrics were built from
        self.stop_event = asyncio.Event()
        self.users: dict[str, User] = {}
        self.store: Store | None = None
        self.intake: Intake | None = None
        self.handler: RelayHandler | None = None
        self.servers: list[asyncio.Server] = []
        self.limiter = ConnectionLimiter(config.smtp.max_connections)
        self.workers: DeliveryWorkers | None = None
        self.extra_tasks: list[asyncio.Task[None]] = []
        self.pollers: dict[ImapPoller, asyncio.Task[None]] = {}
        self.metrics = Metrics()
        self.http: HttpServer | None = None
        self.health: SharedProbe | None = None
        self.status_due = asyncio.Event()
        self.reload_lock = asyncio.Lock()

    def _load_users(self, config: Config) -> dict[str, User]:
        path = config.smtp.auth.users_file
        if path is None:
            return {}
        if not path.exists() and not config.smtp.auth.required:
            return {}
        return load_users(path)

    async def run(self) -> int:
        config = self.config
        try:
            self.users = self._load_users(config)
        except UsersFileError as exc:
            log.error("config_invalid", error=str(exc))
            return EX_CONFIG
        try:
            self.store = await Store.open(config.database)
        except StoreError as exc:
            log.error("store_unavailable", error=str(exc))
            return EX_UNAVAILABLE
        try:
            return await self._serve(self.store)
        finally:
            if self.health is not None:
                await self.health.close()
            await self.store.close()

    async def _serve(self, store: Store) -> int:
        config = self.config
        requeued = await store.queue.requeue_stale()
        hostname = config.smtp.hostname or await asyncio.to_thread(socket.getfqdn)
        self.intake = Intake(store, config.policy)
        handler_class = AuthRelayHandler if config.smtp.auth.users_file else RelayHandler
        self.handler = handler_class(config, store, self.intake, lambda: self.users,
                                     on_accept=self.metrics.on_accept)
        self.handler.hostname = hostname
        if not await self._bind(config, self.handler, hostname, store):
            return EX_UNAVAILABLE
        self.workers = DeliveryWorkers(store, config, make_deliverer_factory(config, hostname),
                                       hostname, on_result=self.metrics.on_result)
        self.workers.start()
        self._start_pollers(config)
        self._install_signals()
        log.info("started", listen=[str(a) for a in config.smtp.listen],
                 database=str(config.database), requeued=requeued,
                 metrics=str(config.metrics.listen) if config.metrics.listen else None,
                 upstream=config.upstream.smtp.host if config.upstream.smtp else
                 f"maildir:{config.upstream.maildir}")
        notify("READY=1")
        status = asyncio.create_task(self._report_status(store), name="sd-status")
        self.extra_tasks += [status, asyncio.create_task(self._watchdog(), name="sd-watchdog")]
        await self.stop_event.wait()
        status.cancel()  # its next line would hide "stopping"
        notify("STOPPING=1\nSTATUS=stopping: finishing sessions and deliveries")
        await self._drain()
        log.info("stopped")
        return 0

    async def _bind(self, config: Config, handler: RelayHandler, hostname: str,
                    store: Store) -> bool:
        """The SMTP listeners, then the metrics endpoint; on any failure nothing stays bound."""
        try:
            self.servers = await start_listeners(config, handler, self.limiter, hostname,
                                                 config.smtp.auth.users_file is not None)
            listen = config.metrics.listen
            if listen is not None:
                self.http = self._metrics_server(store)
                await self.http.start(listen.host, listen.port)
                if not listen.is_loopback:
                    log.warning("metrics_not_on_loopback", listen=str(listen),
                                hint="/metrics and /healthz have no authentication")
        except OSError as exc:
            log.error("listen_failed", error=str(exc))
            for server in self.servers:
                server.close()
            return False
        return True

    def _metrics_server(self, store: Store) -> HttpServer:
        self.health = SharedProbe(lambda: probe_writable(store.db))

        async def scrape() -> Response:
            await self.metrics.refresh(store, self.pollers, time.time())
            return metrics_response(self.metrics.render())

        return HttpServer({"/metrics": scrape, "/healthz": self._healthz})

    async def _healthz(self) -> Response:
        """200 when every SMTP listener is serving and the store takes a write transaction."""
        assert self.health is not None
        serving = bool(self.servers) and all(s.is_serving() for s in self.servers)
        writable = await self.health.check()
        store = {True: "ok", False: "not writable",
                 None: f"no write lock within {HEALTH_WAIT:g}s"}[writable]
        return health_response({"listeners": "ok" if serving else "not serving",
                                "store": store})

    async def _drain(self) -> None:
        deadline = self.config.shutdown_timeout
        started = time.monotonic()
        for server in self.servers:
            server.close()
        if self.http is not None:
            self.http.close()
        self.limiter.draining = True
        await self.limiter.close_all(asyncio.get_running_loop().time() + deadline)
        if self.workers is not None:
            await self.workers.stop(max(1.0, deadline - (time.monotonic() - started)))
        await self._stop_pollers()
        for task in self.extra_tasks:
            task.cancel()
        await asyncio.gather(*self.extra_tasks, return_exceptions=True)

    def _start_pollers(self, config: Config) -> None:
        """One supervisor per account and mailbox; they never stop the SMTP side."""
        assert self.store is not None
        for account in config.imap.accounts:
            for mailbox in account.mailboxes:
                poller = ImapPoller(self.store, account, mailbox, on_pass=self._on_pass)
                self.pollers[poller] = asyncio.create_task(
                    poller.run_forever(), name=f"imap-{account.name}-{mailbox}")

    async def _stop_pollers(self) -> None:
        tasks = list(self.pollers.values())
        self.pollers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_pass(self, summary: PassSummary) -> None:
        self.metrics.on_pass(summary)
        self.status_due.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.stop_event.is_set():
            # Like kill -9, which loses nothing: every 250 was committed before it was sent.
            # os._exit, because a SystemExit can wait for ever on aiosqlite's worker threads.
            log.warning("second_signal_forcing_exit", signal=sig.name)
            sys.stdout.flush()
            os._exit(1)
        log.info("stopping", signal=sig.name)
        self.stop_event.set()

    async def reload(self) -> None:
        """SIGHUP, one at a time; systemd sees RELOADING=1 until READY=1 follows."""
        async with self.reload_lock:
            if self.stop_event.is_set():
                return
            notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                await self._reload()
            finally:
                notify("READY=1")
                self.status_due.set()

    async def _reload(self) -> None:
        """Take the new policy rules, SMTP users, log level, queue retry settings and IMAP
        accounts (pollers restart when those change); keep the old config if the new is invalid.

        There is no blocklist cache to refresh: the blocklist is read from SQLite per message.
        """
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
            users = self._load_users(new)
        except (ConfigError, UsersFileError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            log.error("reload_refused", config=str(self.config_path), problems=problems,
                      hint="the running config stays in force")
            return
        setup_logging(new.log.format, new.log.level)
        self.users = users
        if self.intake is not None:
            self.intake.reload(new.policy)
        if self.handler is not None:
            self.handler.config = new
        if self.workers is not None:
            self.workers.config = new
        imap_changed = new.imap != self.config.imap
        self.config = new
        if imap_changed:
            await self._stop_pollers()
            self._start_pollers(new)
        pending = restart_needed(self.started_with, new)
        if pending:
            log.warning("reload_needs_restart", keys=pending,
                        hint="these take full effect only after systemctl restart mailrelay")
        log.info("reloaded", rules=len(new.policy.rules), log_level=new.log.level,
                 imap_restarted=imap_changed, restart_needed=pending or None)

    async def _report_status(self, store: Store) -> None:
        """STATUS= for ``systemctl status``: now, every STATUS_INTERVAL, after each IMAP pass."""
        while True:
            self.status_due.clear()
            try:
                line = await self.metrics.refresh(store, self.pollers, time.time())
            except Exception as exc:  # a store error must not end the reports
                line = f"status unavailable: {exc}"
            notify(f"STATUS={line}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_INTERVAL):
                    await self.status_due.wait()

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def restart_needed(running: Config, new: Config) -> list[str]:
    """Pure: the keys of ``new`` that differ from what the running listeners were built from."""
    keys = [key for key in RESTART_KEYS if _get(new, key) != _get(running, key)]
    if (new.smtp.auth.users_file is None) != (running.smtp.auth.users_file is None):
        keys.append("smtp.auth.users_file")  # AUTH is offered, or not, from the start
    return keys


def _get(config: Config, dotted: str) -> object:
    node: object = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def run(config_path: Path, config: Config) -> int:
    """Entry point of ``mailrelay run``: uvloop when available, the stdlib loop otherwise."""
    setup_logging(config.log.format, config.log.level)
    daemon = Daemon(config_path, config)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(daemon.run())
    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(daemon.run())
    return 0
