"""Maildir delivery (the local trial upstream)."""

from __future__ import annotations

import mailbox
from pathlib import Path

import pytest

from mailrelay.smtp.maildir import deliver_to_maildir

RAW = b"From: seller@shop.example\r\nSubject: caf\xc3\xa9\r\n\r\n.dot line\r\n\xff\xfe\r\n"


def test_message_lands_in_new_with_identical_bytes(tmp_path: Path) -> None:
    """The file appears in new/ with the exact bytes; tmp/ is left empty."""
    box = tmp_path / "outbox"
    path = deliver_to_maildir(box, RAW, 1_700_000_000.5)
    assert path.parent == box / "new"
    assert path.read_bytes() == RAW
    assert path.name.startswith("1700000000.")
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
    assert list((box / "tmp").iterdir()) == []
    assert path.stat().st_mode & 0o777 == 0o600


def test_existing_maildir_and_unique_names(tmp_path: Path) -> None:
    """Repeated deliveries in the same second get distinct names; a mail reader sees them all."""
    paths = {deliver_to_maildir(tmp_path, b"X-N: %d\r\n" % i + RAW, 5.0) for i in range(20)}
    assert len(paths) == 20
    box = mailbox.Maildir(tmp_path, create=False)
    assert sorted(int(m["X-N"]) for m in box) == list(range(20))


def test_unwritable_maildir_raises_and_leaves_nothing(tmp_path: Path) -> None:
    """A failure raises (the worker retries) and leaves no partial file behind."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "new").write_text("not a directory")
    with pytest.raises(OSError):
        deliver_to_maildir(tmp_path, RAW, 5.0)
    assert list((tmp_path / "tmp").iterdir()) == []
