"""The relay end to end: `mailrelay run` as a subprocess, real SMTP clients, a real sink.

Every test talks to the daemon over 127.0.0.1 on free ports, the way a mail client would
(smtplib, aiosmtplib, raw sockets, swaks), and checks what a user checks: the SMTP replies,
what arrives at the upstream sink byte for byte, and what `mailrelay queue` reports.
Shared helpers are in relay_helpers.py; the `daemons` fixture is in conftest.py.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from daemon_helpers import ROOT, DaemonProcess, write_config
from relay_helpers import (
    CLIENT_NAME,
    QUEUED_RE,
    SENDER,
    RawClient,
    asubmit,
    cli,
    events,
    message,
    queue_id,
    queue_json,
    start,
    wait_until,
    without_received,
)
from sink import Sink, free_port

# -- the trial config ------------------------------------------------------------------------


async def test_trial_config_queues_into_outbox_and_queue_cli_knows_it(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """config.example.yaml as-is (but a free port): mail lands in ./outbox/new, the CLI knows it."""
    port = free_port()
    text = (ROOT / "config.example.yaml").read_text()
    text = text.replace('listen: ["127.0.0.1:2525"]', f'listen: ["127.0.0.1:{port}"]')
    assert f"127.0.0.1:{port}" in text
    config = tmp_path / "config.yaml"
    config.write_text(text)
    daemon = DaemonProcess(config, cwd=tmp_path)
    daemons.append(daemon)
    await asyncio.to_thread(daemon.start)

    raw = message("trial")
    code, reply = await asubmit(port, raw, ["friend@example.test"])
    assert code == 250
    qid = queue_id(reply)
    new = tmp_path / "outbox" / "new"
    files = await wait_until(lambda: list(new.glob("*")) if new.is_dir() else [])
    assert len(files) == 1
    received, rest = without_received(files[0].read_bytes())
    assert rest == raw and f"id {qid}".encode() in received
    assert (tmp_path / "mailrelay.db").exists()

    listing = await cli(config, "queue", "list", "--all", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(qid))
    assert " sent " in row and "friend@example.test" in row
    shown = await cli(config, "queue", "show", qid, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"state: sent", shown.stdout)
    assert "recipient: friend@example.test [sent]" in shown.stdout
    assert await daemon.astop() == 0


# -- byte-exact relaying ---------------------------------------------------------------------

SIGNED = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=shop.test; s=sel2024;\r\n"
    b"\tt=1700000000; h=from:to:subject:date:message-id:mime-version;\r\n"
    b"\tbh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
    b"\tb=c2lnbmF0dXJlIGJ5dGVzIHRoYXQgYSByZWZvbGRpbmcgcmVsYXkgd291bGQgYnJlYWs=\r\n"
    b"From: Seller Shop <seller@shop.test>\r\n"
    b"To: Someone <someone@example.test>\r\n"
    b"Subject: =?utf-8?q?Your_order_=E2=80=93_caf=C3=A9_mugs?= and a subject long enough\r\n"
    b"   to be folded twice, with odd    spacing that must survive\r\n"
    b"\tas it is\r\n"
    b"References: <a-very-long-message-id-0001@shop.test>"
    b" <a-very-long-message-id-0002@shop.test>\r\n"
    b" <a-very-long-message-id-0003@shop.test>\r\n"
    b"Message-ID: <byte-exact-1@shop.test>\r\n"
    b"Date: Tue, 07 May 2024 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    + "Grüße aus Köln, 8-bit: é ü € ✓\r\n".encode()
    + b"trailing blanks   \r\n"
    b"\tleading tab\r\n"
    b"\r\n"
    b"last line without a dot\r\n"
)


async def test_delivery_is_byte_for_byte_plus_received(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """smtplib and aiosmtplib submissions reach the sink unchanged but for one Received: on top."""
    daemon = await start(daemons, write_config(tmp_path, sink.port))
    code, reply = await asubmit(daemon.port, SIGNED, ["someone@example.test"],
                                options=("BODY=8BITMIME",))
    assert code == 250
    first = queue_id(reply)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, local_hostname=CLIENT_NAME,
                               start_tls=False) as client:
        errors, reply = await client.sendmail(SENDER, ["other@example.test"], SIGNED,
                                              mail_options=["BODY=8BITMIME"])
    assert errors == {}
    second = queue_id(reply)
    got = await sink.wait_for(2)
    by_rcpt = {m.rcpts[0]: m for m in got}
    for rcpt, qid in (("someone@example.test", first), ("other@example.test", second)):
        received, rest = without_received(by_rcpt[rcpt].data)
        assert rest == SIGNED
        assert by_rcpt[rcpt].mail_from == SENDER
        assert received.startswith(f"Received: from {CLIENT_NAME} ([127.0.0.1])".encode())
        assert f"by relay.test (mailrelay) with ESMTP id {qid}".encode() in received
        assert f"for <{rcpt}>".encode() in received
    assert await daemon.astop() == 0


# -- TLS and AUTH ----------------------------------------------------------------------------

PASSWORD = "correct horse battery"  # a throw-away test password


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def auth_config(tmp_path: Path, ca: trustme.CA, sink: Sink) -> tuple[Path, int, int]:
    """auth.required, a STARTTLS listener and an implicit-TLS one; users made by the CLI."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    starttls, implicit = free_port(), free_port()
    config = write_config(
        tmp_path, sink.port,
        smtp={"listen": [f"127.0.0.1:{starttls}", {"address": f"127.0.0.1:{implicit}",
                                                    "tls": "implicit"}],
              "tls": {"mode": "starttls", "cert": str(tmp_path / "cert.pem"),
                      "key": str(tmp_path / "key.pem")},
              "auth": {"required": True, "users_file": str(tmp_path / "users")}},
    )
    for user, senders in (("seller@shop.test", None), ("helpdesk", "@shop.test")):
        args = ["passwd", user, "--stdin", *(["--senders", senders] if senders else [])]
        made = await cli(config, *args, stdin=PASSWORD + "\n")
        assert made.returncode == 0, made.stderr
        assert f"added user {user}" in made.stdout
    assert PASSWORD not in (tmp_path / "users").read_text()
    return config, starttls, implicit


