"""mailrelay next to Postfix, in one run, on the same sink: messages/s, latency, memory, CPU.

Three targets, each fed by the same load generator and delivering to one ``smtp-sink``:

  sink      the load generator talks to smtp-sink directly (the ceiling of this machine)
  mailrelay ``mailrelay run`` (a subprocess) with upstream.smtp = the sink
  postfix   Postfix as a loopback-only store-and-forward relay (relayhost = the sink), run
            from a private config and queue directory (``postfix -c DIR start``)

Load generators: ``python`` (asyncio, one connection per message, measures each message's
submission latency: connect to the 250 after the final dot) and ``smtp-source`` (Postfix's,
throughput only). A cell is done when the sink has counted all N messages: msgs/s is end to
end. Memory is peak RSS (mailrelay: the daemon; Postfix: the sum over master and its
children, which counts shared pages once per process, so PSS is printed too). CPU is ms per
message of the relay (Postfix: every daemon, reaped ones included). The script prints; it
never asserts. Needs root for Postfix (apt-get install postfix; its own service must not run).

Usage: python benchmarks/bench_postfix.py [-n 500] [--sizes 2000,100000] [-c 1,20]
                                          [--targets sink,mailrelay,postfix]
                                          [--clients python,smtp-source] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_relay import free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
SENDER, RCPT = "seller@shop.example", "buyer@example.net"
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


# ---- memory and CPU of a process tree ----------------------------------------------------------


@dataclass(frozen=True)
class TreeStats:
    rss_mib: float  # peak of the summed RSS
    pss_mib: float  # peak of the summed PSS (shared pages divided among their users)
    cpu_ms: float  # user + system CPU used meanwhile


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    return kids


def _field(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class ProcTree:
    """Samples a process and its descendants every 100 ms while a cell runs.

    ``reaped``: add the root's cutime/cstime, the CPU of children that exited (Postfix's master
    reaps its daemons; their time then moves to it).
    """

    def __init__(self, pid: int, reaped: bool) -> None:
        self.pid, self.reaped = pid, reaped
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rss = self.pss = 0

    def pids(self) -> list[int]:
        kids, found, todo = _children(), [self.pid], [self.pid]
        while todo:
            more = kids.get(todo.pop(), [])
            found += more
            todo += more
        return found

    def cpu_ms(self) -> float:
        ticks = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            if pid == self.pid and self.reaped:
                ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
        return ticks * TICK_MS

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            pids = self.pids()
            self.rss = max(self.rss, sum(_field(f"/proc/{p}/status", "VmRSS:") for p in pids))
            self.pss = max(self.pss, sum(_field(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids))

    def start(self) -> None:
        self.rss = self.pss = 0
        self._cpu = self.cpu_ms()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> TreeStats:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        return TreeStats(self.rss / 1024, self.pss / 1024, self.cpu_ms() - self._cpu)


# ---- the load generator (runs in its own process) ---------------------------------------------


def make_message(size: int) -> bytes:
    """A CRLF message of about ``size`` bytes with 76-character lines, some starting with a dot."""
    head = (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: bench\r\n"
            "Message-ID: <bench@shop.example>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstu\r\n"
    lines = [head]
    total, i = len(head), 0
    while total < size:
        lines.append(b"." + line[1:] if i % 10 == 0 else line)
        total += len(line)
        i += 1
    return b"".join(lines)


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code):
            raise RuntimeError(f"expected {code!r}, got {line!r}")
        if line[3:4] != b"-":
            return


async def _one_message(port: int, body: bytes) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _expect(reader, b"220")
        for command, code in ((b"EHLO bench.example", b"250"), (b"MAIL FROM:<" + SENDER.encode()
                              + b">", b"250"), (b"RCPT TO:<" + RCPT.encode() + b">", b"250"),
                              (b"DATA", b"354")):
            writer.write(command + b"\r\n")
            await _expect(reader, code)
        writer.write(body)
        await _expect(reader, b"250")
        latency = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        await reader.readline()
        return latency
    finally:
        writer.close()


async def _load(port: int, count: int, size: int, concurrency: int) -> list[float]:
    raw = make_message(size)
    body = raw.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    todo = iter(range(count))
    latencies: list[float] = []

    async def worker() -> None:
        for _ in todo:
            latencies.append(await _one_message(port, body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def load_main(args: list[str]) -> None:
    """``--load PORT N SIZE C``: send, print the latencies as JSON."""
    port, count, size, concurrency = map(int, args)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(_load(port, count, size, concurrency))))


# ---- the sink ------------------------------------------------------------------------------


class SmtpSink:
    """Postfix's smtp-sink; its ``-c`` counters (``mesg=N``) tell how many messages arrived."""

    def __init__(self) -> None:
        self.port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(["smtp-sink", *user, "-c", f"127.0.0.1:{self.port}", "1024"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.count = 0
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := self.proc.stdout.read1(4096):
            buf += chunk
            *records, buf = buf.split(b"\r")
            for record in reversed(records):
                if b"mesg=" in record:
                    with self.changed:
                        self.count = int(record.rsplit(b"mesg=", 1)[1].split()[0])
                        self.changed.notify_all()
                    break

    def wait_for(self, count: int, timeout: float = 300.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count >= count, timeout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---- the relays ----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    tree: ProcTree | None = None
    stop_fn: list = field(default_factory=list)

    def stop(self) -> None:
        for fn in self.stop_fn:
            fn()


def start_mailrelay(work: Path, sink_port: int) -> Target:
    port = free_port()
    config = work / "mailrelay.yaml"
    config.write_text(json.dumps({
        "database": str(work / "mailrelay.db"), "log": {"format": "json", "level": "info"},
        "smtp": {"listen": [f"127.0.0.1:{port}"], "hostname": "relay.bench.example"},
        "upstream": {"smtp": {"host": "127.0.0.1", "port": sink_port, "tls": "off"}},
    }))
    log = (work / "mailrelay.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "mailrelay", "run", "-c", str(config)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wait_port(port)

    def stop() -> None:
        proc.terminate()
        proc.wait(30)
        log.close()

    return Target("mailrelay", port, ProcTree(proc.pid, reaped=False), [stop])


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
meta_directory = /etc/postfix
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.example
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file_prefixes = {dir}
maillog_file = {dir}/maillog
biff = no
"""
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
local     unix - n n - - local
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def start_postfix(work: Path, sink_port: int) -> Target:
    """Postfix from ``work``: private main.cf/master.cf, queue and data directories, no chroot.

    As root, ``postfix -c DIR`` accepts a directory that the default main.cf does not list in
    alternate_config_directories. data_directory must belong to mail_owner (master.lock).
    """
    port = free_port()
    conf, data = work / "postfix-conf", work / "data"
    conf.mkdir()
    data.mkdir()
    (work / "queue").mkdir()
    shutil.chown(data, "postfix", "postfix")
    work.chmod(0o755)
    (conf / "main.cf").write_text(MAIN_CF.format(dir=work, sink_port=sink_port))
    (conf / "master.cf").write_text(MASTER_CF.format(port=port))
    started = subprocess.run(["postfix", "-c", str(conf), "start"], capture_output=True, text=True)
    if started.returncode:
        log = (work / "maillog").read_text() if (work / "maillog").exists() else ""
        raise RuntimeError(f"postfix did not start: {started.stderr}{log[-2000:]}")
    wait_port(port)
    pid = int((work / "queue" / "pid" / "master.pid").read_text().split()[0])

    def stop() -> None:
        subprocess.run(["postfix", "-c", str(conf), "stop"], capture_output=True)

    return Target("postfix", port, ProcTree(pid, reaped=True), [stop])


# ---- one cell ------------------------------------------------------------------------------


@dataclass
class Cell:
    target: str
    client: str
    size: int
    concurrency: int
    rate: float  # messages/s end to end (all N counted by the sink)
    accept: float  # messages/s accepted (N / the load generator's own time)
    p50: float | None  # ms, submission latency (python client only)
    p99: float | None
    rss: float | None  # MiB, peak
    pss: float | None
    cpu: float | None  # relay CPU ms per message


def run_cell(target: Target, sink: SmtpSink, client: str, count: int, size: int,
             concurrency: int) -> Cell:
    base = sink.count
    if target.tree:
        target.tree.start()
    started = time.perf_counter()
    if client == "python":
        done = subprocess.run([sys.executable, __file__, "--load", str(target.port), str(count),
                               str(size), str(concurrency)], capture_output=True, check=True)
        latencies = sorted(json.loads(done.stdout))
    else:
        subprocess.run(["smtp-source", "-s", str(concurrency), "-m", str(count), "-l", str(size),
                        "-f", SENDER, "-t", RCPT, f"127.0.0.1:{target.port}"],
                       capture_output=True, check=True)
        latencies = []
    accepted = time.perf_counter() - started
    arrived = sink.wait_for(base + count)
    elapsed = time.perf_counter() - started
    stats = target.tree.stop() if target.tree else None
    if not arrived:
        print(f"  !! {target.name}: only {sink.count - base} of {count} arrived", flush=True)

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 \
            if latencies else None

    return Cell(target.name, client, size, concurrency, count / elapsed, count / accepted,
                pct(0.5), pct(0.99),
                stats.rss_mib if stats else None, stats.pss_mib if stats else None,
                stats.cpu_ms / count if stats else None)


def median_cell(cells: list[Cell]) -> Cell:
    def med(values: list[float | None]) -> float | None:
        got = [v for v in values if v is not None]
        return statistics.median(got) if got else None

    first = cells[0]
    return Cell(first.target, first.client, first.size, first.concurrency,
                *(med([getattr(c, f) for c in cells]) for f in  # type: ignore[arg-type]
                  ("rate", "accept", "p50", "p99", "rss", "pss", "cpu")))


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(cells: list[Cell]) -> None:
    print("\n| client | size | C | target | msgs/s | vs postfix | accepted msgs/s | p50 ms | p99 ms"
          " | peak RSS MiB | peak PSS MiB | relay CPU ms/msg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        ref = next((c for c in cells if c.target == "postfix" and (c.client, c.size,
                    c.concurrency) == (cell.client, cell.size, cell.concurrency)), None)
        ratio = f"{cell.rate / ref.rate:.2f}x" if ref and ref.rate else "-"
        print(f"| {cell.client} | {cell.size // 1000}k | {cell.concurrency} | {cell.target} | "
              f"{cell.rate:.0f} | {ratio} | {cell.accept:.0f} | {fmt(cell.p50, '.1f')} | "
              f"{fmt(cell.p99, '.1f')} | "
              f"{fmt(cell.rss)} | {fmt(cell.pss)} | {fmt(cell.cpu, '.2f')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500, help="messages per cell")
    parser.add_argument("--sizes", default="2000,100000")
    parser.add_argument("-c", "--concurrency", default="1,20")
    parser.add_argument("--targets", default="sink,mailrelay,postfix")
    parser.add_argument("--clients", default="python,smtp-source")
    parser.add_argument("--runs", type=int, default=1, help="runs per cell (median is printed)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-postfix-"))
    work.chmod(0o755)  # Postfix's daemons (user postfix) must reach their queue below it
    sink = SmtpSink()
    cells: list[Cell] = []
    try:
        for name in args.targets.split(","):
            target = _start(name, work / name, sink.port)
            try:
                run_cell(target, sink, "python", 20, 2000, 4)  # warm-up
                for client in args.clients.split(","):
                    for size in sizes:
                        for level in levels:
                            runs = [run_cell(target, sink, client, args.n, size, level)
                                    for _ in range(args.runs)]
                            cells.append(median_cell(runs))
                            print(f"  {name} {client} {size} C={level}: "
                                  f"{cells[-1].rate:.0f} msgs/s", flush=True)
            finally:
                target.stop()
    finally:
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nn={args.n} per cell, runs={args.runs}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at the end (anything else running skews the figures)")
    print_table(sorted(cells, key=lambda c: (c.client, c.size, c.concurrency, c.target)))


def _start(name: str, work: Path, sink_port: int) -> Target:
    work.mkdir(parents=True)
    if name == "mailrelay":
        return start_mailrelay(work, sink_port)
    if name == "postfix":
        return start_postfix(work, sink_port)
    return Target("sink", sink_port)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        load_main(sys.argv[2:])
    else:
        main()
