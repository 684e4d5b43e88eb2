"""Outbound throughput: SmtpUpstream (reused connection, raw DATA) against aiosmtplib usage.

Sends N messages of 2 KB and 100 KB, one at a time per worker, to a local sink running in a
separate process (so that the client's own CPU time can be measured) and prints messages/s
and client CPU ms per message for each variant:

  newconn        aiosmtplib: connect + sendmail + QUIT per message (libraries.md's advice)
  reuse          aiosmtplib: one connection, sendmail per message
  upstream-data  SmtpUpstream, but the body sent with aiosmtplib's SMTP.data() (regexes)
  upstream       SmtpUpstream as shipped: reused connection, raw DATA with bytes.replace

Usage: python benchmarks/bench_upstream.py [-n 500] [--sink aiosmtpd|raw] [--uvloop] [-c 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable

import aiosmtplib
from aiosmtpd.smtp import SMTP as SMTPServer

from mailrelay.smtp.upstream import SmtpUpstream

Sender = Callable[[bytes], Awaitable[None]]


def make_message(size: int) -> bytes:
    """A CRLF message of about ``size`` bytes, 76-char lines, some starting with a dot."""
    head = b"From: seller@shop.example\r\nTo: buyer@x.example\r\nSubject: bench\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopq\r\n"
    lines = [head]
    total = len(head)
    i = 0
    while total < size:
        chunk = (b"." + line[1:]) if i % 10 == 0 else line
        lines.append(chunk)
        total += len(chunk)
        i += 1
    return b"".join(lines)


class _Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


async def raw_sink_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          on_message: Callable[[], None] | None = None) -> None:
    """A minimal SMTP sink: chunked DATA reading, so the client side dominates."""
    writer.write(b"220 rawsink ESMTP\r\n")
    while line := await reader.readline():
        verb = line[:4].upper()
        if verb == b"EHLO":
            writer.write(b"250-rawsink\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
                         b"250 8BITMIME\r\n")
        elif verb == b"DATA":
            writer.write(b"354 go\r\n")
            await reader.readuntil(b"\r\n.\r\n")
            if on_message is not None:
                on_message()
            writer.write(b"250 2.0.0 OK\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            break
        else:
            writer.write(b"250 OK\r\n")
    writer.close()


def _sink_main(kind: str, port_queue: multiprocessing.Queue) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        if kind == "raw":
            server = await asyncio.start_server(raw_sink_client, "127.0.0.1", 0, limit=2**26)
        else:
            server = await loop.create_server(
                lambda: SMTPServer(_Discard(), hostname="sink", ident="sink"), "127.0.0.1", 0
            )
        port_queue.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


async def _variant(name: str, port: int) -> tuple[Sender, Callable[[], Awaitable[None]]]:
    """Return a send(raw) function and a closer for one variant (one connection/worker)."""
    rcpts = ["buyer@x.example"]
    if name == "newconn":

        async def send_new(raw: bytes) -> None:
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1", port=port, start_tls=False, local_hostname="bench"
            ) as smtp:
                await smtp.sendmail("s@shop.example", rcpts, raw)

        return send_new, _noop
    if name == "reuse":
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, local_hostname="bench"
        )
        await smtp.connect()

        async def send_reuse(raw: bytes) -> None:
            await smtp.sendmail("s@shop.example", rcpts, raw)

        return send_reuse, smtp.quit
    cls = _RegexDataUpstream if name == "upstream-data" else SmtpUpstream
    upstream = cls("127.0.0.1", port, "off", None, None, 30.0, "bench")

    async def send_upstream(raw: bytes) -> None:
        results = await upstream.send("s@shop.example", rcpts, raw)
        assert results[0].outcome == "sent", results

    return send_upstream, upstream.close


class _RegexDataUpstream(SmtpUpstream):
    """SmtpUpstream with the body sent through aiosmtplib's data() (regex normalise/stuff)."""

    async def _send_body(self, smtp, raw):  # type: ignore[no-untyped-def]
        proto = smtp.protocol
        # data() would send DATA itself; reproduce its body path after our DATA/354.
        body = aiosmtplib.protocol.normalize_message_line_endings(raw)
        body = aiosmtplib.protocol.PERIOD_REGEX.sub(b"..", body) + b".\r\n"
        proto.write(body)
        return await proto.read_response(timeout=self._timeout)


async def _noop() -> None:
    return None


async def run_one(
    name: str, port: int, raw: bytes, n: int, concurrency: int
) -> tuple[float, float]:
    """Messages/s and client CPU ms/msg for ``n`` messages over ``concurrency`` workers."""
    workers = [await _variant(name, port) for _ in range(concurrency)]
    for send, _ in workers:  # warm up: connect and one message each
        await send(raw)
    per_worker = n // concurrency

    async def loop(send: Sender) -> None:
        for _ in range(per_worker):
            await send(raw)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop(send) for send, _ in workers))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    for _, close in workers:
        await close()
    done = per_worker * concurrency
    return done / wall, cpu * 1000 / done


async def main(args: argparse.Namespace, port: int) -> None:
    variants = ["newconn", "reuse", "upstream-data", "upstream"]
    print(
        f"sink={args.sink} uvloop={args.uvloop} n={args.n} C={args.concurrency} "
        f"runs={args.runs} (median; client CPU ms/msg)"
    )
    for size in (2_000, 100_000):
        raw = make_message(size)
        n = args.n if size < 10_000 else max(args.n // 2, args.concurrency)
        for name in variants:
            runs = [await run_one(name, port, raw, n, args.concurrency) for _ in range(args.runs)]
            rate = statistics.median(r for r, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            lo, hi = min(r for r, _ in runs), max(r for r, _ in runs)
            print(
                f"{size // 1000:>4} KB  {name:<14} {rate:8.0f} msg/s ({lo:.0f}-{hi:.0f})"
                f"  client CPU {cpu:6.2f} ms/msg"
            )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="messages per run (100 KB: n/2)")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sink", choices=["aiosmtpd", "raw"], default="aiosmtpd")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    port_queue: multiprocessing.Queue = ctx.Queue()
    sink = ctx.Process(target=_sink_main, args=(args.sink, port_queue), daemon=True)
    sink.start()
    try:
        port = port_queue.get(timeout=10)
        if args.uvloop:
            import uvloop

            uvloop.run(main(args, port))
        else:
            asyncio.run(main(args, port))
    finally:
        sink.terminate()
        sink.join()


if __name__ == "__main__":
    cli()