def auth_session(port: int, context: ssl.SSLContext, *, tls: str, mechanism: str | None,
                 user: str, password: str, mail_from: str) -> list[int]:
    """Connect (STARTTLS / implicit / none), AUTH, MAIL; the reply codes seen, in order."""
    codes = []
    if tls == "implicit":
        client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, local_hostname=CLIENT_NAME,
                                                context=context, timeout=20)
    else:
        client = smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=20)
    with client:
        client.ehlo()
        if tls == "starttls":
            codes.append(client.starttls(context=context)[0])
            client.ehlo()
        if mechanism is not None:
            client.user, client.password = user, password
            auth = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}[mechanism]
            try:
                codes.append(client.auth(mechanism, auth)[0])
            except smtplib.SMTPAuthenticationError as exc:
                codes.append(exc.smtp_code)
        codes.append(client.mail(mail_from)[0])
        if codes[-1] == 250:
            codes.append(client.rcpt("someone@example.test")[0])
            codes.append(client.data(message("authenticated"))[0])
    return codes


AUTH_CASES = [
    # (tls, mechanism, user, password, mail_from, expected reply codes)
    ("starttls", "PLAIN", "seller@shop.test", PASSWORD, SENDER, [220, 235, 250, 250, 250]),
    ("starttls", "LOGIN", "seller@shop.test", PASSWORD, SENDER, [220, 235, 250, 250, 250]),
    ("implicit", "PLAIN", "helpdesk", PASSWORD, "support@shop.test", [235, 250, 250, 250]),
    ("implicit", "LOGIN", "seller@shop.test", PASSWORD, SENDER, [235, 250, 250, 250]),
    ("starttls", "PLAIN", "seller@shop.test", "wrong password", SENDER, [220, 535, 530]),
    ("implicit", "LOGIN", "seller@shop.test", "wrong password", SENDER, [535, 530]),
    ("starttls", "PLAIN", "nobody", PASSWORD, SENDER, [220, 535, 530]),
    ("starttls", None, "", "", SENDER, [220, 530]),  # auth.required: no AUTH, no relay
    ("none", None, "", "", SENDER, [530]),
    ("starttls", "PLAIN", "seller@shop.test", PASSWORD, "ceo@shop.test", [220, 235, 553]),
    ("implicit", "LOGIN", "helpdesk", PASSWORD, "someone@elsewhere.test", [235, 553]),
]


