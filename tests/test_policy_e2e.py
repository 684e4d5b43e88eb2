"""The opt-out policy end to end: `mailrelay run` as a subprocess, smtplib as the seller's mail
client, the Sink as the upstream, and the `mailrelay` commands an operator would type.

Each test checks what a seller sees: the SMTP reply in the mail client, what reaches the
upstream byte for byte, and what `mailrelay audit`, `queue` and `quarantine` report. Store look-ups
from the test process stand in only for what Amazon or the IMAP poller would do (a buyer's
question arriving, an opt-out notice naming an order), through the same functions they use.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import smtplib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProcess, write_config
from sink import Received, Sink, SinkHandler, free_port

from mailrelay.cli import main as cli_main
from mailrelay.imap.actions import apply_finding, message_key
from mailrelay.imap.detect import detect
from mailrelay.store import Store

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).parent / "data" / "samples"
QUESTION = (SAMPLES / "13-buyer-question-en-classic-commMgrTok.eml").read_bytes()
QUESTION_MODERN = (SAMPLES / "14-buyer-question-en-modern-pluscase.eml").read_bytes()
REPLY = (SAMPLES / "15-seller-reply-critical.eml").read_bytes()
FEEDBACK = (SAMPLES / "16-seller-feedback-request.eml").read_bytes()
DELIVERY_ISSUE = (SAMPLES / "17-seller-delivery-issue-proactive.eml").read_bytes()
MARKETING = (SAMPLES / "18-seller-marketing-newsletter.eml").read_bytes()

SELLER = "support@northwind-outdoor.example"
BUYER = "k7m2p9x4t1v8c3q@marketplace.amazon.com"  # sample 13's buyer, To: of samples 16-19
BUYER_MODERN = "r4w8n2j6d1h5z9b+5b2e7c1a-9d3f-4e8a-b6c2-1f0a9e7d3c4b@marketplace.amazon.com"
OTHER_BUYER = "x5c8v2b7n4m1q3w@marketplace.amazon.de"
COLLEAGUE = "warehouse@northwind-outdoor.example"
ORDER = "113-4829371-5562918"
QUESTION_ID = "<bbc-msg-113-classic@amazon.example>"
QUESTION_MODERN_ID = "<bbc-msg-113-modern-5b2e7c1a@amazon.example>"
QUEUED_RE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]+)")
INTERNAL_RE = re.compile(rb"^x-mailrelay-class[ \t]*:", re.IGNORECASE | re.MULTILINE)


# -- helpers ------------------------------------------------------------------------------------


@dataclass
class Relay:
    config: Path
    daemon: DaemonProcess

    @property
    def port(self) -> int:
        return self.daemon.port

    @property
    def database(self) -> Path:
        return self.config.parent / "mailrelay.db"


StartRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def relays(tmp_path: Path) -> AsyncIterator[StartRelay]:
    """Start ``mailrelay run`` with a config (sections merged in); each must stop with exit 0."""
    started: list[DaemonProcess] = []

    async def start(upstream_port: int, **sections: Any) -> Relay:
        config = write_config(tmp_path, upstream_port, **sections)
        daemon = DaemonProcess(config)
        started.append(daemon)
        await daemon.astart()
        return Relay(config, daemon)

    yield start
    for daemon in started:
        assert await daemon.astop() == 0, daemon.output()


async def cli(relay: Relay, *args: str) -> tuple[int, str, str]:
    """``mailrelay ARGS -c CONFIG`` (the console script's main(), run in a worker thread to save a
    Python start-up per call): exit status, stdout, stderr."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli_main([*args, "-c", str(relay.config)])
            except SystemExit as exc:
                code = int(exc.code or 0)
        return code, out.getvalue(), err.getvalue()

    return await asyncio.to_thread(run)


async def cli_json(relay: Relay, *args: str) -> Any:
    code, out, err = await cli(relay, *args, "--json")
    assert code == 0, err
    return json.loads(out)


async def block(relay: Relay, *addresses: str) -> str:
    code, out, err = await cli(relay, "blocklist", "add", *addresses)
    assert code == 0, err
    return out


