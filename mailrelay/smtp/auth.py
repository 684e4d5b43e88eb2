"""SMTP AUTH users: a file of argon2 hashes, checked off the event loop.

File format, one user a line: ``name:$argon2id$...[:sender1@example.com,sender2@example.com]``.
The sender list is what ``smtp.auth.enforce_sender`` allows that user to put in MAIL FROM; with
no list, the user's own name (when it is an address) is its only sender. Hashes are argon2id
(argon2-cffi), so a stolen users file does not give the passwords away.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher()
# A hash to verify against when the user does not exist, so timing does not reveal user names:
# of a random password nobody kept, with argon2-cffi's default parameters (as new users get).
# A constant, because hashing at import cost every `mailrelay` command 0.14 s and 64 MiB.
_DUMMY_HASH = ("$argon2id$v=19$m=65536,t=3,p=4$ubrEd+tRg+XOpOKsLaF6sw"
               "$HL3oBIdivg+slpSrC8qTywYJxS6MEjKwYAKvxNwpg5s")
#: Each argon2 check takes 64 MiB and tens of ms of a core; this many run at once, the rest
#: wait, so a flood of AUTH attempts cannot take the daemon's memory or both cores.
MAX_CONCURRENT_CHECKS = 2
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary())


class UsersFileError(Exception):
    """The users file cannot be read or has a bad line."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password_hash: str
    senders: tuple[str, ...]

    def may_send_as(self, address: str) -> bool:
        address = address.lower()
        allowed = self.senders or ((self.name.lower(),) if "@" in self.name else ())
        for entry in allowed:
            if entry.startswith("@") and address.endswith(entry):
                return True
            if address == entry:
                return True
        return False


def parse_users(text: str) -> dict[str, User]:
    users: dict[str, User] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("$argon2"):
            raise UsersFileError(f"line {number}: expected NAME:ARGON2-HASH[:SENDERS]")
        senders = tuple(s.strip().lower() for s in parts[2].split(",") if s.strip()) \
            if len(parts) == 3 else ()
        users[parts[0]] = User(parts[0], parts[1], senders)
    return users


def load_users(path: Path) -> dict[str, User]:
    try:
        return parse_users(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsersFileError(f"cannot read users file {path}: {exc.strerror}") from None
    except UsersFileError as exc:
        raise UsersFileError(f"{path}: {exc}") from None


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


async def check_password(users: dict[str, User], name: str, password: str) -> User | None:
    """The user when ``password`` is right; argon2 runs in a thread, never on the event loop."""
    user = users.get(name)
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)
    async with gate:
        ok = await asyncio.to_thread(_verify, user.password_hash if user else _DUMMY_HASH,
                                     password)
    return user if ok and user else None


def set_password(path: Path, name: str, password: str, senders: tuple[str, ...] | None) -> bool:
    """Add or change a user atomically; returns True when the user is new."""
    if not name or any(c in name for c in ":\n\r") or not password:
        raise UsersFileError("user names may not contain ':' and passwords may not be empty")
    users = load_users(path) if path.exists() else {}
    old = users.get(name)
    keep = senders if senders is not None else (old.senders if old else ())
    users[name] = User(name, _HASHER.hash(password), tuple(s.lower() for s in keep))
    lines = [f"{u.name}:{u.password_hash}" + (f":{','.join(u.senders)}" if u.senders else "")
             for u in users.values()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).chmod(0o600)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return old is None
