"""Byte-level header surgery: add or remove header fields without re-serialising the message.

Re-serialising through ``email`` refolds long headers and can break DKIM signatures
(libraries.md section 3); splicing bytes at the header/body boundary keeps every other byte.
"""

from __future__ import annotations

import re

_HEADER_END = re.compile(rb"\r\n\r\n|\n\n")


def split_headers(raw: bytes) -> tuple[bytes, bytes]:
    """``(header block with its final line ending, rest)``; no blank line: all header."""
    if raw.startswith((b"\r\n", b"\n")):
        return b"", raw
    match = _HEADER_END.search(raw)
    if match is None:
        return raw, b""
    cut = match.start() + (2 if match.group() == b"\r\n\r\n" else 1)
    return raw[:cut], raw[cut:]


def header_fields(header_block: bytes) -> list[bytes]:
    """The header fields, each with its continuation lines and line endings."""
    fields: list[bytes] = []
    for line in header_block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def remove_headers(raw: bytes, names: set[str] | frozenset[str]) -> bytes:
    """``raw`` without any header field named in ``names`` (case-insensitive)."""
    wanted = {n.lower() for n in names}
    header, body = split_headers(raw)
    fields = header_fields(header)
    kept = [f for f in fields if field_name(f) not in wanted]
    if len(kept) == len(fields):
        return raw
    return b"".join(kept) + body


def header_values(raw: bytes, name: str) -> list[str]:
    """Unfolded raw values of header ``name`` (not RFC 2047-decoded)."""
    header, _ = split_headers(raw)
    wanted = name.lower()
    values = []
    for field in header_fields(header):
        if field_name(field) == wanted and b":" in field:
            value = field.split(b":", 1)[1]
            values.append(re.sub(rb"\r?\n[ \t]+", b" ", value).strip().decode("utf-8", "replace"))
    return values


def prepend_header(raw: bytes, field: str) -> bytes:
    """Put ``field`` (without line ending) in front of the message."""
    return field.encode("utf-8") + b"\r\n" + raw
