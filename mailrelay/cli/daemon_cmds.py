"""``mailrelay run`` and ``mailrelay passwd``."""

from __future__ import annotations

import argparse
import getpass
import sys

from mailrelay.cli.common import EX_OK, UserError, load
from mailrelay.config import resolve_config_path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    run = sub.add_parser("run", help="run the daemon in the foreground (what systemd runs)")
    run.set_defaults(sync_handler=_run)
    passwd = sub.add_parser("passwd", help="add or change an SMTP AUTH user")
    passwd.add_argument("user")
    passwd.add_argument("--senders", help="comma-separated addresses (or @domain) this user "
                                          "may send as; default: keep, or the user name")
    passwd.add_argument("--stdin", action="store_true",
                        help="read the password from standard input (first line)")
    passwd.set_defaults(sync_handler=_passwd)


def _run(args: argparse.Namespace) -> int:
    from mailrelay.daemon import run

    config = load(args)
    return run(resolve_config_path(getattr(args, "config", None)), config)


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if first != getpass.getpass("Repeat password: "):
        raise UserError("the passwords do not match")
    return first


def _passwd(args: argparse.Namespace) -> int:
    from mailrelay.smtp.auth import UsersFileError, set_password  # argon2: only when needed

    config = load(args)
    path = config.smtp.auth.users_file
    if path is None:
        raise UserError("smtp.auth.users_file is not set in the config")
    password = _read_password(args.stdin)
    if len(password) < 8:
        raise UserError("the password must have at least 8 characters")
    senders = None
    if args.senders is not None:
        senders = tuple(s.strip() for s in args.senders.split(",") if s.strip())
    try:
        new = set_password(path, args.user, password, senders)
    except (UsersFileError, OSError) as exc:
        raise UserError(str(exc)) from None
    print(f"{'added' if new else 'changed'} user {args.user} in {path}")
    print("a running daemon picks it up on reload (systemctl reload mailrelay)", file=sys.stderr)
    return EX_OK
