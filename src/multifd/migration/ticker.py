"""Statistics snapshots at a steady pace, for a side whose own thread cannot give them.

A destination's loader spends most of a migration blocked on the main channel while the
multifd channels carry the pages, so it has no moment of its own to report progress. A
:class:`Ticker` thread takes a snapshot every ``interval`` seconds and hands it on, and
once more when the migration has ended, so the last snapshot a caller sees is final.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Final

from multifd.migration.stats import MigrationStats

log = logging.getLogger("multifd.ticker")

# A ticker's thread finishes its last call within this bound after exit, or is reported.
_JOIN_BOUND: Final = 10.0


class Ticker:
    """Calls ``report(snapshot())`` every ``interval`` seconds while the block runs.

    Used as a context manager around the migration. ``snapshot`` must be safe to call
    from another thread. An exception from ``report`` is logged and ends the reports, never
    the migration: a display that fails must not fail what it shows.

    Sharing: the ticker's thread calls ``snapshot`` and ``report``; the thread in the block
    only starts and stops it, and makes the final call on exit.
    """

    def __init__(
        self,
        snapshot: Callable[[], MigrationStats],
        report: Callable[[MigrationStats], None],
        interval: float,
    ) -> None:
        self._snapshot = snapshot
        self._report = report
        self._interval = interval
        self._stop = threading.Event()  # signals: the block has ended, tick no more
        self._broken = False  # set by the thread whose report raised; read after join
        self._thread = threading.Thread(target=self._run, name="multifd-ticker", daemon=True)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(_JOIN_BOUND)
        if self._thread.is_alive():
            log.warning("a progress report is still running %g s after the end", _JOIN_BOUND)
        elif not self._broken:
            self._tick()  # the final figures, failed or completed

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if not self._tick():
                return

    def _tick(self) -> bool:
        try:
            self._report(self._snapshot())
        except Exception:
            log.exception("progress report failed; no more reports")
            self._broken = True
            return False
        return True


def ticking(
    snapshot: Callable[[], MigrationStats],
    report: Callable[[MigrationStats], None] | None,
    interval: float,
) -> AbstractContextManager[object]:
    """A :class:`Ticker` around the block, or nothing when there is no ``report``."""
    if report is None:
        return contextlib.nullcontext()
    return Ticker(snapshot, report, interval)