async def test_tls_listeners_auth_required_and_enforced_sender(
    tmp_path: Path, ca: trustme.CA, client_tls: ssl.SSLContext, sink: Sink,
    daemons: list[DaemonProcess],
) -> None:
    """STARTTLS and implicit TLS with AUTH PLAIN/LOGIN: right password relays, others refused."""
    config, starttls, implicit = await auth_config(tmp_path, ca, sink)
    await start(daemons, config)
    for tls, mechanism, user, password, mail_from, expected in AUTH_CASES:
        port = implicit if tls == "implicit" else starttls
        codes = await asyncio.to_thread(auth_session, port, client_tls, tls=tls,
                                        mechanism=mechanism, user=user, password=password,
                                        mail_from=mail_from)
        assert codes == expected, (tls, mechanism, user, mail_from)
    delivered = await sink.wait_for(4)
    await asyncio.sleep(0.3)
    assert len(sink.messages) == 4
    assert {m.mail_from for m in delivered} == {SENDER, "support@shop.test"}
    assert all(b"with ESMTPSA id" in without_received(m.data)[0] for m in delivered)
    failures = events(daemons[0], "auth_failed")
    assert failures and all(PASSWORD not in json.dumps(e) for e in failures)
    assert "wrong password" not in daemons[0].output()


