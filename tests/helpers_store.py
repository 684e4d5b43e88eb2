"""Shared helpers for the store, config and CLI tests: real files, real subprocesses.

The CLI is always run as ``python -m mailrelay`` in a child process, the way an operator runs it
while the daemon is up, so argument parsing, exit codes and stderr are what a user sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from mailrelay.store.records import MessageState, NewMessage, NewRecipient

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "config.example.yaml"


def buyer(n: int, domain: str = "marketplace.amazon.com") -> str:
    """A realistic 15-character buyer alias, distinct for each ``n``."""
    return f"b{n:014d}@{domain}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_message(n: int, size: int = 300) -> bytes:
    """A deterministic message body whose bytes can be recomputed from ``n`` alone."""
    head = f"From: seller@example.com\r\nSubject: message {n}\r\n\r\n".encode()
    return head + (f"{n:08d}" * (size // 8 + 1)).encode()[:size] + b"\r\n"


def new_message(
    n: int,
    rcpts: tuple[str, ...] = ("someone@example.com",),
    *,
    cls: str | None = None,
    buyer_keys: tuple[str | None, ...] | None = None,
    states: tuple[MessageState, ...] | None = None,
) -> NewMessage:
    """A queue entry for ``rcpts``; buyer keys/states default to none/queued."""
    keys = buyer_keys if buyer_keys is not None else (None,) * len(rcpts)
    st = states if states is not None else (MessageState.QUEUED,) * len(rcpts)
    recipients = tuple(
        NewRecipient(rcpt=r, state=s, buyer_key=k, cls=cls)
        for r, k, s in zip(rcpts, keys, st, strict=True)
    )
    return NewMessage(mail_from="seller@example.com", raw=raw_message(n), recipients=recipients,
                      message_id=f"<m{n}@example.com>")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI child: the project importable, no inherited MAILRELAY_CONFIG."""
    env = {k: v for k, v in os.environ.items() if k != "MAILRELAY_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
            stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mailrelay ARGS`` and capture its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "mailrelay", *map(str, args)],
        cwd=cwd, env=env or cli_env(), input=stdin, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def run_cli_here(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``mailrelay.cli.main(ARGS)`` in this process, output captured like ``run_cli``.

    The same code path as the command minus interpreter start-up (about a second with every
    subcommand imported), so table-driven CLI tests stay fast; ``run_cli`` covers the real process.
    """
    from mailrelay.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_stdin, sys.stdin = sys.stdin, io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse usage errors and bad configs exit this way
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.stdin = saved_stdin
    return subprocess.CompletedProcess(["mailrelay", *map(str, args)], code, out.getvalue(),
                                       err.getvalue())


def write_config(directory: Path, db: Path | None = None, extra: str = "") -> Path:
    """A minimal valid config file using ``db`` as its database."""
    db = db or directory / "mailrelay.db"
    path = directory / "config.yaml"
    path.write_text(f"database: {db}\nupstream:\n  maildir: {directory / 'outbox'}\n{extra}",
                    encoding="utf-8")
    return path


def blocklist_keys(db: Path) -> list[str]:
    """The blocklist as a fresh, independent reader sees it."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return sorted(r[0] for r in conn.execute("SELECT buyer_key FROM blocklist"))


def sql(db: Path, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """One query on a fresh, independent connection (what another process would see)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(query, params).fetchall()
