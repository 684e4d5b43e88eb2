"""Start mailrelay for a test: a temporary config, and the daemon as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from sink import free_port

ROOT = Path(__file__).resolve().parents[1]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_config(tmp_path: Path, sink_port: int | None = None, **sections: Any) -> Path:
    """A config on free loopback ports; upstream is the sink (or a maildir without one)."""
    data: dict[str, Any] = {
        "database": str(tmp_path / "mailrelay.db"),
        "log": {"format": "json", "level": "info"},
        "smtp": {"listen": [f"127.0.0.1:{free_port()}"], "hostname": "relay.test"},
        "queue": {"workers": 2, "retry_initial": "1s", "retry_max": "2s", "lifetime": "1h"},
        "shutdown_timeout": "10s",
    }
    if sink_port is not None:
        data["upstream"] = {"smtp": {"host": "127.0.0.1", "port": sink_port, "tls": "off",
                                     "timeout": "10s"}}
    else:
        data["upstream"] = {"maildir": str(tmp_path / "outbox")}
    data = deep_merge(data, sections)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def smtp_port(config_path: Path) -> int:
    data = yaml.safe_load(config_path.read_text())
    listen = data["smtp"]["listen"][0]
    return int((listen["address"] if isinstance(listen, dict) else listen).rsplit(":", 1)[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class DaemonProcess:
    """``mailrelay run -c CONFIG`` in a subprocess, its output in a log file."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT, launcher: list[str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.config_path = config_path
        self.cwd = cwd
        # What runs ``mailrelay``: the interpreter by default, or a wrapper that prepares the
        # process first (e.g. a memory protection) and then runs the same CLI.
        self.launcher = launcher or [sys.executable, "-m", "mailrelay"]
        self.preexec_fn = preexec_fn  # e.g. a resource limit set in the child
        self.port = smtp_port(config_path)
        self.log_path = config_path.parent / f"daemon-{time.monotonic_ns()}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> DaemonProcess:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*self.launcher, "run", "-c", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env,
            preexec_fn=self.preexec_fn,
        )
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            if port_open(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not listen on {self.port}:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    async def astop(self, timeout: float = 20.0) -> int:
        return await asyncio.to_thread(self.stop, timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    async def astart(self) -> DaemonProcess:
        return await asyncio.to_thread(self.start)
