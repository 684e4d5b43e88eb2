"""What every subcommand shares: loading the config, opening the store, errors, output."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from mailrelay.config import EX_CONFIG, Config, ConfigError, load_config, resolve_config_path
from mailrelay.store import Store, StoreError

EX_OK = 0
EX_USER = 1


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit status 1."""


def load(args: argparse.Namespace) -> Config:
    path = resolve_config_path(getattr(args, "config", None))
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"mailrelay: invalid config {path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


async def with_store(config: Config, work: Callable[[Store], Awaitable[int]]) -> int:
    try:
        store = await Store.open(config.database)
    except StoreError as exc:
        raise UserError(str(exc)) from None
    try:
        return await work(store)
    finally:
        await store.close()


def iso(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def print_table(rows: list[list[str]], headers: list[str]) -> None:
    if not rows:
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def now() -> float:
    return time.time()
