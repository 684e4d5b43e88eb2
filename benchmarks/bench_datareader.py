"""Time receiving N messages of ~100 KB from one client: stock aiosmtpd SMTP vs RelaySMTP.

Server and client share one event loop on 127.0.0.1; the client is a raw socket that sends
prebuilt bytes, so nearly all the time measured is the server's. The handler does nothing
but return 250, so this measures the DATA reader, not the relay.

    .venv/bin/python benchmarks/bench_datareader.py -n 300 --body text --uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP

from mailrelay.smtp.protocol import RelaySMTP

HEAD = b"From: seller@shop.test\r\nTo: buyer@example.test\r\nSubject: bench\r\n\r\n"


class Sink:
    """Accepts every message and keeps only a count."""

    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 OK"


def make_body(kind: str, size: int) -> bytes:
    """Dot-stuffed message data of about size octets, ending with the final dot."""
    rnd = random.Random(42)
    if kind == "base64":
        raw = base64.encodebytes(rnd.randbytes(size * 3 // 4)).replace(b"\n", b"\r\n")
        return HEAD + raw + b".\r\n"
    words = [b"order", b"shipped", b"thanks", b"item", b"buyer", b"tracking", b"return"]
    lines, total = [HEAD], len(HEAD)
    while total < size:
        line = b" ".join(rnd.choice(words) for _ in range(10))
        line += b"." if rnd.random() < 0.2 else b""  # prose: some lines end a sentence
        line = b"." + line if rnd.random() < 0.02 else line  # and a few need dot-stuffing
        lines.append(line + b"\r\n")
        total += len(line) + 2
    return b"".join(lines) + b".\r\n"


async def reply(reader: asyncio.StreamReader) -> bytes:
    """Read one whole reply; return its last line."""
    while True:
        line = await reader.readline()
        if line[3:4] != b"-":
            return line


async def run_client(port: int, body: bytes, count: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reply(reader)
    writer.write(b"EHLO bench.test\r\n")
    await reply(reader)
    start = time.perf_counter()
    for _ in range(count):
        writer.write(b"MAIL FROM:<s@shop.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        for _ in range(3):
            await reply(reader)
        writer.write(body)
        assert (await reply(reader)).startswith(b"250")
    elapsed = time.perf_counter() - start
    writer.write(b"QUIT\r\n")
    await reply(reader)
    writer.close()
    return elapsed


async def measure(factory: Callable[[Sink], SMTP], body: bytes, count: int) -> float:
    """Messages per second for one run against a fresh server."""
    sink = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: factory(sink), "127.0.0.1", 0)
    try:
        elapsed = await run_client(server.sockets[0].getsockname()[1], body, count)
    finally:
        server.close()
    assert sink.count == count
    return count / elapsed


VARIANTS: dict[str, Callable[[Sink], SMTP]] = {
    "stock aiosmtpd": lambda h: SMTP(h, hostname="bench", data_size_limit=2**25),
    "RelaySMTP": lambda h: RelaySMTP(h, hostname="bench", data_size_limit=2**25),
}


async def main(args: argparse.Namespace) -> None:
    body = make_body(args.body, args.size)
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):  # alternate so machine noise hits both alike
        for name, factory in VARIANTS.items():
            rates[name].append(await measure(factory, body, args.n))
    print(f"{args.n} x {len(body)} B ({args.body}), loop={args.loop_name}, rounds={args.rounds}")
    for name, values in rates.items():
        median = statistics.median(values)
        mbps = median * len(body) / 1e6
        print(f"  {name:15s} {median:8.1f} msgs/s  ({min(values):.1f}-{max(values):.1f})"
              f"  {mbps:6.1f} MB/s")
    ratio = statistics.median(rates["RelaySMTP"]) / statistics.median(rates["stock aiosmtpd"])
    print(f"  RelaySMTP / stock: {ratio:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="messages per run")
    parser.add_argument("--size", type=int, default=100_000, help="message size in octets")
    parser.add_argument("--body", choices=["text", "base64"], default="text")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    ns = parser.parse_args()
    ns.loop_name = "uvloop" if ns.uvloop else "asyncio"
    if ns.uvloop:
        import uvloop

        uvloop.run(main(ns))
    else:
        asyncio.run(main(ns))
