"""A rate limiter for the pages a source hands to its channels (QEMU's ``max-bandwidth``)."""

from __future__ import annotations

import threading
import time
from typing import Final

from multifd.wire.constants import PAGE_SIZE, PAGES_PER_PACKET

# A chunk of pages is about this many seconds of transfer at the cap, so the rate is
# smooth and a cancel or a pass boundary is never far away.
_CHUNK_SECONDS: Final = 0.02
_MAX_CHUNK_PAGES: Final = 64 * PAGES_PER_PACKET


class Pacer:
    """Holds the sender to ``rate`` bytes per second, averaged over a few chunks.

    A token bucket whose wait is an ``Event.wait``: setting ``stop`` (cancel) ends any wait
    at once.
    """

    def __init__(self, rate: float, stop: threading.Event) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self._stop = stop
        self._next = time.monotonic()  # when the next byte may leave
        pages = int(rate * _CHUNK_SECONDS) // PAGE_SIZE
        self.chunk_pages: Final = max(1, min(_MAX_CHUNK_PAGES, pages))

    def wait(self, nbytes: int) -> None:
        """Block until ``nbytes`` more may be sent within the rate (or ``stop`` is set)."""
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        if start > now:
            self._stop.wait(start - now)
