"""``mailrelay status``: how the relay is doing, on one screen, read from the database.

It reads the same SQLite file as the daemon (WAL mode), so it works whether the daemon runs or
not; ``--json`` gives the same facts to scripts. What a running daemon knows only in memory (the
IMAP connection state) is on its metrics endpoint and in ``systemctl status``.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailrelay.cli.common import EX_OK, iso, now, print_json, with_store
from mailrelay.config import Config
from mailrelay.metrics import ago
from mailrelay.store import Store
from mailrelay.store.records import MessageState
from mailrelay.store.status import DROP_ACTIONS, MailboxPass, StatusSnapshot, read_status

#: Shown apart: nothing more will happen to these (failed ones stay with the rest: look at them).
DONE = (MessageState.SENT, MessageState.CANCELLED, MessageState.DROPPED)
DROP_WORDS = {"reject": "rejected", "discard": "discarded", "quarantine": "quarantined",
              "cancel": "cancelled"}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("status", help="queue, blocklist, last notice, IMAP passes and "
                                           "drops of the last 24 hours")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


def mailboxes(snapshot: StatusSnapshot, config: Config) -> list[tuple[MailboxPass, bool]]:
    """Pure: every mailbox polled so far or configured now, with whether it is configured."""
    configured = [(a.name, box) for a in config.imap.accounts for box in a.mailboxes]
    known = {(p.account, p.mailbox): p for p in snapshot.passes}
    rows = [(known.get(key) or MailboxPass(*key, None, 0), True) for key in configured]
    rows += [(p, False) for key, p in known.items() if key not in configured]
    return rows


def status_json(snapshot: StatusSnapshot, config: Config) -> dict[str, Any]:
    notice = snapshot.last_notice
    return {
        "database": str(config.database),
        "queue": snapshot.queue,
        "blocklist_size": snapshot.blocklist,
        "last_notice": None if notice is None else {
            "received": iso(notice.received), "order_id": notice.order_id,
            "buyer_key": notice.buyer_key, "notice_message_id": notice.notice_message_id},
        "imap": [{"account": p.account, "mailbox": p.mailbox, "last_pass": iso(p.last_pass) or None,
                  "last_uid": p.last_uid, "configured": configured}
                 for p, configured in mailboxes(snapshot, config)],
        "drops": {"since": iso(snapshot.since), **snapshot.drops},
    }


def _when(timestamp: float, at: float) -> str:
    return f"{iso(timestamp)} ({ago(at - timestamp)} ago)"


def status_text(snapshot: StatusSnapshot, config: Config, at: float) -> list[str]:
    """Pure: the lines ``mailrelay status`` prints."""
    queue = snapshot.queue
    active = ", ".join(f"{n} {s}" for s, n in queue.items() if s not in DONE)
    done = ", ".join(f"{n} {s}" for s, n in queue.items() if s in DONE)
    lines = [f"database:     {config.database}", f"queue:        {active}",
             f"              (done: {done})", f"blocklist:    {snapshot.blocklist} buyer(s)"]
    notice = snapshot.last_notice
    if notice is None:
        lines.append("last notice:  none yet")
    else:
        buyer = f"buyer {notice.buyer_key}" if notice.buyer_key else "buyer not known yet"
        lines.append(f"last notice:  {_when(notice.received, at)}, order {notice.order_id}, "
                     f"{buyer}")
    rows = mailboxes(snapshot, config)
    if not rows:
        lines.append("imap:         no accounts configured")
    for index, (box, configured) in enumerate(rows):
        last = f"last pass {_when(box.last_pass, at)}" if box.last_pass else "never polled"
        gone = "" if configured else " (no longer in the config)"
        label = "imap:" if index == 0 else ""
        lines.append(f"{label:<14}{box.account}/{box.mailbox}: {last}{gone}")
    drops = ", ".join(f"{snapshot.drops[a]} {DROP_WORDS[a]}" for a in DROP_ACTIONS)
    lines.append(f"drops (24 h): {drops}")
    return lines


async def run(args: argparse.Namespace, config: Config) -> int:
    async def work(store: Store) -> int:
        at = now()
        snapshot = await read_status(store, at)
        if args.json:
            print_json(status_json(snapshot, config))
        else:
            print("\n".join(status_text(snapshot, config, at)))
        return EX_OK

    return await with_store(config, work)
