"""Deliver a message into a local Maildir (the ``upstream: {maildir: PATH}`` trial mode).

Synchronous on purpose: it does blocking file I/O and fsyncs, so the worker runs it with
``asyncio.to_thread``. The Maildir protocol (write in ``tmp/``, then rename into ``new/``)
means a reader never sees a half-written file, and the fsyncs mean that once this returns,
the queue may delete its copy without a crash losing the message.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

_SUBDIRS = ("tmp", "new", "cur")


def deliver_to_maildir(path: Path, raw: bytes, now: float) -> Path:
    """Write ``raw`` as a new message in the Maildir at ``path``; return the file in ``new/``.

    Creates ``path`` and its ``cur/new/tmp`` if missing. The name is
    ``<time>.<pid>_<random>.<hostname>``, unique without any locking.
    """
    _ensure_maildir(path)
    name = f"{int(now)}.{os.getpid()}_{secrets.token_hex(8)}.{_safe_hostname()}"
    tmp_path = path / "tmp" / name
    new_path = path / "new" / name
    _write_synced(tmp_path, raw)
    try:
        tmp_path.rename(new_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path / "new")
    return new_path


def _ensure_maildir(path: Path) -> None:
    """Create the Maildir layout; fsync parents of new directories so the layout survives."""
    created_root = not path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    created_any = False
    for sub in _SUBDIRS:
        sub_path = path / sub
        if not sub_path.is_dir():
            sub_path.mkdir(exist_ok=True)
            created_any = True
    if created_any:
        _fsync_dir(path)
    if created_root:
        _fsync_dir(path.parent)


def _write_synced(file_path: Path, raw: bytes) -> None:
    """Write all of ``raw`` to a new file (never overwrite) and fsync it; unlink on failure."""
    fd = os.open(file_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(raw)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        file_path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _fsync_dir(dir_path: Path) -> None:
    """Make a rename or mkdir in ``dir_path`` durable (POSIX needs the directory synced)."""
    fd = os.open(dir_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe_hostname() -> str:
    r"""The host name with ``/`` and ``:`` escaped as the Maildir spec asks (``\057``, ``\072``)."""
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")
