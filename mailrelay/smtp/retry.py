"""Retry schedule and reply classification for outbound delivery (pure: no I/O, no clock).

The queue worker asks three questions after every attempt: did the upstream's reply mean
sent, try again, or give up (``classify_reply``); how long to wait before the next attempt
(``next_attempt_delay``); and has the message been queued for too long (``should_expire``).
Keeping them pure lets the schedule be tested as a table and the caller supply time and
randomness.
"""

from __future__ import annotations

from typing import Literal

Outcome = Literal["sent", "deferred", "failed"]

#: Jitter spreads retries by ±20 % so that messages deferred together (an upstream outage)
#: do not all hit the upstream again in the same second.
JITTER = 0.2

# 2**62 times any sane initial delay is far beyond any maximum; stop doubling there so that a
# huge attempt counter cannot overflow a float.
_MAX_EXPONENT = 62


def next_attempt_delay(attempts: int, initial: float, maximum: float, rand: float) -> float:
    """Seconds to wait before the next attempt, after ``attempts`` attempts have failed.

    Exponential backoff ``initial * 2**(attempts-1)`` with ±20 % jitter (``rand`` in [0, 1)
    from the caller, 0.5 means no jitter), never more than ``maximum``: an operator who sets
    ``retry_max: 1h`` expects no gap longer than an hour.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be in [0, 1], got {rand}")
    if initial <= 0 or maximum < initial:
        raise ValueError(f"need 0 < initial <= maximum, got {initial}, {maximum}")
    base = initial * 2.0 ** min(attempts - 1, _MAX_EXPONENT)
    base = min(base, maximum)
    return min(base * (1.0 + JITTER * (2.0 * rand - 1.0)), maximum)


def classify_reply(code: int) -> Outcome:
    """Map a final SMTP reply code to what the queue does with the recipient.

    2xx: delivered. 5xx: permanent, bounce now. 4xx: temporary, retry. Anything else is
    a protocol violation by the upstream; retrying is the conservative choice because a
    permanent failure would bounce mail that a fixed upstream would accept.
    """
    if 200 <= code < 300:
        return "sent"
    if 500 <= code < 600:
        return "failed"
    return "deferred"


def should_expire(first_queued: float, now: float, lifetime: float) -> bool:
    """True once a message queued at ``first_queued`` has outlived ``queue.lifetime``.

    The caller then turns the remaining deferred recipients into permanent failures (DSN).
    """
    return now - first_queued >= lifetime
