"""The whole story through the real daemon, a real Dovecot and a real upstream sink.

A buyer asks a question; the seller's feedback request is relayed; Amazon's opt-out notice for
that order arrives; the buyer is blocked within seconds and the notice leaves INBOX; the next
feedback request is refused; the seller's reply to the question still goes out, on its thread.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import sys
import time
from email import message_from_bytes
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, write_config
from dovecot import DEFAULT_PASSWORD, DEFAULT_USER, DovecotServer
from sink import Sink

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).parent / "data" / "samples"
BUYER = "k7m2p9x4t1v8c3q@marketplace.amazon.com"
SELLER = "support@northwind-outdoor.example"
ORDER = "113-4829371-5562918"
BUYER_MESSAGE_ID = "<bbc-msg-113-classic@amazon.example>"
TOKEN = "[commMgrTok:A3QX7RZ2M9KT5]"

FEEDBACK_REQUEST = (SAMPLES / "16-seller-feedback-request.eml").read_bytes()
REPLY = (
    f"From: Northwind Outdoor <{SELLER}>\r\n"
    f"To: Jane <{BUYER}>\r\n"
    f"Subject: Re: Product details inquiry from Amazon customer Jane (Order: {ORDER})\r\n"
    "Message-ID: <reply-story-1@northwind-outdoor.example>\r\n"
    f"In-Reply-To: {BUYER_MESSAGE_ID}\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    "Hi Jane,\r\n\r\nyes, three AA batteries are in the box.\r\n\r\nNorthwind Outdoor\r\n"
).encode()


def cli(config: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "mailrelay", *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


def send(port: int, raw: bytes, to: str = BUYER) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        try:
            client.sendmail(SELLER, [to], raw)
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients[to]
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        return 250, b""


async def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_question_feedback_notice_block_then_threaded_reply(
    tmp_path: Path, dovecot: DovecotServer, sink: Sink
) -> None:
    """The daemon learns the opt-out from the notice and keeps only the critical reply flowing."""
    password_file = tmp_path / "imap.password"
    password_file.write_text(DEFAULT_PASSWORD)
    config = write_config(
        tmp_path, sink.port,
        imap={"accounts": [{
            "name": "seller", "host": "127.0.0.1", "port": dovecot.port, "tls": "off",
            "username": DEFAULT_USER, "password_file": str(password_file),
            "poll_interval": "2s", "timeout": "10s", "after_notice": "move:Amazon/Opt-outs",
        }]},
        policy={"on_drop": "reject"},
    )
    daemon = await DaemonProcess(config).astart()
    try:
        # 1. The buyer's question arrives in the seller's mailbox and is recorded for threading.
        await asyncio.to_thread(dovecot.append, DEFAULT_USER,
                                (SAMPLES / "13-buyer-question-en-classic-commMgrTok.eml")
                                .read_bytes())
        await wait_until(lambda: _buyer_message_recorded(config), what="buyer message recorded")

        # 2. The seller's feedback request is relayed (the buyer has not opted out yet).
        assert (await asyncio.to_thread(send, daemon.port, FEEDBACK_REQUEST))[0] == 250
        await sink.wait_for(1)
        assert b"How was your order" in sink.messages[0].data

        # 3. Amazon's opt-out notice for that order arrives: the buyer is blocked within
        #    seconds, and the notice leaves INBOX for the folder.
        notice = (SAMPLES / "01-optout-bounce-en-2017.eml").read_bytes()
        started = time.monotonic()
        await asyncio.to_thread(dovecot.append, DEFAULT_USER, notice)
        await wait_until(lambda: BUYER in cli(config, "blocklist", "list"),
                         what="buyer blocked")
        blocked_after = time.monotonic() - started
        assert blocked_after < 10, blocked_after
        await wait_until(lambda: "Amazon/Opt-outs" in dovecot.mailboxes(DEFAULT_USER)
                         and len(dovecot.list_uids(DEFAULT_USER, "Amazon/Opt-outs")) == 1,
                         what="notice moved")
        inbox = [raw for _, _, raw in dovecot.fetch_all(DEFAULT_USER)]
        assert not any(b"could not be delivered" in raw for raw in inbox)
        assert len(inbox) == 1  # the buyer's question stays where it was
        entries = json.loads(cli(config, "blocklist", "list", "--json"))
        assert [e["buyer_key"] for e in entries] == [BUYER]
        assert entries[0]["source"] == "notice"
        assert ORDER in entries[0]["evidence"]

        # 4. The next feedback request to that buyer is refused and never reaches the sink.
        code, text = await asyncio.to_thread(send, daemon.port, FEEDBACK_REQUEST)
        assert code == 550
        assert b"5.7.1" in text
        assert BUYER.encode() in text

        # 5. The reply to the buyer's question still goes out, tagged with its thread.
        assert (await asyncio.to_thread(send, daemon.port, REPLY))[0] == 250
        await sink.wait_for(2)
        await asyncio.sleep(0.5)
        assert len(sink.messages) == 2
        delivered = sink.messages[1]
        assert delivered.rcpts == [BUYER]
        message = message_from_bytes(delivered.data)
        assert message["In-Reply-To"] == BUYER_MESSAGE_ID
        assert BUYER_MESSAGE_ID in message["References"]
        body = message.get_payload(decode=True).decode()
        assert TOKEN in body
        assert "does the lantern come with batteries?" in body
        assert "three AA batteries" in body
        assert "[Important]" not in message["Subject"]
    finally:
        assert await daemon.astop() == 0, daemon.output()


def _buyer_message_recorded(config: Path) -> bool:
    import sqlite3

    import yaml

    database = yaml.safe_load(config.read_text())["database"]
    with sqlite3.connect(database) as conn:
        try:
            row = conn.execute("SELECT count(*) FROM buyer_messages WHERE message_id = ?",
                               (BUYER_MESSAGE_ID,)).fetchone()
        except sqlite3.OperationalError:
            return False
    return bool(row and row[0])
