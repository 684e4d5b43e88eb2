"""End-to-end throughput of `mailrelay run`: clients -> relay (a subprocess) -> a loopback sink.

For each cell (message size x client concurrency) a fresh daemon is started on a fresh database
with upstream.smtp pointing at the sink. A load generator in its own process sends N messages
from C concurrent clients, one TCP connection per message (as Postfix's smtp-source does), and
records each submission's latency (connect to the 250 after the final dot). A cell ends when
the sink has counted all N messages. Printed per cell:

  msg/s       N / (first connect .. the sink has all N): end to end, durable queue included
  p50/p99     submission latency in ms (python client only)
  relay cpu   the daemon's CPU (user + system) per message, in ms
  client cpu  the load generator's CPU per message, in ms (it shares the cores)
  peak RSS    the daemon's VmHWM (/proc/PID/status), in MiB
  fsync/msg   fsync + fdatasync calls per message (only with --fsync: the daemon runs under
              `strace --seccomp-bpf`, which stops it on those two calls only)

The sink is Postfix's smtp-sink when installed (C, nearly free), else a small asyncio sink in
its own process. The load generator shares the machine's cores with the relay and the sink.

Usage: python benchmarks/bench_relay.py [--sizes 2000,100000] [-c 1,20] [-n 1000]
                                        [--n-large 500] [--runs 1] [--sink auto|smtp-sink|raw]
                                        [--client python|smtp-source] [--fsync]
                                        [--buyer] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench_upstream import raw_sink_client  # the same minimal sink, counting here

ROOT = Path(__file__).resolve().parents[1]
SENDER = "seller@shop.example"
PLAIN_RCPT = "customer@example.net"
BUYER_RCPT = "0x1y2z3w4v5u6t7s@marketplace.amazon.com"
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")
WARMUP = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def make_message(size: int, rcpt: str) -> bytes:
    """A CRLF message of about ``size`` bytes, 76-character lines, every tenth starting with '.'."""
    head = (f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: Your order has shipped\r\n"
            "Message-ID: <bench@shop.example>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstu\r\n"
    lines, total, i = [head], len(head), 0
    while total < size:
        lines.append(b"." + line[1:] if i % 10 == 0 else line)
        total += len(line)
        i += 1
    return b"".join(lines)


# ---- the load generator (its own process) ----------------------------------------------------


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code):
            raise RuntimeError(f"expected {code!r}, got {line!r}")
        if line[3:4] != b"-":
            return


async def _one(port: int, rcpt: bytes, data: bytes) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _expect(reader, b"220")
        writer.write(b"EHLO load.example\r\n")
        await _expect(reader, b"250")
        writer.write(b"MAIL FROM:<" + SENDER.encode() + b">\r\n")
        await _expect(reader, b"250")
        writer.write(b"RCPT TO:<" + rcpt + b">\r\n")
        await _expect(reader, b"250")
        writer.write(b"DATA\r\n")
        await _expect(reader, b"354")
        writer.write(data)
        await _expect(reader, b"250")
        latency = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        await reader.readline()
        return latency
    finally:
        writer.close()


async def _load(port: int, count: int, size: int, concurrency: int, rcpt: str
                ) -> dict[str, object]:
    data = make_message(size, rcpt).replace(b"\r\n.", b"\r\n..") + b".\r\n"
    todo = iter(range(count))
    latencies: list[float] = []

    async def worker() -> None:
        for _ in todo:
            latencies.append(await _one(port, rcpt.encode(), data))

    started = time.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"started": started, "latencies": latencies}


def load_main(port: int, count: int, size: int, concurrency: int, rcpt: str) -> None:
    """Run in a child process: print one JSON line with the start time and the latencies."""
    try:
        import uvloop

        result = uvloop.run(_load(port, count, size, concurrency, rcpt))
    except ImportError:
        result = asyncio.run(_load(port, count, size, concurrency, rcpt))
    print(json.dumps(result))


def run_load(client: str, port: int, count: int, size: int, concurrency: int, rcpt: str
             ) -> dict:
    """Run a load generator in a child process: this script with ``--load``, or smtp-source.

    Returns the start time, the latencies (python only) and the generator's CPU time.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if client == "smtp-source":
        started = time.time()
        subprocess.run(["smtp-source", "-s", str(concurrency), "-m", str(count),
                        "-l", str(size), "-f", SENDER, "-t", rcpt, "-M", "load.example",
                        f"127.0.0.1:{port}"], check=True, timeout=900,
                       stdout=subprocess.DEVNULL)
        result: dict = {"started": started, "latencies": None}
    else:
        out = subprocess.run([sys.executable, __file__, "--load", str(port), str(count),
                              str(size), str(concurrency), rcpt],
                             capture_output=True, text=True, check=True, timeout=900)
        result = json.loads(out.stdout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_ms"] = 1000 * (after.ru_utime + after.ru_stime
                               - before.ru_utime - before.ru_stime)
    return result


