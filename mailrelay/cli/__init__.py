"""The ``mailrelay`` command: parse the arguments, call the part that does the work, print.

Exit status: 0 ok, 1 a user error (one line on stderr), 2 usage, 78 a bad config (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from mailrelay import __version__
from mailrelay.cli import (
    blocklist,
    daemon_cmds,
    policy_cmds,
    poll_cmds,
    queue_cmds,
    status_cmds,
)
from mailrelay.cli.common import EX_OK, EX_USER, UserError, load, print_json
from mailrelay.config import effective_config

#: Subcommand modules; each has ``add_parser(sub)`` and sets ``handler(args, config)``.
COMMANDS = [daemon_cmds, blocklist, queue_cmds, policy_cmds, poll_cmds, status_cmds]


def _check_config(args: argparse.Namespace) -> int:
    config = load(args)
    import yaml

    data = effective_config(config)
    if args.json:
        print_json(data)
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    print("config ok", file=sys.stderr)
    return EX_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailrelay",
        description="SMTP relay that keeps non-critical mail away from opted-out Amazon buyers.",
    )
    parser.add_argument("--version", action="version", version=f"mailrelay {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="CONFIG", default=argparse.SUPPRESS,
                        help="config file (default: $MAILRELAY_CONFIG, "
                             "then /etc/mailrelay/config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check-config", parents=[common],
                           help="validate the config and print it, secrets masked")
    check.add_argument("--json", action="store_true")
    check.set_defaults(sync_handler=_check_config)
    for module in COMMANDS:
        module.add_parser(_WithCommon(sub, common))
    return parser


class _WithCommon:
    """Adds the shared ``-c CONFIG`` option to every parser a command module creates."""

    def __init__(self, sub: argparse._SubParsersAction, common: argparse.ArgumentParser):  # type: ignore[type-arg]
        self._sub = sub
        self._common = common

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        parser = self._sub.add_parser(name, parents=[self._common], **kwargs)  # type: ignore[arg-type]
        return _NestedCommon(parser, self._common)  # type: ignore[return-value]


class _NestedCommon:
    def __init__(self, parser: argparse.ArgumentParser, common: argparse.ArgumentParser):
        self._parser = parser
        self._common = common

    def __getattr__(self, name: str) -> object:
        return getattr(self._parser, name)

    def add_subparsers(self, **kwargs: object) -> _WithCommon:
        return _WithCommon(self._parser.add_subparsers(**kwargs), self._common)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "sync_handler"):
            return int(args.sync_handler(args))
        config = load(args)
        return int(asyncio.run(args.handler(args, config)))
    except UserError as exc:
        print(f"mailrelay: {exc}", file=sys.stderr)
        return EX_USER
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `mailrelay blocklist list | head`
        sys.stderr.close()
        return EX_OK
