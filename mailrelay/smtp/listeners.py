"""Bind the SMTP listeners in the daemon's own event loop (never aiosmtpd's threaded Controller)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from mailrelay.config import Config, ListenAddress
from mailrelay.smtp.protocol import ConnectionLimiter, RelaySMTP
from mailrelay.smtp.server import RelayHandler


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    tls = config.smtp.tls
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


def protocol_kwargs(config: Config, listener: ListenAddress, hostname: str,
                    context: ssl.SSLContext | None, has_users: bool) -> dict[str, Any]:
    """aiosmtpd options for one listener; AUTH needs TLS except on loopback and implicit TLS."""
    smtp = config.smtp
    mode = listener.tls or smtp.tls.mode
    kwargs: dict[str, Any] = {
        "hostname": hostname,
        "ident": "mailrelay",
        "data_size_limit": smtp.max_message_size,
        "enable_SMTPUTF8": True,
        "timeout": smtp.idle_timeout,
        "command_call_limit": {"RCPT": max(smtp.max_recipients * 2, smtp.command_limit),
                               "*": smtp.command_limit},
        "auth_require_tls": mode != "implicit" and not listener.is_loopback,
        "bare_newline": smtp.bare_newline,
    }
    if mode == "starttls":
        kwargs["tls_context"] = context
        kwargs["require_starttls"] = not listener.is_loopback
    if not has_users:
        kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
    return kwargs


async def start_listeners(config: Config, handler: RelayHandler, limiter: ConnectionLimiter,
                          hostname: str, has_users: bool) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    context = server_ssl_context(config)
    servers = []
    try:
        for listener in config.smtp.listen:
            kwargs = protocol_kwargs(config, listener, hostname, context, has_users)
            implicit = (listener.tls or config.smtp.tls.mode) == "implicit"

            def factory(kw: dict[str, Any] = kwargs) -> RelaySMTP:
                return RelaySMTP(handler, connection_limiter=limiter,
                                 data_timeout=config.smtp.data_timeout, **kw)

            servers.append(await loop.create_server(
                factory, listener.host, listener.port, ssl=context if implicit else None,
                reuse_address=True, start_serving=True,
            ))
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers
