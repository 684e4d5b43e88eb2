"""``mailrelay classify`` and ``mailrelay audit``: the policy's decisions, before and after.

``classify`` runs the daemon's own intake (:meth:`mailrelay.intake.Intake.plan`) on a file,
against the live store, and prints the decision per recipient without queueing or sending
anything: one code path, so the command and the daemon cannot disagree. ``audit`` prints what
the daemon decided, from the audit log. Heavy imports (the policy, mail parsing) happen inside
the handlers, so other subcommands do not pay for them at start-up.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailrelay.cli.common import EX_OK, UserError, iso, now, print_json, print_table, with_store
from mailrelay.config import Config, parse_duration
from mailrelay.store import Store

_FIELD_RE = re.compile(rb"[!-9;-~]+[ \t]*:")
_LINE_END_RE = re.compile(rb"\r\n|\r|\n")
AUDIT_COLUMNS = ["time", "queue id", "message-id", "recipient", "class", "rule", "action",
                 "mode", "reason"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    classify = sub.add_parser(
        "classify", help="print the decision the daemon would make for a message, per "
                         "recipient, sending nothing")
    classify.add_argument("file", metavar="FILE.eml", help="the message (- for standard input)")
    classify.add_argument("--to", action="append", metavar="ADDRESS", dest="to",
                          help="a recipient (repeatable; default: the message's To and Cc)")
    classify.add_argument("--json", action="store_true")
    classify.set_defaults(handler=run_classify)
    audit = sub.add_parser("audit", help="print the policy's audit log")
    audit.add_argument("--since", metavar="WHEN",
                       help="a duration back from now (30m, 2d) or an ISO time (UTC if no zone)")
    audit.add_argument("--buyer", metavar="ADDRESS", help="only this buyer's records")
    audit.add_argument("--limit", type=_positive, default=100, metavar="N",
                       help="the newest N records (default 100)")
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(handler=run_audit)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# ---- classify ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One recipient's decision as printed: the daemon's audit record, or a non-buyer's."""

    recipient: str
    buyer_key: str | None
    cls: str | None
    rule: str | None
    action: str
    would_action: str
    mode: str
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"recipient": self.recipient, "buyer_key": self.buyer_key, "class": self.cls,
                "rule": self.rule, "action": self.action, "would_action": self.would_action,
                "mode": self.mode, "reason": self.reason}


def read_message(name: str) -> bytes:
    """The file's bytes with CRLF line ends (as SMTP delivers them); UserError if unusable."""
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {name}: {exc.strerror or exc}") from None
    if not raw.strip():
        raise UserError(f"{name} is empty")
    raw = raw.lstrip(b"\r\n")
    if raw.startswith(b"From "):  # an mbox separator line, as some clients save messages
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    if not _FIELD_RE.match(raw[:1000]):
        raise UserError(f"{name} is not a mail message (it does not start with a header field)")
    return _LINE_END_RE.sub(b"\r\n", raw)


def recipients(raw: bytes, given: list[str] | None) -> list[str]:
    """``--to`` addresses, else the To and Cc addresses; deduplicated as RCPT TO would be."""
    if given:
        chosen = given
    else:
        from mailrelay.policy.message import view_message

        view = view_message(raw)
        chosen = [*view.to, *view.cc]
    seen: dict[str, str] = {}
    for address in chosen:
        address = address.strip().strip("<>")
        if "@" not in address or any(c in address for c in "\r\n\0 "):
            raise UserError(f"{address!r} is not a mail address")
        seen.setdefault(address.lower(), address)
    if not seen:
        raise UserError("the message has no To or Cc address: name recipients with --to")
    return list(seen.values())


