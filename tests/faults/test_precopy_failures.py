"""What the pre-copy orchestrator does with its dirty pages and its writers when things go wrong."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import multifd
from multifd.address import parse_address
from multifd.migration.precopy import Hooks, Precopy
from multifd.wire.compat import profile
from tests.faults.cells import Cell
from tests.faults.live import CHANNELS, IO_TIMEOUT, LIMITS, DestinationRun, LiveSource, failed


def test_a_cancel_after_the_last_byte_left_is_too_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination gets the whole stream: the source must not resume its writers."""
    source = LiveSource()
    resumed = threading.Event()  # the resume hook ran: the source would run twice
    stopped = threading.Event()  # the stopped hook ran: the writers stay paused
    migration = Precopy(
        source.log, profile("native"), limits=LIMITS, channels=CHANNELS, io_timeout=IO_TIMEOUT,
        hooks=Hooks(pause=source.writer.pause, resume=resumed.set, stopped=stopped.set),
    )  # fmt: skip
    complete = migration._source.complete

    def complete_then_cancel(pages: dict[str, np.typing.NDArray[np.int64]]) -> None:
        complete(pages)
        migration.cancel()  # e.g. an operator's Ctrl-C, a moment too late

    monkeypatch.setattr(migration._source, "complete", complete_then_cancel)
    destination = DestinationRun()
    try:
        stats = migration.migrate(parse_address(destination.start()))
        destination.join()
        received = destination.received
        assert received is not None, destination.error
        try:
            assert np.array_equal(received.ram["mem"].words, source.block.words)
        finally:
            received.ram.close()
    finally:
        source.close()
    assert stats.status is multifd.Status.COMPLETED
    assert stopped.is_set()
    assert not resumed.is_set()


def test_a_failed_attempt_gives_back_every_page_it_took() -> None:
    """Pages of passes whose sync completed are not delivered either: nothing acknowledges them."""
    source = LiveSource()
    try:
        # The source's main socket is reset at the marker of pass 2: two syncs completed,
        # and the source writes main again at the end of pass 3.
        cell = Cell("reset", "source", "main", "sync")
        attempt = source.migrate(cell.fault())
        failed(attempt.source_error)
        assert source.log.dirty_pages() == source.pages
        source.fresh_attempt()
    finally:
        source.close()
