"""The DATA phase without I/O: find the final dot, unstuff, enforce the limits.

Kept apart from the protocol so it can be tested chunk by chunk with no socket; ``read_data``
is the one function here that touches a stream. Replies use aiosmtpd's own wording because a
differential test compares them with stock aiosmtpd.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

REPLY_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"  # aiosmtpd's wording
REPLY_TOO_MUCH_DATA = "552 Error: Too much mail data"  # aiosmtpd's wording

END_OF_DATA = b"\r\n.\r\n"
_DOT_CRLF = b".\r\n"


@dataclass(frozen=True)
class DataResult:
    """One finished DATA phase: the unstuffed content, or the reply that replaces it."""

    content: bytes
    error: str | None = None


class DataDecoder:
    """Sans-IO accumulator for one DATA phase, fed the chunks ``read_data`` takes off the wire.

    Chunks never split a ``.<CRLF>`` and hold one only at their end (``readuntil(b".\\r\\n")``
    guarantees both), so the end of data is found from a chunk's last octets and the two
    before it; everything else (line lengths, size) is chunking-independent.
    The verdict matches aiosmtpd 1.4.6 exactly: the first CRLF-delimited line that is too
    long (``line_length_limit - 1`` octets or more) or ends past the size limit decides; it is
    500 if its content exceeds ``line_length_limit`` (aiosmtpd's reader overruns before
    counting it) or the line still fits the limit, else 552. Data is dropped from then on.
    """

    def __init__(self, size_limit: int | None, line_length_limit: int) -> None:
        self._limit: float = size_limit or math.inf
        self._too_long = line_length_limit - 1
        self._overrun = line_length_limit + 1
        self._parts: list[bytes | memoryview] = []
        self._tail = b"\r\n"  # last 2 octets seen; the data's start counts as after a CRLF
        self._received = 0  # octets before the final ".<CRLF>"
        self._carry = 0  # octets of the current line that have no CRLF yet
        self._dropping = False
        self._error: str | None = None

    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk as ``read_data`` cuts them; return True when it ends the data."""
        final = chunk.endswith(_DOT_CRLF) and (self._tail + chunk[-5:]).endswith(END_OF_DATA)
        size = len(chunk) - 3 if final else len(chunk)
        straddle = self._tail[-1:] == b"\r" and chunk[:1] == b"\n"
        if self._error is None:
            self._scan(chunk, size, final, straddle)
        if not self._dropping:
            self._parts.append(memoryview(chunk)[:size] if final else chunk)
        self._received += size
        self._tail = (self._tail + chunk[-2:])[-2:]
        return final

    def finish(self) -> DataResult:
        """Return the unstuffed content, or the 500/552 reply aiosmtpd would have sent."""
        if self._error is not None:
            return DataResult(b"", self._error)
        assert not self._dropping, "a dropped line always completes before the final dot"
        raw = b"".join(self._parts)
        self._parts.clear()
        return DataResult(unstuff(raw))

    def _scan(self, chunk: bytes, size: int, final: bool, straddle: bool) -> None:
        end = self._received + size
        if self._carry + size < self._too_long and end <= self._limit:
            crlf = chunk.rfind(b"\r\n", 0, size)  # fast path: no line can be too long here
            if crlf >= 0:
                self._carry = size - crlf - 2
            else:
                self._carry = size - 1 if straddle else self._carry + size
            return
        lengths = self._line_lengths(chunk, final, straddle)
        partial = lengths.pop()
        if (not lengths or max(lengths) < self._too_long) and end - partial <= self._limit:
            self._carry = partial
            if end > self._limit:  # the limit falls inside a line: it decides once complete
                self._drop()
            return
        self._judge(lengths)

    def _line_lengths(self, chunk: bytes, final: bool, straddle: bool) -> list[int]:
        """Lengths (without CRLF) of the lines this chunk completes, then of the unfinished one."""
        parts = chunk.split(b"\r\n")
        if final:
            parts[-2:] = [parts[-2][:-1]]  # drop the final ".<CRLF>"
        lengths = list(map(len, parts))
        if straddle:  # the previous chunk ended in CR and this one starts with its LF
            lengths[0] -= 1
            lengths.insert(0, self._carry - 1)
        else:
            lengths[0] += self._carry
        return lengths

    def _judge(self, complete: list[int]) -> None:
        start = self._received - self._carry
        for length in complete:
            end = start + length + 2
            if length >= self._too_long or end > self._limit:
                line_first = length >= self._overrun or end <= self._limit
                self._error = REPLY_LINE_TOO_LONG if line_first else REPLY_TOO_MUCH_DATA
                self._drop()
                return
            start = end

    def _drop(self) -> None:
        self._dropping = True
        self._parts.clear()


def unstuff(raw: bytes) -> bytes:
    """Remove the transparency dot from every line that starts with one (RFC 5321 4.5.2)."""
    if raw[:1] == b".":
        raw = raw[1:]
    return raw.replace(b"\r\n.", b"\r\n")


def has_bare_newline(data: bytes) -> bool:
    """True if data holds a CR not followed by LF or an LF not preceded by CR."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def normalize_newlines(data: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF, leaving existing CRLFs alone."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


async def read_data(reader: asyncio.StreamReader, decoder: DataDecoder) -> None:
    """Feed decoder from reader up to the final dot, leaving later octets in the reader.

    Each pass takes what the socket delivered up to the next ``.<CRLF>``: when none is
    buffered yet, the reader's line limit makes ``readuntil`` raise and we take the octets
    it has already searched.
    """
    while True:
        try:
            chunk = await reader.readuntil(_DOT_CRLF)
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(exc.consumed)
        if decoder.feed(chunk):
            return


