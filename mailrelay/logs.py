"""Logging: structlog events, JSON lines for journald, a readable console on a TTY.

The stdlib loggers of aiosmtpd (``mail.log``) and aioimaplib go through the same renderer, so
an operator reads one format. A JSON line starts with ``<N>`` (the syslog priority) because
journald reads that prefix as the line's level. Secrets never reach a log line: known secret keys
are masked by a processor, whatever a call site passes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

SECRET_KEYS = frozenset({"password", "secret", "auth_data", "token_secret", "login_data"})
# Tracebacks without local variables: locals may hold passwords or message bodies.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _mask_secrets(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in SECRET_KEYS.intersection(event_dict):
        event_dict[key] = "********"
    return event_dict


class _DropLegacyNoise(logging.Filter):
    """aiosmtpd 1.4 warns about its own deprecated ``Session.login_data`` on every AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")


_LEGACY_FILTER = _DropLegacyNoise()


class _JournalFormatter(structlog.stdlib.ProcessorFormatter):
    """Prefix each JSON line with its syslog priority for journald."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"<{_SYSLOG_PRIORITY.get(record.levelname.lower(), 6)}>{line}"


def setup_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger; safe to call again (reload)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        _mask_secrets,
    ]
    if fmt == "json":
        formatter: logging.Formatter = _JournalFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _TRACEBACKS,
                structlog.processors.JSONRenderer(ensure_ascii=False),
            ],
        )
    else:
        formatter = structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.dev.ConsoleRenderer(colors=stream.isatty()),
            ],
        )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every connect and EOF at INFO; aioimaplib logs protocol lines at DEBUG.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
    if _LEGACY_FILTER not in logging.getLogger("mail.log").filters:
        logging.getLogger("mail.log").addFilter(_LEGACY_FILTER)
    logging.getLogger("aioimaplib").setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger named like the stdlib ones (``mailrelay.smtp``)."""
    return structlog.get_logger(name)
