"""Zero pages are written, never assumed: stale destination content and re-zeroed pages."""

from __future__ import annotations

import numpy as np
import pytest

import multifd
from multifd.dirty import DirtyLog
from multifd.migration.precopy import Limits
from multifd.migration.stats import PassStats
from tests.migration.helpers import PAGE, ReceiverThread, assert_same, make_ram

SIZES = {"mem": 512 * PAGE}


@pytest.mark.parametrize("peer", ["native", "qemu-7.2"])
@pytest.mark.parametrize("channels", [0, 2])
def test_a_destination_that_starts_dirty_ends_equal(peer: str, channels: int) -> None:
    source = make_ram(21, SIZES)
    assert source["mem"].zero_page_mask().any()
    destination = multifd.Ram([multifd.RamBlock.anonymous("mem", SIZES["mem"])])
    destination["mem"].pages[:] = 0xAB  # stale content everywhere, zero pages included
    receiver = ReceiverThread({"channels": channels, "into": destination})
    address = receiver.start("tcp:127.0.0.1:0")
    try:
        multifd.send(address, source, channels=channels, peer=peer)
        result = receiver.result()
        assert result.ram is destination
        assert result.stats.duplicate == int(source["mem"].zero_page_mask().sum())
        assert_same(source, destination)
    finally:
        destination.close()
        source.close()


@pytest.mark.parametrize("peer", ["native", "qemu-7.2"])
def test_a_page_that_turns_zero_after_it_was_sent_is_zeroed(peer: str) -> None:
    """Pass 1 sends page 7 with data; then it becomes zero and is announced as a zero page."""
    block = multifd.RamBlock.anonymous("mem", 64 * PAGE)
    block.pages[:] = 0x5C
    log = DirtyLog(multifd.Ram([block]))

    def after_pass(report: PassStats) -> None:
        if report.number == 1:
            block.pages[7] = 0
            log.mark_dirty(block, 7 * PAGE, PAGE)

    receiver = ReceiverThread({"channels": 2})
    address = receiver.start("tcp:127.0.0.1:0")
    stats = multifd.send(address, log, peer=peer, limits=Limits(downtime_limit=10.0),
                         on_pass=after_pass)  # fmt: skip
    result = receiver.result()
    try:
        assert stats.duplicate == 1  # page 7, sent as a zero page the second time
        assert not result.ram["mem"].pages[7].any()
        assert np.array_equal(result.ram["mem"].pages, block.pages)
    finally:
        result.ram.close()
        block.close()
