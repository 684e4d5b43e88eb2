"""`mailrelay queue list|show|retry|delete` as an operator runs them: subprocesses against the
database of a running daemon, which keeps relaying to a real sink meanwhile."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from daemon_helpers import ROOT, DaemonProcess, write_config
from relay_helpers import (
    asubmit,
    cli,
    message,
    queue_id,
    queue_json,
    start,
    wait_until,
    without_received,
)
from sink import Sink


def rows(listing: str) -> dict[str, str]:
    """queue id -> its row in `queue list` output."""
    return {line.split()[0]: line for line in listing.splitlines()[1:-1]}


async def by_id(config: Path) -> dict[str, dict]:
    return {m["id"]: m for m in await queue_json(config)}


async def test_queue_commands_while_the_daemon_runs(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """list/show/retry/delete against a running daemon's queue, as an operator uses them."""
    sink.handler.rcpt_replies = {"perm@example.test": "550 5.1.1 Unknown user",
                                 "temp@example.test": "451 4.2.0 Mailbox busy"}
    config = write_config(tmp_path, sink.port, queue={"retry_initial": "1h", "retry_max": "1h"})
    daemon = await start(daemons, config)
    raw = message("held")
    perm = queue_id((await asubmit(daemon.port, raw, ["perm@example.test"]))[1])
    temp = queue_id((await asubmit(daemon.port, raw, ["temp@example.test"]))[1])
    sent = queue_id((await asubmit(daemon.port, raw, ["ok@example.test"]))[1])
    await wait_until(lambda: _states(config, perm, temp, sent))

    listing = await cli(config, "queue", "list")
    assert listing.returncode == 0, listing.stderr
    listed = rows(listing.stdout)
    assert listing.stdout.splitlines()[0].split()[:3] == ["id", "state", "tries"]
    assert set(listed) == {perm, temp}  # without --all: not the sent one
    assert listed[perm].split()[1:3] == ["failed", "1"]
    assert "550 5.1.1 Unknown user" in listed[perm]
    assert listed[temp].split()[1:3] == ["deferred", "1"]
    assert "451 4.2.0 Mailbox busy" in listed[temp]
    assert listing.stdout.splitlines()[-1] == "2 message(s)"
    only = await cli(config, "queue", "list", "--state", "deferred", "--json")
    assert [m["id"] for m in json.loads(only.stdout)] == [temp]
    assert set(rows((await cli(config, "queue", "list", "--all")).stdout)) == {perm, temp, sent}

    shown = await cli(config, "queue", "show", temp)
    assert shown.returncode == 0, shown.stderr
    assert "state: deferred" in shown.stdout and "attempts: 1" in shown.stdout
    assert "recipient: temp@example.test [deferred]  451 4.2.0 Mailbox busy" in shown.stdout
    detail = json.loads((await cli(config, "queue", "show", perm, "--json")).stdout)
    assert detail["recipients"][0] == {"rcpt": "perm@example.test", "state": "failed",
                                       "class": None, "buyer_key": None,
                                       "last_error": "550 5.1.1 Unknown user"}
    stored = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "mailrelay", "queue", "show", temp, "--raw", "-c", str(config)],
        capture_output=True, timeout=60, cwd=ROOT)
    assert without_received(stored.stdout)[1] == raw

    sink.handler.rcpt_replies["perm@example.test"] = "250 OK"  # the operator fixed it
    retried = await cli(config, "queue", "retry", perm)
    assert retried.returncode == 0 and retried.stdout.strip() == "1 message(s) due now"
    await wait_until(lambda: any(m.rcpts == ["perm@example.test"] for m in sink.messages))
    assert (await by_id(config))[perm]["state"] == "sent"

    deleted = await cli(config, "queue", "delete", temp)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted {temp}"
    assert temp not in await by_id(config)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert await daemon.astop() == 0


async def _states(config: Path, perm: str, temp: str, sent: str) -> bool:
    """True once the first delivery attempt of all three messages is recorded."""
    found = await by_id(config)
    return [found.get(q, {}).get("state") for q in (perm, temp, sent)] == [
        "failed", "deferred", "sent"]


CLI_ERRORS = [
    # (arguments, expected stderr); every one exits 1
    (["queue", "show", "0000000000000NOPE"], "no message 0000000000000NOPE in the queue"),
    (["queue", "delete", "0000000000000NOPE"],
     "no message 0000000000000NOPE (or it is being sent right now)"),
    (["queue", "retry", "0000000000000NOPE"], "no deferred or failed message 0000000000000NOPE"),
]


async def test_queue_command_errors_are_one_line_and_exit_1(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """Unknown ids, retrying delivered mail and --raw of delivered mail: one clear line, exit 1."""
    config = write_config(tmp_path, sink.port)
    daemon = await start(daemons, config)
    sent = queue_id((await asubmit(daemon.port, message(), ["ok@example.test"]))[1])
    await sink.wait_for(1)
    await wait_until(lambda: _sent(config, sent))
    cases = [*CLI_ERRORS,
             (["queue", "retry", sent], f"no deferred or failed message {sent}"),
             (["queue", "show", sent, "--raw"], f"message {sent} is sent: its content is not "
                                                "kept")]
    for args, expected in cases:
        result = await cli(config, *args)
        assert result.returncode == 1, (args, result.stdout)
        assert result.stderr.strip() == f"mailrelay: {expected}", args
    empty = await cli(config, "queue", "list")
    assert empty.returncode == 0 and empty.stdout.strip() == "0 message(s)"


async def _sent(config: Path, qid: str) -> bool:
    return (await by_id(config)).get(qid, {}).get("state") == "sent"
