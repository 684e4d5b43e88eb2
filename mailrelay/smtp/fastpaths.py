"""Faster equivalents of two aiosmtpd 1.4.6 per-command and per-connection costs.

Both are checked against stock aiosmtpd by differential tests (tests/test_smtp_protocol.py);
anything outside their fast path falls back to aiosmtpd's own code.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext, ASCII only
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_PLAIN_ANGLE_ADDR = re.compile(rf"<({_DOT_ATOM}@{_DOT_ATOM})?>")
_BLANKS = (" ", "\t")


def plain_angle_addr(arg: str) -> tuple[str, str] | None:
    """``(address, rest)`` as aiosmtpd's ``_getaddr`` finds them in ``<local@domain>`` or ``<>``.

    None for every other form (quotes, source routes, comments, blanks inside the brackets,
    non-ASCII, RFC 2047 look-alikes): those go to aiosmtpd's email-parser route, which costs
    about 50 µs per MAIL/RCPT. What the email parser does after the ``>`` is mirrored: after
    an address it eats the blanks (``str.lstrip``: any Unicode white space once a SP or HT
    starts it), after ``<>`` it eats nothing.
    """
    match = _PLAIN_ANGLE_ADDR.match(arg)
    if match is None:
        return None
    rest = arg[match.end():]
    address = match.group(1)
    if address is None:
        return "<>", rest
    if "=?" in address:  # the email parser would try an encoded word here
        return None
    if rest[:1] in _BLANKS:
        rest = rest.lstrip()
    if rest[:1] == "(":  # a comment, which the email parser would eat too
        return None
    return address, rest


_HOOK_PREFIXES = ("auth_", "handle_", "smtp_")


def _prefixed(names: Iterable[str], prefix: str) -> dict[str, str]:
    """aiosmtpd's ``{m.replace(prefix, ""): m for m in dir(obj) if m.startswith(prefix)}``."""
    return {name.replace(prefix, ""): name for name in names if name.startswith(prefix)}


def has_own_hooks(obj: object) -> bool:
    """True if obj's instance dict holds an ``auth_``/``handle_``/``smtp_`` name."""
    own = getattr(obj, "__dict__", None)
    return isinstance(own, dict) and any(
        isinstance(name, str) and name.startswith(_HOOK_PREFIXES) for name in own)


def _class_defined(obj: object, names: Iterable[str]) -> bool:
    """True if ``dir(obj)`` and these names' values depend on obj's class alone."""
    cls = type(obj)
    if cls.__dir__ is not object.__dir__ or cls.__getattribute__ is not object.__getattribute__:
        return False
    return not has_own_hooks(obj) and all(
        isinstance(inspect.getattr_static(cls, name, None), types.FunctionType) for name in names)


@dataclass(frozen=True)
class HookTables:
    """What aiosmtpd's ``SMTP.__init__`` finds by introspection, as attribute names.

    aiosmtpd 1.4.6 runs ``inspect.getmembers`` and ``dir`` on the protocol and on the handler
    for every connection (about 70 µs, a sixth of the relay's CPU at 2 KB). When every name
    found is a plain function of the two classes (no instance attributes, no custom
    ``__dir__``/``__getattribute__``), the names depend on the classes alone, so they are found
    once per (protocol class, handler class) and each connection only binds them. Adding or
    removing such a method on a class after its first connection is not seen.
    """

    auth: dict[str, tuple[str, bool]]  # mechanism -> (attribute, is built in), aiosmtpd's order
    hooks: dict[str, str]  # command -> handler attribute
    commands: dict[str, str]  # command -> protocol attribute
    ehlo_params: int | None  # parameter count of the bound handle_EHLO; None without one
    cacheable: bool

    @classmethod
    def discover(cls, smtp: SMTP, handler: Any) -> HookTables:
        """Look the names up the way aiosmtpd does."""
        auth: dict[str, tuple[str, bool]] = {}
        for obj in (smtp, handler):
            for name, member in inspect.getmembers(obj):
                if name.startswith("auth_"):
                    default = name.replace("auth_", "").replace("__", "-")
                    auth[getattr(member, "__auth_mechanism_name__", default)] = (name, obj is smtp)
        hooks = _prefixed(dir(handler), "handle_")
        commands = _prefixed(dir(smtp), "smtp_")
        ehlo = hooks.get("EHLO")
        ehlo_params = None if ehlo is None else len(
            inspect.signature(getattr(handler, ehlo)).parameters)
        cacheable = _class_defined(
            smtp, [n for n, builtin in auth.values() if builtin] + list(commands.values())
        ) and _class_defined(
            handler, [n for n, builtin in auth.values() if not builtin] + list(hooks.values()))
        return cls(auth, hooks, commands, ehlo_params, cacheable)


_TABLES: dict[tuple[type, type], HookTables] = {}


def hook_tables(smtp: SMTP, handler: Any, smtp_plain: bool) -> HookTables:
    """The tables for one connection; smtp_plain: smtp had no hook-like attribute of its own."""
    key = (type(smtp), type(handler))
    tables = _TABLES.get(key)
    if tables is None or not smtp_plain or has_own_hooks(handler):
        tables = HookTables.discover(smtp, handler)
        if tables.cacheable and smtp_plain:
            _TABLES[key] = tables
    return tables