async def test_auth_on_loopback_without_tls(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """A plain loopback listener offers AUTH (no TLS needed there) and relays after it."""
    config = write_config(tmp_path, sink.port,
                          smtp={"auth": {"required": True, "users_file": str(tmp_path / "u")}})
    made = await cli(config, "passwd", "seller@shop.test", "--stdin", stdin=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    daemon = await start(daemons, config)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, start_tls=False) as client:
        await client.ehlo()
        assert "auth" in client.esmtp_extensions
        assert set(client.supported_auth_methods) >= {"plain", "login"}
        await client.login("seller@shop.test", PASSWORD)
        errors, reply = await client.sendmail(SENDER, ["someone@example.test"], message())
    assert errors == {} and QUEUED_RE.fullmatch(reply)
    (got,) = await sink.wait_for(1)
    assert b"with ESMTPA id" in without_received(got.data)[0]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_starttls_auth_login(
    tmp_path: Path, ca: trustme.CA, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """swaks (a third-party client) submits over verified STARTTLS with AUTH LOGIN."""
    config, starttls, _ = await auth_config(tmp_path, ca, sink)
    await start(daemons, config)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    env = {**os.environ, "SWAKS_OPT_auth_password": PASSWORD}  # not on the command line
    result = await asyncio.to_thread(subprocess.run, [
        "swaks", "--server", f"127.0.0.1:{starttls}", "--helo", CLIENT_NAME,
        "--from", SENDER, "--to", "someone@example.test", "--tls", "--tls-verify",
        "--tls-ca-path", str(tmp_path / "ca.pem"), "--auth", "LOGIN",
        "--auth-user", "seller@shop.test", "--header", "Subject: via swaks",
        "--timeout", "20",
    ], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<~  250 2\.0\.0 Ok: queued as [0-9A-F]+", result.stdout)
    (got,) = await sink.wait_for(1)
    assert b"Subject: via swaks" in got.data


async def test_relay_refused_outside_allowed_networks(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """A client outside allowed_networks without AUTH may not relay: 554 5.7.1, nothing queued."""
    config = write_config(tmp_path, sink.port, smtp={"allowed_networks": ["10.9.9.0/24"]})
    daemon = await start(daemons, config)
    code, reply = await asubmit(daemon.port, message(), ["someone@example.test"])
    assert (code, reply) == (554, "5.7.1 Relay access denied: authenticate first")
    assert await queue_json(config) == []
    assert events(daemon, "relay_denied")[0]["peer"] == "127.0.0.1"


async def test_open_relay_config_exits_78_before_binding(tmp_path: Path) -> None:
    """A 0.0.0.0 listener with neither TLS nor AUTH is refused at start (78, clear message)."""
    port = free_port()
    config = write_config(tmp_path, smtp={"listen": [f"0.0.0.0:{port}"]})
    # Hold the port on loopback: a daemon that tried to bind 0.0.0.0 would fail with
    # EADDRINUSE (exit 69), so exit 78 proves the refusal came first.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "mailrelay", "run", "-c", str(config)],
            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 78
    assert "open relay" in result.stderr and f"0.0.0.0:{port}" in result.stderr
    assert "started" not in result.stdout and "listen_failed" not in result.stdout


# -- bare newlines ---------------------------------------------------------------------------

INJECTION = (b"From: seller@shop.test\r\nTo: someone@example.test\r\n"
             b"Subject: hi\nX-Evil: 1\r\nX-Mailrelay-Class: critical\n"
             b"Message-ID: <bare@shop.test>\r\n\r\nbody\n.\nafter a bare dot line\r\n")


async def test_bare_lf_is_rejected_and_nothing_relayed(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """bare_newline: reject (default): a bare-LF header injection gets 550 5.6.2, nothing leaves."""
    config = write_config(tmp_path, sink.port)
    daemon = await start(daemons, config)
    client = await RawClient.connect(daemon.port)
    await client.open_transaction(["someone@example.test"])
    assert (await client.command(INJECTION + b".")).startswith("550 5.6.2")
    assert (await client.command(b"NOOP")).startswith("250")  # the session goes on
    client.close()
    await asyncio.sleep(0.5)
    assert sink.messages == []
    assert await queue_json(config) == []


async def test_bare_lf_normalized_is_what_every_parser_reads(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """bare_newline: normalize: the sink gets CRLF only; relay and upstream see the same headers."""
    # Header injection needs two readers that disagree about where a header ends (the relay's
    # policy versus the upstream). After normalisation both read ``X-Evil: 1`` as a header of
    # the client's own message, and the internal ``X-Mailrelay-Class`` hidden behind a bare LF
    # is seen by the relay as the header it is, so it is removed before relaying as always.
    config = write_config(tmp_path, sink.port, smtp={"bare_newline": "normalize"})
    daemon = await start(daemons, config)
    client = await RawClient.connect(daemon.port)
    await client.open_transaction(["someone@example.test"])
    reply = await client.command(INJECTION + b".")
    client.close()
    qid = queue_id(reply.strip()[4:])
    (got,) = await sink.wait_for(1)
    _, data = without_received(got.data)
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(data, policy=email.policy.SMTP)
    assert parsed["Subject"] == "hi" and parsed["X-Evil"] == "1"
    assert parsed["X-Mailrelay-Class"] is None  # the relay saw it as a header and removed it
    assert parsed.get_content() == "body\r\n.\r\nafter a bare dot line\r\n"
    assert f"id {qid}".encode() in got.data


# -- size and count limits -------------------------------------------------------------------


def size_session(port: int, limit: int) -> list[tuple[int, str]]:
    """EHLO, a too-big SIZE=, an oversize DATA, then a good message on the same connection."""
    seen = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=20) as client:
        code, _ = client.ehlo()
        seen.append((code, client.esmtp_features.get("size", "")))
        code, text = client.mail(SENDER, [f"SIZE={limit + 1}"])
        seen.append((code, text.decode()))
        client.rset()
        client.mail(SENDER)
        client.rcpt("someone@example.test")
        code, text = client.data(message(body=b"x" * 70 + b"\r\n") * (limit // 100))
        seen.append((code, text.decode()))
        seen.append(client.noop())
        client.mail(SENDER, [f"SIZE={limit}"])
        client.rcpt("someone@example.test")
        code, text = client.data(message("fits"))
        seen.append((code, text.decode()))
    return seen


async def test_size_limit_advertised_and_enforced(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """SIZE = max_message_size; SIZE= too big and DATA too big get 552; the session goes on."""
    config = write_config(tmp_path, sink.port, smtp={"max_message_size": "20KiB"})
    daemon = await start(daemons, config)
    seen = await asyncio.to_thread(size_session, daemon.port, 20480)
    assert seen[0] == (250, "20480")
    assert seen[1][0] == 552 and seen[2][0] == 552
    assert seen[3][0] == 250
    assert seen[4][0] == 250 and QUEUED_RE.fullmatch(seen[4][1])
    (got,) = await sink.wait_for(1)
    assert b"Subject: fits" in got.data
    assert len(await queue_json(config)) == 1  # the oversize message was never stored


async def admitted(port: int) -> RawClient:
    """A connection that got its 220 (DaemonProcess's port probe may still hold a slot)."""
    for _ in range(40):
        client = await RawClient.connect(port)
        if (await client.reply()).startswith("220"):
            return client
        client.close()
        await asyncio.sleep(0.05)
    raise AssertionError("never admitted")


async def test_max_connections_and_max_recipients(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """Past max_connections a client gets 421; a recipient past max_recipients gets 452."""
    config = write_config(tmp_path, sink.port,
                          smtp={"max_connections": 2, "max_recipients": 3})
    daemon = await start(daemons, config)
    first, second = await admitted(daemon.port), await admitted(daemon.port)
    third = await RawClient.connect(daemon.port)
    assert (await third.reply()).startswith("421 4.7.0")
    assert await third.reply() == ""  # and closed
    third.close()
    assert (await first.command(b"EHLO " + CLIENT_NAME.encode())).startswith("250")
    assert (await first.command(f"MAIL FROM:<{SENDER}>".encode())).startswith("250")
    rcpts = [f"r{n}@example.test" for n in range(4)]
    codes = [(await first.command(f"RCPT TO:<{r}>".encode()))[:3] for r in rcpts]
    assert codes == ["250", "250", "250", "452"]
    assert (await first.command(b"DATA")).startswith("354")
    assert QUEUED_RE.fullmatch((await first.command(message() + b".")).strip()[4:])
    for client in (first, second):
        client.close()
    (got,) = await sink.wait_for(1)
    assert got.rcpts == rcpts[:3]


# -- a real storage fault --------------------------------------------------------------------


def file_size_limit(fsize: int) -> Callable[[], None]:
    """For the daemon's child process: files may not grow past ``fsize`` bytes (EFBIG).

    Python ignores SIGXFSZ, so SQLite sees a real write error, as on a full disk.
    """
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return limit


async def test_storage_failure_answers_451_and_stores_nothing(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """A write the disk refuses gets 451 4.3.0 (never 500, never 250); smaller mail still works."""
    config = write_config(tmp_path, sink.port, smtp={"max_message_size": "8MiB"})
    daemon = DaemonProcess(config, preexec_fn=file_size_limit(1024 * 1024))
    daemons.append(daemon)
    await asyncio.to_thread(daemon.start)
    big = message("big", b"y" * 998 + b"\r\n") * 2000  # ~2 MB: the WAL cannot hold it
    code, reply = await asubmit(daemon.port, big, ["someone@example.test"])
    assert code == 451 and reply.startswith("4.3.0"), reply
    assert events(daemon, "store_failed")
    code, reply = await asubmit(daemon.port, message("small"), ["someone@example.test"])
    assert code == 250, reply
    (got,) = await sink.wait_for(1)
    assert b"Subject: small" in got.data
    await asyncio.sleep(0.3)
    assert len(sink.messages) == 1
    assert [m["id"] for m in await queue_json(config)] == [queue_id(reply)]
    assert await daemon.astop() == 0


def ehlo_lines(port: int) -> dict[str, str]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=20) as client:
        client.ehlo()
        return dict(client.esmtp_features)


async def test_no_auth_advertised_without_users(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """Without a users file, EHLO does not offer AUTH (an empty AUTH line confuses clients)."""
    daemon = await start(daemons, write_config(tmp_path, sink.port))
    features = await asyncio.to_thread(ehlo_lines, daemon.port)
    assert "auth" not in features
    assert {"size", "8bitmime", "smtputf8"} <= set(features)



# -- the upstream: outages, refusals, credentials --------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt as the daemon logged it."""

    number: int
    outcome: str
    at: float  # when it was logged (just after the attempt)
    retry_at: float | None  # when the next one was scheduled


def attempts_logged(daemon: DaemonProcess) -> list[Attempt]:
    return [Attempt(e["attempt"], e["outcome"], datetime.fromisoformat(e["timestamp"]).timestamp(),
                    e["retry_at"]) for e in events(daemon, "delivery")]


async def test_upstream_down_then_up_retried_on_schedule(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Upstream down: deferred (queue list says so), retried per retry_initial/max, then sent."""
    port = free_port()  # nothing listens here yet: connection refused
    config = write_config(tmp_path, port, queue={"retry_initial": "500ms", "retry_max": "1s"})
    daemon = await start(daemons, config)
    code, reply = await asubmit(daemon.port, message("outage"), ["someone@example.test"])
    assert code == 250
    qid = queue_id(reply)
    await wait_until(lambda: len(attempts_logged(daemon)) >= 2)
    (listed,) = await queue_json(config)
    assert listed["id"] == qid and listed["state"] == "deferred" and listed["attempts"] >= 1
    assert "Connect call failed" in listed["last_error"] or "refused" in listed["last_error"]
    await wait_until(lambda: len(attempts_logged(daemon)) >= 4)
    sink = await Sink().start(port)
    try:
        (got,) = await sink.wait_for(1)
        assert b"Subject: outage" in got.data
        await wait_until(lambda: attempts_logged(daemon)[-1].outcome == "sent")
    finally:
        await sink.stop()
    attempts = attempts_logged(daemon)
    assert [a.outcome for a in attempts[:4]] == ["deferred"] * 4
    assert [a.number for a in attempts] == list(range(1, len(attempts) + 1))
    nominal = [0.5, 1.0, 1.0, 1.0, 1.0]  # retry_initial doubling, capped at retry_max
    for attempt, following, base in zip(attempts, attempts[1:], nominal, strict=False):
        assert attempt.retry_at is not None
        scheduled = attempt.retry_at - attempt.at
        assert 0.8 * base - 0.05 <= scheduled <= 1.2 * base, (attempt, base)  # ±20 % jitter
        assert attempt.retry_at <= following.at <= attempt.retry_at + 0.6  # not early, not late
    (listed,) = await queue_json(config)
    assert listed["state"] == "sent" and listed["attempts"] == len(attempts)


async def test_upstream_5xx_fails_and_queue_list_shows_why(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """A permanent refusal makes the message failed at once, listed with the upstream's words."""
    sink.handler.rcpt_default = "550 5.1.1 No such user here"
    config = write_config(tmp_path, sink.port)
    daemon = await start(daemons, config)
    code, reply = await asubmit(daemon.port, message(), ["ghost@example.test"])
    assert code == 250
    qid = queue_id(reply)
    await wait_until(lambda: events(daemon, "delivery"))
    listing = await cli(config, "queue", "list")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(qid))
    assert " failed " in row and "550 5.1.1 No such user here" in row
    shown = await cli(config, "queue", "show", qid)
    assert "recipient: ghost@example.test [failed]" in shown.stdout
    assert sink.messages == []


async def test_partial_failure_per_recipient_and_dsn_to_sender(
    tmp_path: Path, sink: Sink, daemons: list[DaemonProcess]
) -> None:
    """Recipients 250 / 550 / 451-then-250 each get their fate; one DSN names the 550 only."""
    sink.handler.rcpt_replies = {"perm@example.test": "550 5.1.1 Unknown user",
                                 "temp@example.test": "451 4.2.0 Mailbox busy, try later"}
    config = write_config(tmp_path, sink.port, queue={"bounce_to_sender": True,
                                                      "retry_initial": "500ms"})
    daemon = await start(daemons, config)
    rcpts = ["ok@example.test", "perm@example.test", "temp@example.test"]
    code, reply = await asubmit(daemon.port, message("three fates"), rcpts)
    assert code == 250
    qid = queue_id(reply)
    first, dsn = await sink.wait_for(2)
    assert first.rcpts == ["ok@example.test"]
    (entry,) = [m for m in await queue_json(config) if m["id"] == qid]
    states = {r["rcpt"]: r["state"] for r in entry["recipients"]}
    assert states == {"ok@example.test": "sent", "perm@example.test": "failed",
                      "temp@example.test": "deferred"}
    sink.handler.rcpt_replies["temp@example.test"] = "250 OK"
    third = (await sink.wait_for(3))[2]
    assert third.rcpts == ["temp@example.test"]
    assert without_received(third.data)[1] == without_received(first.data)[1]

    assert dsn.mail_from in ("", "<>") and dsn.rcpts == [SENDER]
    report = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = dsn.data.decode()
    assert "Final-Recipient: rfc822; perm@example.test" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 Unknown user" in status
    assert "temp@example.test" not in status.split("Subject: three fates")[0].split(
        "rfc822-headers")[0]
    await asyncio.sleep(0.5)
    assert len(sink.messages) == 3  # no second DSN, nothing else
    (entry,) = [m for m in await queue_json(config) if m["id"] == qid]
    assert {r["rcpt"]: r["state"] for r in entry["recipients"]} == {
        "ok@example.test": "sent", "perm@example.test": "failed", "temp@example.test": "sent"}


class AuthSink(Sink):
    """The sink, but it offers AUTH and refuses every credential."""

    async def start(self, port: int = 0) -> Sink:
        from aiosmtpd.smtp import SMTP, AuthResult

        def refuse(*_args: Any) -> AuthResult:
            return AuthResult(success=False, handled=False)

        def factory() -> SMTP:
            self.handler.connections += 1
            return SMTP(self.handler, hostname="sink.test", authenticator=refuse,
                        auth_require_tls=False)

        self.server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


async def test_upstream_auth_failure_pauses_delivery_and_keeps_mail(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Wrong upstream password: one loud error line, delivery paused, the message stays queued."""
    sink = await AuthSink().start()
    (tmp_path / "upstream.password").write_text("not-the-password\n")
    config = write_config(tmp_path, sink.port, upstream={"smtp": {
        "username": "relay@shop.test", "password_file": str(tmp_path / "upstream.password")}})
    try:
        daemon = await start(daemons, config)
        code, reply = await asubmit(daemon.port, message(), ["someone@example.test"])
        assert code == 250
        (line,) = await wait_until(lambda: events(daemon, "upstream_auth_failed"))
        assert line["level"] == "error" and "relay@shop.test" in line["error"]
        assert "password" in line["hint"] and line["paused_seconds"] >= 60
        await asyncio.sleep(1.5)  # longer than retry_initial: still no new attempt
        assert sink.handler.connections == 1 and sink.messages == []
        assert len(events(daemon, "upstream_auth_failed")) == 1
        (listed,) = await queue_json(config)
        assert listed["id"] == queue_id(reply)
        assert listed["state"] == "queued" and listed["attempts"] == 0
        assert "not-the-password" not in daemon.output()
    finally:
        await sink.stop()
