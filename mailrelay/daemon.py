"""The one place that wires mailrelay together and runs it.

Reads top to bottom: open the store, bind the listeners, start the workers and pollers, report
ready, wait for a signal, report stopping, drain with a deadline, close in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from pathlib import Path

from mailrelay.config import EX_CONFIG, Config, ConfigError, load_config
from mailrelay.imap.poller import ImapPoller
from mailrelay.intake import Intake
from mailrelay.logs import get_logger, setup_logging
from mailrelay.sdnotify import notify, watchdog_interval
from mailrelay.smtp.auth import User, UsersFileError, load_users
from mailrelay.smtp.delivery import DeliveryWorkers, make_deliverer_factory
from mailrelay.smtp.listeners import start_listeners
from mailrelay.smtp.protocol import ConnectionLimiter
from mailrelay.smtp.server import AuthRelayHandler, RelayHandler
from mailrelay.store import Store, StoreError

log = get_logger("mailrelay.daemon")
EX_SOFTWARE = 70
EX_UNAVAILABLE = 69


class Daemon:
    """Holds the running parts so that signals (stop, reload) can reach them."""

    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
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
            await self.store.close()

    async def _serve(self, store: Store) -> int:
        config = self.config
        requeued = await store.queue.requeue_stale()
        hostname = config.smtp.hostname or await asyncio.to_thread(socket.getfqdn)
        self.intake = Intake(store, config.policy)
        handler_class = AuthRelayHandler if config.smtp.auth.users_file else RelayHandler
        handler = handler_class(config, store, self.intake, lambda: self.users)
        self.handler = handler
        handler.hostname = hostname
        try:
            self.servers = await start_listeners(config, handler, self.limiter, hostname,
                                                 config.smtp.auth.users_file is not None)
        except OSError as exc:
            log.error("listen_failed", error=str(exc))
            return EX_UNAVAILABLE
        self.workers = DeliveryWorkers(store, config, make_deliverer_factory(config, hostname),
                                       hostname)
        self.workers.start()
        self._start_pollers(config)
        self._install_signals()
        log.info("started", listen=[str(a) for a in config.smtp.listen],
                 database=str(config.database), requeued=requeued,
                 upstream=config.upstream.smtp.host if config.upstream.smtp else
                 f"maildir:{config.upstream.maildir}")
        notify("READY=1")
        self.extra_tasks.append(asyncio.create_task(self._watchdog()))
        await self.stop_event.wait()
        notify("STOPPING=1")
        await self._drain()
        log.info("stopped")
        return 0

    async def _drain(self) -> None:
        deadline = self.config.shutdown_timeout
        started = time.monotonic()
        for server in self.servers:
            server.close()
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
                poller = ImapPoller(self.store, account, mailbox)
                self.pollers[poller] = asyncio.create_task(
                    poller.run_forever(), name=f"imap-{account.name}-{mailbox}")

    async def _stop_pollers(self) -> None:
        tasks = list(self.pollers.values())
        self.pollers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.stop_event.is_set():
            log.warning("second_signal_forcing_exit", signal=sig.name)
            raise SystemExit(1)
        log.info("stopping", signal=sig.name)
        self.stop_event.set()

    async def reload(self) -> None:
        """SIGHUP: take the new rules, users and log level; keep the old config if invalid."""
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
            users = self._load_users(new)
        except ConfigError as exc:
            log.error("reload_refused", problems=exc.problems)
            return
        except UsersFileError as exc:
            log.error("reload_refused", problems=[str(exc)])
            return
        restart_needed = [key for key in ("database", "smtp.listen", "metrics")
                          if _get(new, key) != _get(self.config, key)]
        setup_logging(new.log.format, new.log.level)
        self.users = users
        if self.intake is not None:
            self.intake.reload(new.policy)
        if self.handler is not None:
            self.handler.config = new
        imap_changed = new.imap != self.config.imap
        self.config = new
        if imap_changed:
            await self._stop_pollers()
            self._start_pollers(new)
        log.info("reloaded", restart_needed=restart_needed or None, imap_restarted=imap_changed)

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)


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