# ---- sinks -------------------------------------------------------------------------------------


class CountingSink:
    """Common part: a message count that can be waited for, and the time it was reached."""

    def __init__(self) -> None:
        self.port = free_port()
        self.count = 0
        self.changed = threading.Condition()
        self.reached: dict[int, float] = {}

    def _set(self, count: int) -> None:
        with self.changed:
            self.count = count
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 600.0) -> float:
        """Block until ``count`` messages arrived; return roughly when (time.time())."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.count >= count, timeout):
                raise RuntimeError(f"sink has {self.count} of {count} messages")
        return time.time()

    def stop(self) -> None:
        raise NotImplementedError


class PostfixSink(CountingSink):
    """smtp-sink; its ``-c`` counters (``mesg=N``, \\r-separated) tell how many arrived."""

    name = "smtp-sink"

    def __init__(self) -> None:
        super().__init__()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(["smtp-sink", *user, "-c", f"127.0.0.1:{self.port}", "256"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
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
                    self._set(int(record.rsplit(b"mesg=", 1)[1].split()[0]))
                    break

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _count(counter: multiprocessing.Value) -> Callable[[], None]:  # type: ignore[valid-type]
    def bump() -> None:
        with counter.get_lock():
            counter.value += 1

    return bump


def _raw_sink_main(port: int, counter: multiprocessing.Value) -> None:  # type: ignore[valid-type]
    async def serve() -> None:
        server = await asyncio.start_server(lambda r, w: raw_sink_client(r, w, _count(counter)),
                                            "127.0.0.1", port, limit=2**26)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


class RawSink(CountingSink):
    """A minimal asyncio SMTP sink in its own process (reads DATA with one readuntil)."""

    name = "raw asyncio sink"

    def __init__(self) -> None:
        super().__init__()
        ctx = multiprocessing.get_context("spawn")
        self.counter = ctx.Value("l", 0)
        self.proc = ctx.Process(target=_raw_sink_main, args=(self.port, self.counter),
                                daemon=True)
        self.proc.start()
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()
        wait_port(self.port)

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            if self.counter.value != self.count:
                self._set(self.counter.value)

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        self.proc.join(10)


# ---- the daemon --------------------------------------------------------------------------------


class Relay:
    """``mailrelay run`` on a fresh database; optionally under strace counting fsyncs."""

    def __init__(self, work: Path, sink_port: int, count_fsync: bool) -> None:
        self.port = free_port()
        self.work = work
        config = work / "config.yaml"
        config.write_text(json.dumps({
            "database": str(work / "mailrelay.db"),
            "log": {"format": "json", "level": "info"},
            "smtp": {"listen": [f"127.0.0.1:{self.port}"], "hostname": "relay.bench.example"},
            "upstream": {"smtp": {"host": "127.0.0.1", "port": sink_port, "tls": "off"}},
        }))
        command = [sys.executable, "-m", "mailrelay", "run", "-c", str(config)]
        self.strace_out = work / "strace.txt"
        if count_fsync:
            command = ["strace", "-f", "--seccomp-bpf", "-c", "-e", "trace=fsync,fdatasync",
                       "-o", str(self.strace_out), *command]
        self.log = (work / "daemon.log").open("wb")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_port(self.port)
        self.pid = self._daemon_pid(count_fsync)

    def _daemon_pid(self, traced: bool) -> int:
        if not traced:
            return self.proc.pid
        for _ in range(100):  # strace's child is the daemon
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            if pids:
                return int(pids[0])
            time.sleep(0.05)
        raise RuntimeError("no daemon under strace")

    def cpu_ms(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * TICK_MS

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int | None:
        """SIGTERM, wait; return the fsync + fdatasync count when traced."""
        if self.pid != self.proc.pid:
            os.kill(self.pid, 15)
        else:
            self.proc.terminate()
        self.proc.wait(60)
        self.log.close()
        if not self.strace_out.exists():
            return None
        calls = 0
        for line in self.strace_out.read_text().splitlines():
            parts = line.split()
            if parts and parts[-1] in ("fsync", "fdatasync"):
                calls += int(parts[3] if len(parts) >= 6 else parts[-2])
        return calls


# ---- one cell ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    size: int
    concurrency: int
    count: int
    rate: float
    p50_ms: float | None  # None: the client (smtp-source) does not measure latency
    p99_ms: float | None
    cpu_ms: float
    client_cpu_ms: float
    rss_mib: float
    fsync_per_msg: float | None


class Profiler:
    """py-spy sampling the daemon (GIL holders only) while the timed load runs."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--gil",
                                      "--rate", "250", "--format", "raw", "-o", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach

    def stop(self) -> None:
        self.proc.send_signal(2)
        self.proc.wait(60)

    def top(self, limit: int = 25) -> list[tuple[float, float, str]]:
        """(self %, inclusive %, function) of the hottest functions."""
        own: dict[str, int] = {}
        inclusive: dict[str, int] = {}
        total = 0
        for line in self.out.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            count = int(count_text)
            frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                      for f in stack.split(";")]
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
        rows = [(100 * own.get(f, 0) / total, 100 * n / total, f) for f, n in inclusive.items()]
        return sorted(rows, reverse=True)[:limit]


