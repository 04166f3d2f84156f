"""Dirty tracking: marks, atomic take-and-clear, restore, and the shadow tracker."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from multifd.dirty import DirtyBitmap, DirtyLog, ShadowTracker
from multifd.errors import ConfigError
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import PAGE_SIZE

PAGES = 64


def _ram() -> Ram:
    return Ram([RamBlock.anonymous("mem", PAGES * PAGE_SIZE)])


def test_a_write_marks_every_page_it_touches_and_take_clears() -> None:
    ram = _ram()
    log = DirtyLog(ram, all_dirty=False)
    log.mark_dirty("mem", 3 * PAGE_SIZE + 100, PAGE_SIZE)  # straddles pages 3 and 4
    log.mark_dirty(ram["mem"], 10 * PAGE_SIZE, 1)
    assert log.take()["mem"].tolist() == [3, 4, 10]
    assert log.take()["mem"].tolist() == []
    ram.close()


def test_a_new_log_starts_all_dirty_for_the_first_pass() -> None:
    ram = _ram()
    assert DirtyLog(ram).take()["mem"].tolist() == list(range(PAGES))
    ram.close()


def test_restore_brings_back_undelivered_pages() -> None:
    ram = _ram()
    log = DirtyLog(ram, all_dirty=False)
    log.mark_dirty("mem", 0, 2 * PAGE_SIZE)
    taken = log.take()
    log.mark_dirty("mem", 5 * PAGE_SIZE, 1)
    log.restore(taken)
    assert log.take()["mem"].tolist() == [0, 1, 5]
    ram.close()


def test_bad_marks_are_refused() -> None:
    ram = _ram()
    log = DirtyLog(ram)
    with pytest.raises(ConfigError, match="no block"):
        log.mark_dirty("rom", 0, 1)
    with pytest.raises(ConfigError, match="outside"):
        log.mark_dirty("mem", PAGES * PAGE_SIZE, 1)
    with pytest.raises(ConfigError, match="outside"):
        DirtyBitmap(4).mark(-1)
    ram.close()


def test_no_write_is_lost_between_take_and_clear() -> None:
    """Writers race with passes; a copy made pass by pass ends equal to the source.

    Each writer stores an increasing number into pages and marks them after the write;
    the "migration" copies the pages of each take. A take that read the bits and cleared
    them in two steps would lose the marks falling in between, and the copy would keep a
    stale number for those pages.
    """
    ram = _ram()
    block = ram["mem"]
    log = DirtyLog(ram)
    copy = np.zeros_like(block.words)
    stop = threading.Event()  # tells the writers to finish

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        number = 0
        while not stop.is_set():
            page = int(rng.integers(PAGES))
            number += 1
            block.words[page, seed] = number
            log.mark_dirty(block, page * PAGE_SIZE, 8)

    writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for thread in writers:
        thread.start()
    try:
        for _ in range(300):
            pages = log.take()["mem"]
            copy[pages] = block.words[pages]
    finally:
        stop.set()
        for thread in writers:
            thread.join(10)
    pages = log.take()["mem"]  # the final pass, with the writers stopped
    copy[pages] = block.words[pages]
    assert np.array_equal(copy, block.words)
    ram.close()


def test_shadow_tracker_finds_exactly_the_changed_pages() -> None:
    live = _ram()
    tracker = ShadowTracker(live)
    first = tracker.take(everything=True)["mem"]
    assert first.tolist() == list(range(PAGES))
    assert tracker.take()["mem"].tolist() == []
    live["mem"].pages[[2, 40]] = 7
    live["mem"].pages[41, 4095] = 1  # a change in the last byte of a page counts
    taken = tracker.take()["mem"]
    assert taken.tolist() == [2, 40, 41]
    assert np.array_equal(tracker.sent["mem"].pages, live["mem"].pages)
    tracker.restore({"mem": taken[:1]})
    assert tracker.take()["mem"].tolist() == [2]
    tracker.close()
    live.close()
