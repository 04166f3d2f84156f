"""A receiving side's progress: ``multifd.receive(progress=...)`` and ``multifd receive``'s view.

The source is held after its first pass (its tracker waits before it reports what is
dirty) until the receiver's progress has shown every page of that pass arriving while the
migration is still active: a receiver that reported only at the end never lets it go, and
the test fails when the source stops waiting.
"""

from __future__ import annotations

import io
import logging
import threading

import pytest
from rich.console import Console

import multifd
from multifd.console import ReceiveView
from multifd.engine.stats import ChannelCounters
from multifd.migration.precopy import StaticTracker
from multifd.migration.source import Pages
from multifd.migration.stats import MigrationStats, Status
from multifd.ram import Ram
from multifd.wire.constants import PAGE_SIZE
from tests.migration.helpers import BOUND, ReceiverThread, assert_same, make_ram

LOCAL = "tcp:127.0.0.1:0"
MIB = 1 << 20
# How long the source is held at most: under the receiver's 30 s I/O timeout, so that a
# receiver that never reports fails the test's assertion, not the migration.
HOLD = 10.0


class HeldTracker(StaticTracker):
    """One pass of every page; then it waits for ``release`` before saying nothing is
    dirty, so that the migration stays active after its first pass."""

    def __init__(self, ram: Ram) -> None:
        super().__init__(ram)
        self.release = threading.Event()  # set by the test once the receiver has shown the pass
        self.released = False

    def take(self, *, everything: bool = False) -> dict[str, Pages]:
        if not everything:
            self.released = self.release.wait(HOLD)
        return super().take(everything=everything)


def test_receive_reports_progress_while_the_migration_runs() -> None:
    source = make_ram(31, {"mem": 4 * MIB, "rom": 256 << 10})
    pages = source.total_size // PAGE_SIZE
    tracker = HeldTracker(source)
    snapshots: list[MigrationStats] = []

    def progress(stats: MigrationStats) -> None:
        snapshots.append(stats)
        if stats.status is Status.ACTIVE and stats.normal + stats.duplicate == pages:
            tracker.release.set()

    receiver = ReceiverThread({"channels": 2, "progress": progress, "progress_interval": 0.01})
    multifd.send(receiver.start(LOCAL), tracker, channels=2)
    received = receiver.result()
    try:
        assert tracker.released, "the receiver never showed the first pass while active"
        assert_same(source, received.ram)
        last = snapshots[-1]
        assert last.status is Status.COMPLETED
        assert last.normal + last.duplicate == pages
        assert last.channels == received.stats.channels
        assert last.total == source.total_size
        moved = [s.transferred for s in snapshots]
        assert moved == sorted(moved)
    finally:
        received.ram.close()


def test_the_last_report_gives_the_final_figures_even_between_ticks() -> None:
    source = make_ram(32, {"mem": 1 * MIB})
    snapshots: list[MigrationStats] = []
    receiver = ReceiverThread({"channels": 1, "progress": snapshots.append,
                               "progress_interval": BOUND})  # fmt: skip
    multifd.send(receiver.start(LOCAL), source, channels=1)
    received = receiver.result()
    received.ram.close()
    assert [s.status for s in snapshots] == [Status.COMPLETED]
    assert snapshots[0].normal + snapshots[0].duplicate == source.total_size // PAGE_SIZE


def test_a_failing_progress_report_never_fails_the_migration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = make_ram(33, {"mem": 1 * MIB})
    calls = []

    def progress(stats: MigrationStats) -> None:
        calls.append(stats)
        raise RuntimeError("display gone")

    receiver = ReceiverThread({"channels": 2, "progress": progress, "progress_interval": 0.01})
    with caplog.at_level(logging.ERROR, logger="multifd.ticker"):
        multifd.send(receiver.start(LOCAL), source, channels=2)
        received = receiver.result()
    try:
        assert_same(source, received.ram)
        assert len(calls) == 1  # no report after the one that failed
        assert "progress report failed" in caplog.text
    finally:
        received.ram.close()


def test_the_receive_view_shows_pages_rate_syncs_and_channels() -> None:
    out = io.StringIO()
    channels = (
        ChannelCounters("main", packets=2, bytes=1000),
        ChannelCounters("multifd/0", packets=9, pages=1000, zero_pages=24, bytes=3 * MIB),
    )
    stats = MigrationStats(Status.ACTIVE, total_time_ms=500.0, total=8 * MIB,
                           dirty_sync_count=2, channels=channels)  # fmt: skip
    console = Console(file=out, width=120, force_terminal=True)
    with ReceiveView(console) as view:
        view.update(stats)
    text = out.getvalue()
    assert "active" in text
    assert "3 MiB in, 6 MB/s, 2 syncs" in text
    assert "multifd/0" in text