def submit(port: int, raw: bytes, rcpts: list[str]) -> tuple[int, str]:
    """One SMTP transaction as a mail client makes it; the final reply (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as client:
        client.ehlo()
        assert client.mail(SELLER)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(raw)
        return code, text.decode()


async def asubmit(relay: Relay, raw: bytes, rcpts: list[str]) -> tuple[int, str]:
    return await asyncio.to_thread(submit, relay.port, raw, rcpts)


def queue_id(reply: tuple[int, str]) -> str:
    match = QUEUED_RE.fullmatch(reply[1])
    assert reply[0] == 250 and match, reply
    return match[1]


def without_received(data: bytes) -> bytes:
    """The message as the relay got it: the first header field (our Received:) split off."""
    assert data.startswith(b"Received: "), data[:80]
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end:end + 1] not in (b" ", b"\t"):
            assert not INTERNAL_RE.search(data.split(b"\r\n\r\n", 1)[0])
            return data[end:]


def with_header(raw: bytes, field: bytes) -> bytes:
    """``raw`` with ``field`` (CRLF-terminated) inserted after its first header line."""
    first = raw.index(b"\r\n") + 2
    return raw[:first] + field + raw[first:]


def with_to(raw: bytes, to: str) -> bytes:
    return re.sub(rb"(?m)^To: .*\r\n", f"To: {to}\r\n".encode(), raw, count=1)


async def arrived(sink: Sink, count: int) -> list[Received]:
    """The first ``count`` messages at the sink; none may carry an internal header."""
    got = await sink.wait_for(count)
    for message in got:
        without_received(message.data)
    return got[:count]


async def marker(relay: Relay, sink: Sink) -> None:
    """Relay one more message and wait for it: whatever was dropped before it has had its chance
    to arrive too (the queue is checked separately)."""
    before = len(sink.messages)
    raw = (f"From: {SELLER}\r\nTo: {COLLEAGUE}\r\nSubject: marker\r\n"
           f"Message-ID: <marker-{time.monotonic_ns()}@northwind-outdoor.example>\r\n\r\n"
           "marker\r\n").encode()
    queue_id(await asubmit(relay, raw, [COLLEAGUE]))
    await arrived(sink, before + 1)
    await asyncio.sleep(0.3)  # a straggler from the second worker would show up now


def subjects(messages: list[Received]) -> list[str]:
    return [str(message_from_bytes(m.data)["Subject"]) for m in messages]


async def audit_for(relay: Relay, recipient: str) -> list[dict[str, Any]]:
    return [r for r in await cli_json(relay, "audit") if r["recipient"] == recipient]


def body(message: Message) -> str:
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


# -- dropping non-critical mail ------------------------------------------------------------------


@pytest.mark.parametrize("on_drop", ["reject", "discard"])
async def test_feedback_request_to_opted_out_buyer_is_dropped(
    on_drop: str, tmp_path: Path, sink: Sink, relays: StartRelay
) -> None:
    """reject: the client sees 550 5.7.1 naming the buyer and rule; discard: 250; never sent,
    audited, and `mailrelay classify` predicted exactly what the daemon did."""
    relay = await relays(sink.port, policy={"on_drop": on_drop})
    await block(relay, BUYER)
    eml = tmp_path / "feedback.eml"
    eml.write_bytes(FEEDBACK)
    (predicted,) = await cli_json(relay, "classify", str(eml))

    code, text = await asubmit(relay, FEEDBACK, [BUYER])

    if on_drop == "reject":
        assert code == 550
        assert text.startswith("5.7.1 ")
        assert BUYER in text and "builtin:feedback-request" in text
    else:
        assert (code, text) == (250, "2.0.0 Ok: accepted")
    (record,) = await audit_for(relay, BUYER)
    assert record["action"] == on_drop
    assert record["message_id"] == "<fb-req-113-4829371-5562918.1711@northwind-outdoor.example>"
    for key in ("class", "rule", "action", "mode", "reason"):
        assert record[key] == predicted[key], key
    assert (record["class"], record["rule"]) == ("non-critical", "builtin:feedback-request")
    assert await cli_json(relay, "queue", "list", "--all") == []
    await marker(relay, sink)
    assert subjects(sink.messages) == ["marker"]


async def test_quarantined_message_is_held_then_released_and_audited(
    sink: Sink, relays: StartRelay
) -> None:
    """quarantine: 250, listed by `quarantine list`, not sent until `quarantine release`, then
    delivered unchanged; both steps are in the audit log."""
    relay = await relays(sink.port, policy={"on_drop": "quarantine"})
    await block(relay, BUYER)

    held = queue_id(await asubmit(relay, FEEDBACK, [BUYER]))

    (listed,) = await cli_json(relay, "quarantine", "list")
    assert listed["id"] == held and listed["state"] == "quarantined"
    assert [(r["rcpt"], r["state"]) for r in listed["recipients"]] == [(BUYER, "quarantined")]
    await marker(relay, sink)
    assert subjects(sink.messages) == ["marker"]

    code, out, err = await cli(relay, "quarantine", "release", held)
    assert code == 0, err
    assert held in out
    (_, released) = await arrived(sink, 2)
    assert released.rcpts == [BUYER]
    assert without_received(released.data) == FEEDBACK
    assert (await cli_json(relay, "queue", "show", held))["state"] == "sent"
    actions = [(r["action"], r["queue_id"]) for r in await cli_json(relay, "audit")
               if r["queue_id"] == held]
    assert actions == [("quarantine", held), ("release", held)]


async def test_per_recipient_colleague_and_buyer_not_opted_out_get_it_byte_for_byte(
    sink: Sink, relays: StartRelay
) -> None:
    """To an opted-out buyer and a colleague: only the colleague gets it. To a buyer who has not
    opted out and a non-buyer: both get the very bytes sent, plus one Received: on top."""
    relay = await relays(sink.port)
    await block(relay, BUYER)

    first = await asubmit(relay, FEEDBACK, [BUYER, COLLEAGUE])
    await arrived(sink, 1)
    second = await asubmit(relay, FEEDBACK, [OTHER_BUYER, SELLER])
    got = await arrived(sink, 2)

    assert first[0] == second[0] == 250
    assert [m.rcpts for m in got] == [[COLLEAGUE], [OTHER_BUYER, SELLER]]
    assert all(without_received(m.data) == FEEDBACK for m in got)
    (dropped,) = await audit_for(relay, BUYER)
    assert dropped["action"] == "discard"  # one SMTP reply covers both: a 550 would refuse both
    assert "discarded, not rejected" in dropped["reason"]
    (delivered,) = await audit_for(relay, OTHER_BUYER)
    assert delivered["action"] == "deliver"
    await marker(relay, sink)
    assert len(sink.messages) == 3


# -- critical mail and threading ----------------------------------------------------------------


async def test_reply_to_opted_out_buyers_question_arrives_once_on_its_thread(
    sink: Sink, relays: StartRelay
) -> None:
    """A reply to an opted-out buyer who asked a question arrives once, with In-Reply-To and
    References naming the question, its commMgrTok token and the question quoted."""
    relay = await relays(sink.port)
    store = await Store.open(relay.database)
    try:  # what the IMAP poller does when the buyers' questions reach the seller's mailbox
        for raw in (QUESTION, QUESTION_MODERN):
            finding = detect(raw)
            assert (await apply_finding(store, finding, message_key(finding, raw),
                                        time.time())).recorded
    finally:
        await store.close()
    await block(relay, BUYER, BUYER_MODERN)

    # Sample 15 answers the modern question; sent to the classic question's buyer, it must be
    # put on that buyer's thread. To its own buyer it already is, and goes out unchanged.
    assert (await asubmit(relay, with_to(REPLY, BUYER), [BUYER]))[0] == 250
    (tagged,) = await arrived(sink, 1)
    assert (await asubmit(relay, REPLY, [BUYER_MODERN]))[0] == 250
    (_, as_is) = await arrived(sink, 2)
    await marker(relay, sink)

    assert [m.rcpts for m in sink.messages] == [[BUYER], [BUYER_MODERN], [COLLEAGUE]]
    message = message_from_bytes(tagged.data)
    assert message["In-Reply-To"] == QUESTION_ID
    assert QUESTION_ID in message["References"].split()
    text = body(message)
    assert "[commMgrTok:A3QX7RZ2M9KT5]" in text
    assert "> Hi, does the lantern come with batteries? I need it before Saturday." in text
    assert "re-attempt delivery to Apt 4B" in text  # the seller's own words are all still there
    assert "[important]" not in message["Subject"].lower()
    assert without_received(as_is.data) == REPLY
    (classic,) = await audit_for(relay, BUYER)
    assert (classic["class"], classic["action"]) == ("critical", "tag_and_deliver")
    (modern,) = await audit_for(relay, BUYER_MODERN)
    assert (modern["rule"], modern["action"]) == ("thread:reply", "tag_and_deliver")
    assert QUESTION_MODERN_ID in modern["reason"]


async def test_trusted_class_header_is_honoured_and_stripped_and_opted_out_orders_count(
    sink: Sink, relays: StartRelay
) -> None:
    """X-Mailrelay-Class from a loopback client makes a feedback request critical and is removed
    before delivery; mail naming an order Amazon reported opted out is treated as opted out even
    though its buyer is not on the blocklist (yet: critical mail to them resolves the order)."""
    relay = await relays(sink.port)
    await block(relay, BUYER)

    marked = with_header(FEEDBACK, b"X-Mailrelay-Class: critical\r\n")
    assert (await asubmit(relay, marked, [BUYER]))[0] == 250
    (got,) = await arrived(sink, 1)
    assert without_received(got.data) == FEEDBACK
    (record,) = await audit_for(relay, BUYER)
    assert (record["class"], record["rule"], record["action"]) == (
        "critical", "header:X-Mailrelay-Class", "deliver")

    order = "402-7777777-1234567"
    store = await Store.open(relay.database)
    try:  # Amazon's notice for an order whose buyer mailrelay has never seen
        assert await store.optout.apply_notice(order, "<notice-402@amazon.com>", None,
                                               time.time()) == []
    finally:
        await store.close()
    code, text = await asubmit(relay, FEEDBACK.replace(ORDER.encode(), order.encode()),
                               [OTHER_BUYER])
    assert code == 550 and OTHER_BUYER in text
    (refused,) = await audit_for(relay, OTHER_BUYER)
    assert refused["action"] == "reject"
    assert f"names opted-out order {order}" in refused["reason"]
    assert OTHER_BUYER not in [e["buyer_key"] for e in await cli_json(relay, "blocklist", "list")]

    critical = with_to(DELIVERY_ISSUE.replace(ORDER.encode(), order.encode()), OTHER_BUYER)
    assert (await asubmit(relay, critical, [OTHER_BUYER]))[0] == 250
    (_, delivered) = await arrived(sink, 2)
    assert delivered.rcpts == [OTHER_BUYER]
    entries = {e["buyer_key"]: e for e in await cli_json(relay, "blocklist", "list")}
    assert order in entries[OTHER_BUYER]["evidence"]


async def test_internal_headers_never_reach_the_upstream(sink: Sink, relays: StartRelay) -> None:
    """X-Mailrelay-Class in any spelling, folded, repeated or invalid is removed on every path:
    mail to no buyer, to a buyer, and thread-tagged mail; nothing else changes."""
    relay = await relays(sink.port)
    store = await Store.open(relay.database)
    try:
        finding = detect(QUESTION)
        await apply_finding(store, finding, message_key(finding, QUESTION), time.time())
    finally:
        await store.close()
    fields = (b"x-mailrelay-class: critical\r\n"
              b"X-MAILRELAY-CLASS :\r\n\tnon-critical\r\n"
              b"X-Mailrelay-Class: urgent please\r\n")
    plain = with_header(FEEDBACK, fields)
    reply = with_header(with_to(REPLY, BUYER), fields)
    cases = [(plain, [COLLEAGUE]), (plain, [OTHER_BUYER]), (reply, [BUYER])]

    for raw, rcpts in cases:
        assert (await asubmit(relay, raw, rcpts))[0] == 250
    got = await arrived(sink, len(cases))

    by_rcpt = {m.rcpts[0]: without_received(m.data) for m in got}
    assert by_rcpt[COLLEAGUE] == by_rcpt[OTHER_BUYER] == FEEDBACK
    assert not re.search(rb"(?i)x-mailrelay", by_rcpt[BUYER])
    assert message_from_bytes(by_rcpt[BUYER])["In-Reply-To"] == QUESTION_ID


# -- monitor mode and opt-outs learnt while mail waits -------------------------------------------


async def test_monitor_mode_delivers_everything_and_audits_what_enforce_would_do(
    sink: Sink, relays: StartRelay
) -> None:
    """policy.mode monitor: mail to an opted-out buyer is delivered unchanged and the audit log
    says it would have been rejected (alone) or discarded (with a colleague)."""
    relay = await relays(sink.port, policy={"mode": "monitor", "on_drop": "reject"})
    await block(relay, BUYER)

    assert (await asubmit(relay, FEEDBACK, [BUYER]))[0] == 250
    assert (await asubmit(relay, MARKETING, [BUYER, COLLEAGUE]))[0] == 250
    got = await arrived(sink, 2)

    assert sorted(len(m.rcpts) for m in got) == [1, 2]
    sent = {len(m.rcpts): without_received(m.data) for m in got}
    assert sent == {1: FEEDBACK, 2: MARKETING}
    feedback, marketing = await audit_for(relay, BUYER)
    assert all(r["action"] == "deliver" and r["mode"] == "monitor"
               for r in (feedback, marketing))
    assert "monitor mode, would reject" in feedback["reason"]
    assert marketing["rule"] == "builtin:marketing"
    assert "enforce would discard" in marketing["reason"]


async def test_queued_noncritical_mail_is_cancelled_when_the_buyer_opts_out(
    relays: StartRelay
) -> None:
    """Upstream down: a feedback request and a critical message to one buyer wait in the queue.
    `blocklist add` cancels the feedback request; when the upstream is back only the critical
    one arrives."""
    port = free_port()  # nothing listens yet: the upstream is unreachable
    relay = await relays(port, queue={"retry_initial": "30s", "retry_max": "60s"})
    feedback = queue_id(await asubmit(relay, FEEDBACK, [BUYER]))
    critical = queue_id(await asubmit(relay, DELIVERY_ISSUE, [BUYER]))

    async def deferred() -> bool:
        listed = await cli_json(relay, "queue", "list")
        return sorted((m["id"], m["state"]) for m in listed if m["attempts"] >= 1) == sorted(
            [(feedback, "deferred"), (critical, "deferred")])

    deadline = time.monotonic() + 15
    while not await deferred():
        assert time.monotonic() < deadline, "the first attempts did not fail"
        await asyncio.sleep(0.1)

    out = await block(relay, BUYER)
    assert "cancelled 1 queued non-critical message(s)" in out
    cancelled = await cli_json(relay, "queue", "show", feedback)
    assert cancelled["state"] == "cancelled"
    assert [(r["rcpt"], r["state"]) for r in cancelled["recipients"]] == [(BUYER, "cancelled")]
    waiting = await cli_json(relay, "queue", "show", critical)
    assert [(r["rcpt"], r["class"], r["state"]) for r in waiting["recipients"]] == [
        (BUYER, "critical", "deferred")]

    sink = await Sink().start(port)
    try:
        code, out, err = await cli(relay, "queue", "retry", "--all")
        assert (code, out.strip()) == (0, "1 message(s) due now"), err
        (got,) = await arrived(sink, 1)
        await marker(relay, sink)
        assert subjects(sink.messages) == [
            "Additional Information Required - Order 113-4829371-5562918", "marker"]
        assert without_received(got.data) == DELIVERY_ISSUE
    finally:
        await sink.stop()
    assert (await cli_json(relay, "queue", "show", feedback))["state"] == "cancelled"
    assert [r["action"] for r in await cli_json(relay, "audit")
            if r["queue_id"] == feedback] == ["deliver", "cancel"]


class SlowFirstData(SinkHandler):
    """An upstream that, the first time, holds its DATA reply until told and then answers 451:
    the message stays in state `sending` for as long as the test needs."""

    def __init__(self) -> None:
        super().__init__()
        self.in_data = asyncio.Event()
        self.answer = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.in_data.is_set():
            self.in_data.set()
            await self.answer.wait()
            return "451 4.3.0 Try again later"
        return await super().handle_DATA(server, session, envelope)


async def test_opt_out_during_a_deferred_attempt_still_cancels(relays: StartRelay) -> None:
    """A buyer who opts out while their non-critical message is being tried (and deferred)
    never gets it: the retry must not send it."""
    sink = Sink()
    sink.handler = SlowFirstData()
    await sink.start()
    try:
        relay = await relays(sink.port, queue={"retry_initial": "1s", "retry_max": "1s"})
        feedback = queue_id(await asubmit(relay, FEEDBACK, [BUYER]))
        async with asyncio.timeout(10):
            await sink.handler.in_data.wait()

        out = await block(relay, BUYER)
        sink.handler.answer.set()
        await marker(relay, sink)
        await asyncio.sleep(2)  # the retry is due after about a second

        assert subjects(sink.messages) == ["marker"]
        assert "cancelled 1 queued non-critical message(s)" in out
        assert (await cli_json(relay, "queue", "show", feedback))["state"] == "cancelled"
    finally:
        await sink.stop()
