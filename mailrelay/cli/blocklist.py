"""``mailrelay blocklist``: see and edit who is blocked, also while the daemon runs."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from mailrelay.cli.common import EX_OK, UserError, iso, now, print_json, print_table, with_store
from mailrelay.config import Config
from mailrelay.policy.addresses import parse_buyer_address
from mailrelay.store import Store
from mailrelay.store.records import BlockEntry

ADDRESS_COLUMNS = ("address", "buyer_key", "buyer", "email", "e-mail", "recipient")
EXPORT_COLUMNS = ["buyer_key", "marketplace", "source", "reason", "first_seen", "last_seen"]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("blocklist", help="list or change the opted-out buyers")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="print the blocklist")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--csv", action="store_true")
    add = actions.add_parser("add", help="block buyer addresses")
    add.add_argument("addresses", nargs="+", metavar="ADDRESS")
    add.add_argument("--reason", default="added by operator")
    remove = actions.add_parser("remove", help="unblock buyer addresses")
    remove.add_argument("addresses", nargs="+", metavar="ADDRESS")
    imp = actions.add_parser("import", help="block every address in a file")
    imp.add_argument("file", help="one address a line, or a CSV with an address column "
                                   "(- for stdin)")
    imp.add_argument("--skip-invalid", action="store_true",
                     help="import the valid lines even when others are bad")
    imp.add_argument("--reason", default="imported")
    exp = actions.add_parser("export", help="write the blocklist as CSV (or JSON)")
    exp.add_argument("file", nargs="?", help="default: standard output")
    exp.add_argument("--json", action="store_true")
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class ParsedImport:
    keys: list[str]
    errors: list[str]


def parse_import(text: str, extra_domains: frozenset[str] = frozenset()) -> ParsedImport:
    """Pure: buyer keys and ``line N: ...`` errors from a plain list or a CSV file."""
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    keys: list[str] = []
    errors: list[str] = []
    header = [h.strip().lower() for h in next(csv.reader([first]))] if first else []
    column = next((header.index(c) for c in ADDRESS_COLUMNS if c in header), None)
    if column is None and "," in first:
        return ParsedImport([], [f"line 1: CSV header has no address column "
                                 f"(one of {', '.join(ADDRESS_COLUMNS)})"])
    rows = csv.reader(io.StringIO(text)) if column is not None else ([ln] for ln in lines)
    header_seen = False
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if column is not None and not header_seen:
            header_seen = True
            continue
        value = cells[column] if column is not None and column < len(cells) else cells[0]
        parsed = parse_buyer_address(value, extra_domains)
        if parsed is None:
            errors.append(f"line {number}: {value!r} is not a marketplace buyer address")
        else:
            keys.append(parsed.key)
    return ParsedImport(list(dict.fromkeys(keys)), errors)


def _keys(addresses: list[str], extra: frozenset[str]) -> list[str]:
    keys = []
    for address in addresses:
        parsed = parse_buyer_address(address, extra)
        if parsed is None:
            raise UserError(f"{address!r} is not a marketplace buyer address")
        keys.append(parsed.key)
    return keys


def _export_rows(entries: list[BlockEntry]) -> list[list[str]]:
    return [[e.buyer_key, e.marketplace, e.source, e.reason, iso(e.first_seen), iso(e.last_seen)]
            for e in entries]


def write_csv(entries: list[BlockEntry], stream: io.TextIOBase | object) -> None:
    writer = csv.writer(stream, lineterminator="\n")  # type: ignore[arg-type]
    writer.writerow(EXPORT_COLUMNS)
    writer.writerows(_export_rows(entries))


async def run(args: argparse.Namespace, config: Config) -> int:
    extra = frozenset(config.policy.buyer_domains)
    if args.action == "import":
        source = sys.stdin if args.file == "-" else None
        try:
            text = source.read() if source else Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {args.file}: {exc}") from None
        parsed = parse_import(text, extra)
        for error in parsed.errors:
            print(f"{args.file}: {error}", file=sys.stderr)
        if parsed.errors and not args.skip_invalid:
            raise UserError(f"{len(parsed.errors)} bad line(s) in {args.file}; nothing imported "
                            "(use --skip-invalid to import the valid ones)")
        args.keys = parsed.keys
    elif args.action in ("add", "remove"):
        args.keys = _keys(args.addresses, extra)

    async def work(store: Store) -> int:
        return await _act(args, store)

    return await with_store(config, work)


async def _act(args: argparse.Namespace, store: Store) -> int:
    if args.action in ("add", "import"):
        source = "manual" if args.action == "add" else "import"
        results = await store.optout.block_many(args.keys, source, args.reason, now())
        new = sum(r.new for r in results)
        cancelled = sum(len(r.cancelled) for r in results)
        print(f"blocked {new} new buyer(s), {len(results) - new} already blocked; "
              f"cancelled {cancelled} queued non-critical message(s)")
    elif args.action == "remove":
        removed = await store.optout.unblock(args.keys, now())
        missing = sorted(set(args.keys) - set(removed))
        print(f"removed {len(removed)} buyer(s)")
        if missing:
            raise UserError(f"not on the blocklist: {', '.join(missing)}")
    elif args.action == "list":
        entries = await store.optout.entries()
        if args.json:
            print_json([_entry_json(e) for e in entries])
        elif args.csv:
            write_csv(entries, sys.stdout)
        else:
            print_table(_export_rows(entries), EXPORT_COLUMNS)
            print(f"{len(entries)} buyer(s) blocked")
    elif args.action == "export":
        entries = await store.optout.entries()
        out = io.StringIO()
        if args.json:
            import json

            json.dump([_entry_json(e) for e in entries], out, indent=2)
            out.write("\n")
        else:
            write_csv(entries, out)
        if args.file:
            Path(args.file).write_text(out.getvalue(), encoding="utf-8")
        else:
            sys.stdout.write(out.getvalue())
    return EX_OK


def _entry_json(entry: BlockEntry) -> dict[str, str]:
    return {"buyer_key": entry.buyer_key, "marketplace": entry.marketplace,
            "source": entry.source, "reason": entry.reason, "evidence": entry.evidence,
            "first_seen": iso(entry.first_seen), "last_seen": iso(entry.last_seen)}