async def plan_rows(store: Store, config: Config, raw: bytes, rcpts: list[str],
                    at: float) -> list[Row]:
    """The daemon's decision for each of ``rcpts``; reads the store, writes nothing."""
    from mailrelay.intake import Envelope, Intake
    from mailrelay.policy.message import view_message

    mail_from = view_message(raw).from_addr
    # Trusted, as the seller's own mail client is: its X-Mailrelay-Class header counts.
    envelope = Envelope(mail_from=mail_from, rcpt_tos=tuple(rcpts), raw=raw, trusted=True)
    plan = await Intake(store, config.policy).plan(envelope, at)
    audits = {a.recipient: a for a in plan.audits}
    decisions = {d.recipient: d for d in plan.decisions}
    mode = config.policy.mode
    rows = []
    for rcpt in rcpts:
        audit, decision = audits.get(rcpt), decisions.get(rcpt)
        if audit is None or decision is None:  # intake decides only for buyers
            rows.append(Row(rcpt, None, None, None, "deliver", "deliver", mode,
                            "not a marketplace buyer address"))
            continue
        rows.append(Row(rcpt, audit.buyer_key, audit.cls, audit.rule, audit.action,
                        str(decision.would_action), audit.mode or mode, audit.reason))
    return rows


def format_rows(rows: list[Row]) -> list[str]:
    """One aligned line per recipient: address, class, rule, then the action and why."""
    cells = [[r.recipient, r.cls or "-", r.rule or "-"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = []
    for row, cell in zip(rows, cells, strict=True):
        left = "  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True))
        lines.append(f"{left}  → {row.action.replace('_', ' ')} ({row.reason})")
    return lines


async def run_classify(args: argparse.Namespace, config: Config) -> int:
    # mail-parser logs a warning for every MIME type it does not decode (text/rfc822-headers
    # in a DSN, for one); the verdict does not depend on them, and the output must stay clean.
    logging.getLogger("mailparser").setLevel(logging.ERROR)
    raw = read_message(args.file)
    rcpts = recipients(raw, args.to)

    async def work(store: Store) -> int:
        rows = await plan_rows(store, config, raw, rcpts, now())
        if args.json:
            print_json([r.as_json() for r in rows])
        else:
            print("\n".join(format_rows(rows)))
        return EX_OK

    return await with_store(config, work)


# ---- audit ------------------------------------------------------------------------------


def parse_since(value: str, at: float) -> float:
    """Epoch seconds from ``30m``/``2d`` (back from ``at``) or an ISO 8601 time."""
    try:
        return at - parse_duration(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"--since {value!r}: use a duration (30m, 2d) or an ISO time "
                        "(2024-06-18T10:00:00Z)") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def audit_json(record: dict[str, Any]) -> dict[str, Any]:
    return {"time": iso(record["at"]), "at": record["at"], "queue_id": record["queue_id"],
            "message_id": record["message_id"], "recipient": record["recipient"],
            "buyer_key": record["buyer_key"], "class": record["class"], "rule": record["rule"],
            "action": record["action"], "mode": record["mode"], "reason": record["reason"]}


def audit_row(record: dict[str, Any]) -> list[str]:
    values = [iso(record["at"]), record["queue_id"], record["message_id"],
              record["recipient"] or record["buyer_key"], record["class"], record["rule"],
              record["action"], record["mode"], record["reason"]]
    return [" ".join(str(v).split()) if v is not None else "" for v in values]


async def run_audit(args: argparse.Namespace, config: Config) -> int:
    since = parse_since(args.since, now()) if args.since else None
    buyer = None
    if args.buyer:
        from mailrelay.policy.addresses import parse_buyer_address

        parsed = parse_buyer_address(args.buyer, frozenset(config.policy.buyer_domains))
        if parsed is None:
            raise UserError(f"{args.buyer!r} is not a marketplace buyer address")
        buyer = parsed.key

    async def work(store: Store) -> int:
        records = await store.audit_log(since=since, buyer_key=buyer, limit=args.limit)
        if args.json:
            print_json([audit_json(r) for r in records])
        else:
            print_table([audit_row(r) for r in records], AUDIT_COLUMNS)
            print(f"{len(records)} record(s)")
        return EX_OK

    return await with_store(config, work)
