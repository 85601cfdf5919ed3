"""When to try a lost connection again: capped exponential backoff.

Pure bookkeeping (the caller passes the time), shared by the engine's writer
and readers, the PostgreSQL listener and the pending outcomes' retries.
"""

from __future__ import annotations

RECONNECT_FIRST = 0.05      # seconds before the first try at a new connection
RECONNECT_CAP = 1.0         # never longer between tries: the store is used again within this once it is back


class Backoff:
    def __init__(self, first: float = RECONNECT_FIRST, cap: float = RECONNECT_CAP):
        self.first, self.cap = first, cap
        self.delay = 0.0
        self.next_try = 0.0
        self.down_since: float | None = None
        self.error = ""

    def due(self, now: float) -> bool:
        return now >= self.next_try

    def failed(self, now: float, error: str) -> bool:
        """A try failed; True if it is the first since the last success."""
        first = self.down_since is None
        if first:
            self.down_since = now
        self.delay = self.first if self.delay == 0 else min(self.delay * 2, self.cap)
        self.next_try = now + self.delay
        self.error = error
        return first

    def succeeded(self, now: float) -> float | None:
        """A try worked; how long it had been failing (None: it had not)."""
        down = None if self.down_since is None else now - self.down_since
        self.delay, self.next_try, self.down_since, self.error = 0.0, 0.0, None, ""
        return down
