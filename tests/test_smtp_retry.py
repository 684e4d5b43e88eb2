"""Retry schedule and reply classification (mailrelay.smtp.retry), as tables."""

from __future__ import annotations

import pytest

from mailrelay.smtp.retry import classify_reply, next_attempt_delay, should_expire


@pytest.mark.parametrize(
    ("attempts", "rand", "expected"),
    [
        (1, 0.5, 60.0),  # first retry after `initial`, no jitter at rand=0.5
        (2, 0.5, 120.0),
        (3, 0.5, 240.0),
        (6, 0.5, 1920.0),
        (7, 0.5, 3600.0),  # 3840 capped at the maximum
        (1, 0.0, 48.0),  # -20 %
        (1, 1.0, 72.0),  # +20 %
        (3, 0.0, 192.0),
        (7, 0.0, 2880.0),  # jitter still spreads retries at the cap ...
        (7, 1.0, 3600.0),  # ... but never beyond it
        (10_000, 0.9, 3600.0),  # a huge counter does not overflow
    ],
)
def test_next_attempt_delay(attempts: int, rand: float, expected: float) -> None:
    """Backoff doubles from retry_initial (1m), ±20 % jitter, never over retry_max (1h)."""
    assert next_attempt_delay(attempts, 60.0, 3600.0, rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("attempts", "initial", "maximum", "rand"),
    [(0, 60.0, 3600.0, 0.5), (1, 0.0, 3600.0, 0.5), (1, 60.0, 30.0, 0.5), (1, 60.0, 3600.0, 1.5)],
)
def test_next_attempt_delay_rejects_nonsense(
    attempts: int, initial: float, maximum: float, rand: float
) -> None:
    """Invalid schedules are a programming error, not a silent zero delay."""
    with pytest.raises(ValueError):
        next_attempt_delay(attempts, initial, maximum, rand)


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (250, "sent"),
        (251, "sent"),
        (421, "deferred"),
        (450, "deferred"),
        (452, "deferred"),
        (550, "failed"),
        (552, "failed"),
        (554, "failed"),
        (354, "deferred"),  # not a final reply: retry rather than bounce
        (999, "deferred"),
    ],
)
def test_classify_reply(code: int, outcome: str) -> None:
    """2xx sent, 4xx retried, 5xx bounced at once, protocol garbage retried."""
    assert classify_reply(code) == outcome


@pytest.mark.parametrize(
    ("first_queued", "now", "lifetime", "expired"),
    [
        (1000.0, 1000.0, 432000.0, False),
        (1000.0, 432999.0, 432000.0, False),
        (1000.0, 433000.0, 432000.0, True),  # exactly queue.lifetime (5d) later
        (1000.0, 900000.0, 432000.0, True),
    ],
)
def test_should_expire(first_queued: float, now: float, lifetime: float, expired: bool) -> None:
    """A message expires once it has been queued for queue.lifetime."""
    assert should_expire(first_queued, now, lifetime) is expired