def run_cell(make_sink: Callable[[], CountingSink], client: str, size: int, concurrency: int,
             count: int, rcpt: str, count_fsync: bool, profile: Path | None = None) -> Cell:
    sink = make_sink()
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        relay = Relay(Path(tmp), sink.port, count_fsync)
        profiler = None
        try:
            run_load(client, relay.port, WARMUP, size, min(concurrency, WARMUP), rcpt)
            sink.wait_for(WARMUP)
            if profile is not None:
                profiler = Profiler(relay.pid, profile / f"relay-{size}-{concurrency}.txt")
            cpu0 = relay.cpu_ms()
            result = run_load(client, relay.port, count, size, concurrency, rcpt)
            done = sink.wait_for(WARMUP + count)
            cpu = relay.cpu_ms() - cpu0
            rss = relay.peak_rss_mib()
        finally:
            if profiler is not None:
                profiler.stop()
            fsyncs = relay.stop()
            sink.stop()
    if profiler is not None:
        print(f"-- profile {size} B, C={concurrency}: self% incl% function")
        for own, incl, name in profiler.top():
            print(f"   {own:5.1f} {incl:5.1f}  {name}")
    rate = count / (done - result["started"])
    p50 = p99 = None
    if result["latencies"]:
        latencies = sorted(result["latencies"])
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return Cell(size, concurrency, count, rate, p50, p99, cpu / count,
                result["cpu_ms"] / count, rss,
                None if fsyncs is None else fsyncs / (WARMUP + count))


def median_cell(cells: list[Cell]) -> Cell:
    def med(name: str) -> float | None:
        values = [getattr(c, name) for c in cells if getattr(c, name) is not None]
        return statistics.median(values) if values else None

    return Cell(cells[0].size, cells[0].concurrency, cells[0].count, med("rate") or 0.0,
                med("p50_ms"), med("p99_ms"), med("cpu_ms") or 0.0, med("client_cpu_ms") or 0.0,
                max(c.rss_mib for c in cells), med("fsync_per_msg"))


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,100000")
    parser.add_argument("-c", "--concurrency", default="1,20")
    parser.add_argument("-n", type=int, default=1000, help="messages per cell (small sizes)")
    parser.add_argument("--n-large", type=int, default=500, help="messages per cell >= 50 KB")
    parser.add_argument("--runs", type=int, default=1, help="runs per cell (median printed)")
    parser.add_argument("--sink", choices=["auto", "smtp-sink", "raw"], default="auto")
    parser.add_argument("--client", choices=["python", "smtp-source"], default="python",
                        help="load generator; smtp-source (Postfix's, in C) uses less CPU but "
                             "measures no latency")
    parser.add_argument("--fsync", action="store_true", help="count fsyncs (needs strace)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample the daemon with py-spy; collapsed stacks go to DIR")
    parser.add_argument("--buyer", action="store_true",
                        help="address a marketplace buyer (the policy parses every message)")
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    use_postfix = args.sink == "smtp-sink" or (args.sink == "auto" and shutil.which("smtp-sink"))
    make_sink: Callable[[], CountingSink] = PostfixSink if use_postfix else RawSink
    rcpt = BUYER_RCPT if args.buyer else PLAIN_RCPT
    print(f"sink: {make_sink.name}; client: {args.client}; cores: {os.cpu_count()}; "  # type: ignore[attr-defined]
          f"recipient: {rcpt}; runs per cell: {args.runs}; one connection per message")
    print(f"{'size':>6} {'C':>3} {'N':>5} {'msg/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'relay cpu':>9} {'client cpu':>10} {'peak RSS':>8} {'fsync/msg':>9}")
    for size in (int(s) for s in args.sizes.split(",")):
        count = args.n if size < 50_000 else args.n_large
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            cells = [run_cell(make_sink, args.client, size, concurrency, count, rcpt,
                              args.fsync, args.profile) for _ in range(args.runs)]
            c = median_cell(cells)
            print(f"{size // 1000:>4}KB {c.concurrency:>3} {c.count:>5} {c.rate:>7.0f} "
                  f"{fmt(c.p50_ms, '.1f'):>7} {fmt(c.p99_ms, '.1f'):>7} {c.cpu_ms:>9.2f} "
                  f"{c.client_cpu_ms:>10.2f} {c.rss_mib:>8.1f} {fmt(c.fsync_per_msg, '.2f'):>9}",
                  flush=True)
    print("relay cpu / client cpu: ms of CPU per message; peak RSS: the daemon's VmHWM in MiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load"]:
        port, count, size, concurrency = map(int, sys.argv[2:6])
        load_main(port, count, size, concurrency, sys.argv[6])
    else:
        main()
