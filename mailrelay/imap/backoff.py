"""How long the IMAP supervisor waits before reconnecting (pure: the caller supplies randomness).

A lost connection, a hung IDLE, a BYE or a server that is down is retried 1 s, 2 s, 4 s ... up
to 5 min: quick enough that a server restart costs seconds, slow enough that an outage of hours
costs a dozen log lines an hour. A refused login starts at 30 s instead, because retrying a wrong
password every second is what gets an address banned by fail2ban or an account locked.

The delay is jittered by +-25 %: every mailbox of every account reconnects after the same server
restart, and without jitter they would all knock again in the same second, for ever.
"""

from __future__ import annotations

from dataclasses import dataclass

# Past this many doublings any sane initial delay exceeds any maximum; stop so that a huge
# failure counter cannot overflow a float.
_MAX_EXPONENT = 62


@dataclass(frozen=True, slots=True)
class Backoff:
    """A reconnect schedule: ``initial * 2**(failures-1)``, capped at ``maximum``, jittered."""

    initial: float = 1.0
    maximum: float = 300.0
    auth_initial: float = 30.0  # first wait after a refused login
    jitter: float = 0.25  # fraction of the delay, both ways

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or not 0 < self.auth_initial <= self.maximum:
            raise ValueError("need 0 < initial, auth_initial <= maximum")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def delay(self, failures: int, rand: float, *, auth: bool = False) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (``rand`` in [0, 1]).

        ``rand`` = 0.5 means no jitter. The result never exceeds ``maximum``: an operator told
        "at most 5 minutes" should never see a longer gap.
        """
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        if not 0.0 <= rand <= 1.0:
            raise ValueError(f"rand must be in [0, 1], got {rand}")
        start = self.auth_initial if auth else self.initial
        base = min(start * 2.0 ** min(failures - 1, _MAX_EXPONENT), self.maximum)
        return min(base * (1.0 + self.jitter * (2.0 * rand - 1.0)), self.maximum)


DEFAULT_BACKOFF = Backoff()
