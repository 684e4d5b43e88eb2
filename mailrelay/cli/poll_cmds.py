"""``mailrelay poll-once``: one IMAP pass over every account, to try a config or catch up by hand.

It does what the daemon's poller does in one pass (apply opt-out notices, record buyer messages,
move the notices), prints what it did per account and mailbox plus a total, and exits 1 when a
mailbox could not be polled (refused login, unreachable server), with one line per failure.
Log lines (one per notice or buyer message) go to stderr, so stdout is the summary alone.
"""

from __future__ import annotations

import argparse
import sys

from mailrelay.cli.common import EX_OK, EX_USER, UserError, with_store
from mailrelay.config import Config
from mailrelay.imap.poller import PassSummary, poll_once, total
from mailrelay.logs import setup_logging
from mailrelay.store import Store


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("poll-once", help="one IMAP pass over every account, then exit")
    parser.add_argument("--account", metavar="NAME", help="poll only this account")
    parser.set_defaults(handler=run)


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def format_summary(summary: PassSummary) -> str:
    """Pure: one line of counters, e.g. ``shop/INBOX: 12 messages, 2 opt-out notices, ...``."""
    s = summary
    parts = [
        _plural(s.seen, "message"),
        _plural(s.notices, "opt-out notice"),
        _plural(s.blocked, "buyer") + " blocked",
        _plural(s.unresolved, "order") + " unresolved",
        _plural(s.buyer_messages, "buyer message") + " recorded",
        _plural(s.errors, "error"),
    ]
    if s.skipped:
        parts.insert(1, f"{s.skipped} already handled")
    if s.cancelled:
        parts.insert(-1, _plural(s.cancelled, "queued message") + " cancelled")
    return ", ".join(parts)


async def run(args: argparse.Namespace, config: Config) -> int:
    accounts = config.imap.accounts
    if not accounts:
        raise UserError("no IMAP accounts in the config (imap.accounts)")
    if args.account is not None and args.account not in {a.name for a in accounts}:
        raise UserError(f"no IMAP account named {args.account!r} in the config")
    setup_logging(config.log.format, config.log.level, stream=sys.stderr)

    async def work(store: Store) -> int:
        summaries = await poll_once(store, accounts, args.account)
        for summary in summaries:
            where = f"{summary.account}/{summary.mailbox}"
            if summary.ok:
                print(f"{where}: {format_summary(summary)}")
            else:
                print(f"mailrelay: cannot poll {where}: {summary.failure}", file=sys.stderr)
        print(f"total: {format_summary(total([s for s in summaries if s.ok]))}")
        return EX_OK if all(s.ok for s in summaries) else EX_USER

    return await with_store(config, work)
