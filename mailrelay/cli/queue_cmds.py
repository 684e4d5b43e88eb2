"""``mailrelay queue`` and ``mailrelay quarantine``: inspect and act on held mail."""

from __future__ import annotations

import argparse
import sys

from mailrelay.cli.common import (
    EX_OK,
    UserError,
    iso,
    now,
    print_json,
    print_table,
    with_store,
)
from mailrelay.config import Config
from mailrelay.store import Store
from mailrelay.store.records import MessageState, QueuedMessage

ACTIVE = [MessageState.QUEUED, MessageState.SENDING, MessageState.DEFERRED, MessageState.FAILED]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    queue = sub.add_parser("queue", help="list, show, retry or delete queued messages")
    actions = queue.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="messages not yet delivered (and failed ones)")
    listing.add_argument("--all", action="store_true", help="also sent and cancelled ones")
    listing.add_argument("--state", action="append", choices=[s.value for s in MessageState])
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="one message, its recipients and errors")
    show.add_argument("id")
    show.add_argument("--raw", action="store_true", help="print the message itself")
    show.add_argument("--json", action="store_true")
    retry = actions.add_parser("retry", help="make deferred or failed messages due now")
    group = retry.add_mutually_exclusive_group(required=True)
    group.add_argument("id", nargs="?")
    group.add_argument("--all", action="store_true")
    delete = actions.add_parser("delete", help="remove a message from the queue")
    delete.add_argument("id")
    queue.set_defaults(handler=run_queue)

    quarantine = sub.add_parser("quarantine", help="review messages held by the policy")
    qactions = quarantine.add_subparsers(dest="action", required=True)
    qlist = qactions.add_parser("list")
    qlist.add_argument("--json", action="store_true")
    qshow = qactions.add_parser("show")
    qshow.add_argument("id")
    qshow.add_argument("--raw", action="store_true")
    qshow.add_argument("--json", action="store_true")
    qactions.add_parser("release", help="deliver it after all").add_argument("id")
    qactions.add_parser("delete").add_argument("id")
    quarantine.set_defaults(handler=run_quarantine)


def message_json(message: QueuedMessage) -> dict[str, object]:
    return {
        "id": message.id, "state": message.state, "mail_from": message.mail_from,
        "message_id": message.message_id, "size": message.size, "attempts": message.attempts,
        "created": iso(message.created), "next_attempt": iso(message.next_attempt),
        "last_error": message.last_error, "auth_user": message.auth_user,
        "recipients": [{"rcpt": r.rcpt, "state": r.state, "class": r.cls,
                        "buyer_key": r.buyer_key, "last_error": r.last_error}
                       for r in message.recipients],
    }


def _print_list(messages: list[QueuedMessage], as_json: bool) -> None:
    if as_json:
        print_json([message_json(m) for m in messages])
        return
    rows = [[m.id, m.state, str(m.attempts), iso(m.created), str(m.size), m.mail_from or "<>",
             ",".join(r.rcpt for r in m.recipients), (m.last_error or "")[:60]]
            for m in messages]
    print_table(rows, ["id", "state", "tries", "created", "size", "from", "to", "last error"])
    print(f"{len(messages)} message(s)")


async def _show(store: Store, args: argparse.Namespace) -> int:
    message = await store.queue.get(args.id, with_raw=args.raw)
    if message is None:
        raise UserError(f"no message {args.id} in the queue")
    if args.raw:
        if message.raw is None:  # the store drops the body once every recipient has it
            raise UserError(f"message {args.id} is {message.state}: its content is not kept")
        sys.stdout.buffer.write(message.raw)
        return EX_OK
    if args.json:
        print_json(message_json(message))
        return EX_OK
    data = message_json(message)
    for key, value in data.items():
        if key != "recipients":
            print(f"{key:>13}: {value if value is not None else ''}")
    for r in message.recipients:
        print(f"    recipient: {r.rcpt} [{r.state}] {r.cls or ''} {r.last_error or ''}".rstrip())
    return EX_OK


async def run_queue(args: argparse.Namespace, config: Config) -> int:
    async def work(store: Store) -> int:
        if args.action == "list":
            states = None if args.all else (args.state or ACTIVE)
            _print_list(await store.queue.list(states), args.json)
        elif args.action == "show":
            return await _show(store, args)
        elif args.action == "retry":
            done = await store.queue.retry(None if args.all else [args.id], now())
            if not args.all and not done:
                raise UserError(f"no deferred or failed message {args.id}")
            print(f"{len(done)} message(s) due now")
        elif args.action == "delete":
            if not await store.queue.delete(args.id, now()):
                raise UserError(f"no message {args.id} (or it is being sent right now)")
            print(f"deleted {args.id}")
        return EX_OK

    return await with_store(config, work)


async def run_quarantine(args: argparse.Namespace, config: Config) -> int:
    async def work(store: Store) -> int:
        if args.action == "list":
            _print_list(await store.queue.list([MessageState.QUARANTINED]), args.json)
            return EX_OK
        message = await store.queue.get(args.id)
        if message is None or not any(r.state == MessageState.QUARANTINED
                                      for r in message.recipients):
            raise UserError(f"no quarantined message {args.id}")
        if args.action == "show":
            return await _show(store, args)
        if args.action == "release":
            await store.queue.release_quarantined(args.id, now())
            print(f"released {args.id}: it is queued for delivery")
        elif args.action == "delete":
            await store.queue.delete(args.id, now())
            print(f"deleted {args.id}")
        return EX_OK

    return await with_store(config, work)
