"""Sender -> Receiver over socketpairs and loopback TCP: memory, I1-I4 and I6 on real traffic."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Sequence
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest

from multifd.compression import Compressor, flag_of
from multifd.engine.send import Sender, job_size
from multifd.errors import MigrationFailed, multifd_channel
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import MULTIFD_FLAG_SYNC, PAGE_SIZE, PAGES_PER_PACKET
from tests.engine.helpers import (
    TIMEOUT,
    TRANSPORTS,
    Loader,
    Recorder,
    Transport,
    check_send_invariants,
    engine_threads,
    link,
    make_pairs,
)

ROUNDS = 4


def make_ram() -> Ram:
    # "a" is not a multiple of 128 pages so batches end partial; "b" forces block switches.
    return Ram(
        [RamBlock.anonymous("a", (1024 + 37) * PAGE_SIZE), RamBlock.anonymous("b", 64 * PAGE_SIZE)]
    )


class Workload:
    """Dirties the source round by round and remembers what each round sent.

    Round ``r`` rewrites pages of parity ``r % 2`` only, in random order, a quarter of them
    with zeros. Consecutive rounds are disjoint, so while the loader checks round ``r`` the
    released channels can only be writing round ``r + 1`` pages elsewhere: the I4 check is
    exact even though the sender runs ahead.
    """

    def __init__(self, src: Ram, seed: int) -> None:
        self.src = src
        self.rng = np.random.default_rng(seed)
        self.sent: dict[int, list[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.uint8]]]] = {}

    def dirty(self, round_: int) -> list[tuple[RamBlock, npt.NDArray[np.int64]]]:
        batches = []
        self.sent[round_] = []
        for block in self.src:
            candidates = np.arange(round_ % 2, block.page_count, 2, dtype=np.int64)
            pages = self.rng.permutation(candidates)[: max(1, len(candidates) * 3 // 4)]
            data = self.rng.integers(1, 256, size=(len(pages), PAGE_SIZE), dtype=np.uint8)
            data[self.rng.random(len(pages)) < 0.25] = 0
            block.pages[pages] = data
            self.sent[round_].append((block.name, pages, data))
            batches.append((block, pages * PAGE_SIZE))
        return batches

    def check(self, dst: Ram, round_: int) -> None:
        """I4: every page sent before the SYNCs of ``round_`` is in destination memory."""
        for name, pages, data in self.sent[round_]:
            got = dst[name].pages[pages]
            bad = np.flatnonzero((got != data).any(axis=1))
            assert not len(bad), f"round {round_}: block {name} pages {pages[bad][:8]} differ"


def send_round(
    sender: Sender, batches: list[tuple[RamBlock, npt.NDArray[np.int64]]], rng: np.random.Generator
) -> None:
    """Hand the pages over in chunks of random size (partial batches, block switches)."""
    for block, offsets in batches:
        position = 0
        while position < len(offsets):
            size = int(rng.integers(1, 3 * PAGES_PER_PACKET))
            sender.send_pages(block, offsets[position : position + size])
            position += size


@pytest.mark.parametrize("detect_zero_pages", [False, True], ids=["zero-off", "zero-on"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("channels", [1, 2, 4, 8])
def test_rounds_arrive_whole_and_in_order(
    channels: int, transport: Transport, detect_zero_pages: bool
) -> None:
    run_rounds(channels, transport, detect_zero_pages=detect_zero_pages)


@pytest.mark.usefixtures("zstd_backend")
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("channels", [1, 4])
def test_compressed_rounds_arrive_whole_and_in_order(channels: int, compression: str) -> None:
    run_rounds(channels, "socketpair", detect_zero_pages=True, compression=compression)


def run_rounds(
    channels: int, transport: Transport, *, detect_zero_pages: bool, compression: str = "none"
) -> None:
    src, dst = make_ram(), make_ram()
    recorder = Recorder()
    work = Workload(src, seed=channels * 10 + detect_zero_pages)
    with link(
        dst,
        channels,
        transport,
        recorder=recorder,
        detect_zero_pages=detect_zero_pages,
        compression=compression,
    ) as (sender, receiver, _):
        loader = Loader(receiver, check=lambda r: work.check(dst, r))
        try:
            for round_ in range(ROUNDS):
                send_round(sender, work.dirty(round_), work.rng)
                sender.sync()
                recorder.marker()
                loader.marker(round_)  # the sender runs ahead; the queue bounds it
            assert [loader.result() for _ in range(ROUNDS)] == list(range(ROUNDS))
        finally:
            loader.stop()
        sender.close()
        receiver.finish(TIMEOUT)
        sent, received = sender.stats(), receiver.stats()
    assert not engine_threads()  # I6
    for block in src:
        assert bytes(block.view) == bytes(dst[block.name].view)
    assert check_send_invariants(recorder.events, channels) == ROUNDS  # I1, I2, I3
    method = flag_of(compression)
    for i in range(channels):
        name = multifd_channel(i)
        packets = recorder.packets("send", name)
        assert packets == recorder.packets("recv", name)
        assert {p.flags for p in packets if not p.is_sync} == {method}
    assert [c.sync_packets for c in sent] == [ROUNDS] * channels
    assert sent == received
    total_zero = sum(c.zero_pages for c in sent)
    assert (total_zero > 0) == detect_zero_pages


def test_partial_batches_and_block_switches_make_separate_packets() -> None:
    src, dst = make_ram(), make_ram()
    src["a"].pages[:] = 7
    src["b"].pages[:] = 9
    recorder = Recorder()
    with link(dst, 1, recorder=recorder) as (sender, receiver, _):
        sender.send_pages(src["a"], [0, PAGE_SIZE])
        sender.send_pages(src["b"], np.array([2 * PAGE_SIZE]))
        sender.send_pages(src["a"], [5 * PAGE_SIZE])
        sender.sync()
        receiver.wait_sync(TIMEOUT)
    packets = recorder.packets("send", multifd_channel(0))
    assert [(p.ramblock, p.offsets, p.flags) for p in packets] == [
        ("a", (0, PAGE_SIZE), 0),
        ("b", (2 * PAGE_SIZE,), 0),
        ("a", (5 * PAGE_SIZE,), 0),
        ("", (), MULTIFD_FLAG_SYNC),
    ]
    assert bytes(dst["b"].page_view(2 * PAGE_SIZE)) == bytes([9]) * PAGE_SIZE
    assert bytes(dst["a"].page_view(5 * PAGE_SIZE)) == bytes([7]) * PAGE_SIZE
    assert bytes(dst["a"].page_view(2 * PAGE_SIZE)) == bytes(PAGE_SIZE)


def test_full_batches_go_round_robin() -> None:
    src, dst = make_ram(), make_ram()
    recorder = Recorder()
    with link(dst, 4, recorder=recorder) as (sender, receiver, _):
        sender.send_pages(src["a"], np.arange(4 * PAGES_PER_PACKET) * PAGE_SIZE)
        sender.sync()
        receiver.wait_sync(TIMEOUT)
    for i in range(4):
        first, sync = recorder.packets("send", multifd_channel(i))
        assert first.offsets[0] == i * PAGES_PER_PACKET * PAGE_SIZE
        assert first.normal_pages == PAGES_PER_PACKET
        assert sync.is_sync


@pytest.mark.parametrize(
    ("left", "channels", "per_job", "expected"),
    [
        (8, 2, 1, [1] * 8),
        (8, 2, 4, [4, 2, 1, 1]),  # the tail is spread over both channels
        (64, 2, 4, [4] * 15 + [2, 1, 1]),
        (3, 4, 8, [1, 1, 1]),
    ],
)
def test_job_sizes(left: int, channels: int, per_job: int, expected: list[int]) -> None:
    sizes = []
    while left:
        sizes.append(job_size(left, channels, per_job))
        left -= sizes[-1]
    assert sizes == expected


@pytest.mark.parametrize(("compression", "per_job"), [("none", 4), ("zlib", 16), ("zstd", 16)])
def test_compressed_packets_go_in_larger_jobs_by_default(compression: str, per_job: int) -> None:
    a, b = socket.socketpair()
    try:
        sender = Sender([a], compression=compression)
        assert sender.packets_per_job == per_job
        assert Sender([a], compression=compression, packets_per_job=2).packets_per_job == 2
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("per_job", [1, 3, 4])
def test_jobs_of_several_packets_keep_every_packet_whole(per_job: int) -> None:
    src, dst = make_ram(), make_ram()
    src["a"].pages[:] = (np.arange(len(src["a"].pages)) % 251 + 1).astype(np.uint8)[:, None]
    recorder = Recorder()
    packets_sent = 8
    with link(dst, 2, recorder=recorder, packets_per_job=per_job) as (sender, receiver, _):
        sender.send_pages(src["a"], np.arange(packets_sent * PAGES_PER_PACKET) * PAGE_SIZE)
        sender.sync()
        recorder.marker()
        receiver.wait_sync(TIMEOUT)
    assert check_send_invariants(recorder.events, 2) == 1
    numbers, firsts = [], []
    for i in range(2):
        sent = recorder.packets("send", multifd_channel(i))
        numbers += [p.packet_num for p in sent]
        pages = [p for p in sent if not p.is_sync]
        assert all(p.normal_pages == PAGES_PER_PACKET for p in pages)
        firsts += [p.offsets[0] // (PAGES_PER_PACKET * PAGE_SIZE) for p in pages]
    assert sorted(firsts) == list(range(packets_sent))
    assert sorted(numbers) == list(range(1, packets_sent + 3))  # and 2 SYNCs, none twice
    limit = packets_sent * PAGES_PER_PACKET * PAGE_SIZE
    assert bytes(dst["a"].view[:limit]) == bytes(src["a"].view[:limit])


class _RefCheckingCompressor:
    """Wraps a channel's compressor; notes, at each call, whether the sender still holds
    the payload the previous call returned (it must not: see _SendChannel._send_job)."""

    def __init__(self, inner: Compressor) -> None:
        self.inner = inner
        self.whole_packets = inner.whole_packets
        self.previous: list[memoryview | bytes] = []
        self.still_held: list[int] = []

    def compress(self, pages: Sequence[memoryview | bytes]) -> bytes:
        raise AssertionError("the sender writes the parts as they are")

    def compress_parts(self, pages: Sequence[memoryview | bytes]) -> list[memoryview | bytes]:
        if self.previous:
            held = 0
            for part in self.previous:
                # Our list, this loop's variable, getrefcount's argument: more if the
                # sender kept the part.
                held = max(held, sys.getrefcount(part) - 3)
            self.still_held.append(held)
        self.previous = list(self.inner.compress_parts(pages))
        return list(self.previous)


def test_a_channel_holds_one_compressed_payload_at_a_time() -> None:
    src, dst = make_ram(), make_ram()
    src["a"].pages[:] = np.random.default_rng(3).integers(0, 255, src["a"].pages.shape)
    checkers: list[_RefCheckingCompressor] = []

    def wrap(sender: Sender) -> None:
        for channel in sender._channels:
            assert channel.compressor is not None
            checkers.append(_RefCheckingCompressor(channel.compressor))
            channel.compressor = cast(Compressor, checkers[-1])

    with link(dst, 1, compression="zstd", before_start=wrap, packets_per_job=4) as (
        sender,
        receiver,
        _,
    ):
        sender.send_pages(src["a"], np.arange(8 * PAGES_PER_PACKET) * PAGE_SIZE)
        sender.sync()
        receiver.wait_sync(TIMEOUT)
    assert checkers[0].still_held == [0] * 7  # 8 packets, in jobs of 4
    limit = 8 * PAGES_PER_PACKET * PAGE_SIZE
    assert bytes(dst["a"].view[:limit]) == bytes(src["a"].view[:limit])


def test_backpressure_is_asked_after_each_packet_with_pages() -> None:
    src, dst = make_ram(), make_ram()
    src["a"].pages[:] = 5
    asked: list[str] = []
    with link(dst, 2, backpressure=lambda: asked.append(threading.current_thread().name)) as (
        sender,
        receiver,
        _,
    ):
        sender.send_pages(src["a"], np.arange(5 * PAGES_PER_PACKET) * PAGE_SIZE)
        sender.sync()  # SYNC packets carry no pages: not asked
        receiver.wait_sync(TIMEOUT)
    assert len(asked) == 5
    assert set(asked) <= {"recv-multifd/0", "recv-multifd/1"}


def test_backpressure_that_raises_fails_the_channel() -> None:
    src, dst = make_ram(), make_ram()

    def refuse() -> None:
        raise MigrationFailed("the forwarder failed")

    with link(dst, 1, backpressure=refuse) as (sender, receiver, _):
        sender.send_pages(src["a"], np.arange(PAGES_PER_PACKET) * PAGE_SIZE)
        with pytest.raises(MigrationFailed, match="the forwarder failed"):
            receiver.wait_sync(TIMEOUT)


def test_sync_with_nothing_queued_sends_only_syncs() -> None:
    recorder = Recorder()
    with link(make_ram(), 2, recorder=recorder) as (sender, receiver, _):
        for _ in range(3):
            sender.sync()
            recorder.marker()
            receiver.wait_sync(TIMEOUT)
    assert check_send_invariants(recorder.events, 2) == 3
    assert all(p.is_sync for i in range(2) for p in recorder.packets("send", multifd_channel(i)))


def test_zero_pages_are_partitioned_to_the_end_and_zeroed_on_the_destination() -> None:
    src, dst = make_ram(), make_ram()
    src["a"].pages[:10] = 3
    src["a"].pages[[2, 5]] = 0
    dst["a"].pages[:10] = 0xEE  # stale content that the zero pages must overwrite
    recorder = Recorder()
    with link(dst, 1, recorder=recorder, detect_zero_pages=True) as (sender, receiver, _):
        sender.send_pages(src["a"], np.arange(10) * PAGE_SIZE)
        sender.send_pages(src["a"], [20 * PAGE_SIZE, 30 * PAGE_SIZE])  # scattered, all zero
        sender.sync()
        receiver.wait_sync(TIMEOUT)
    first, sync = recorder.packets("send", multifd_channel(0))
    assert (first.normal_pages, first.zero_pages) == (8, 4)
    assert first.offsets == tuple(p * PAGE_SIZE for p in (0, 1, 3, 4, 6, 7, 8, 9, 2, 5, 20, 30))
    assert first.next_packet_size == 8 * PAGE_SIZE
    assert sync.page_count == 0
    assert bytes(dst["a"].view[: 10 * PAGE_SIZE]) == bytes(src["a"].view[: 10 * PAGE_SIZE])


def test_pages_with_data_fill_whole_packets_before_the_zero_pages() -> None:
    # Every other page zero. The first 256 pages are one plan: its 128 pages with data make
    # the first packet, whole, and its zero pages the second. The last 44 wait for the sync
    # and go as one packet. Each page goes once, and the data lands in place.
    src, dst = make_ram(), make_ram()
    src["a"].pages[1:300:2] = 9
    dst["a"].pages[:300] = 0xEE
    recorder = Recorder()
    with link(dst, 1, recorder=recorder, detect_zero_pages=True) as (sender, receiver, _):
        sender.send_pages(src["a"], np.arange(300) * PAGE_SIZE)
        sender.sync()
        receiver.wait_sync(TIMEOUT)
    packets = recorder.packets("send", multifd_channel(0))
    assert [(p.normal_pages, p.zero_pages) for p in packets] == [(128, 0), (0, 128), (22, 22),
                                                                 (0, 0)]  # fmt: skip
    assert packets[0].offsets == tuple(p * PAGE_SIZE for p in range(1, 257, 2))
    sent = [o for p in packets for o in p.offsets]
    assert sorted(sent) == [p * PAGE_SIZE for p in range(300)]
    assert bytes(dst["a"].view[: 300 * PAGE_SIZE]) == bytes(src["a"].view[: 300 * PAGE_SIZE])


def test_zero_detection_follows_the_offsets_order_not_the_page_order() -> None:
    src, dst = make_ram(), make_ram()
    src["a"].pages[[0, 1, 3]] = 4  # page 2 is zero; offsets below span 0..3 but out of order
    recorder = Recorder()
    with link(dst, 1, recorder=recorder, detect_zero_pages=True) as (sender, receiver, _):
        sender.send_pages(src["a"], np.array([0, 2, 1, 3]) * PAGE_SIZE)
        sender.sync()
        receiver.wait_sync(TIMEOUT)
    first, _ = recorder.packets("send", multifd_channel(0))
    assert first.offsets == tuple(p * PAGE_SIZE for p in (0, 1, 3, 2))
    assert (first.normal_pages, first.zero_pages) == (3, 1)
    assert bytes(dst["a"].view[: 4 * PAGE_SIZE]) == bytes(src["a"].view[: 4 * PAGE_SIZE])


def test_an_all_zero_batch_is_a_packet_with_zero_pages_only() -> None:
    src, dst = make_ram(), make_ram()
    dst["a"].pages[:3] = 1
    recorder = Recorder()
    with link(dst, 1, recorder=recorder, detect_zero_pages=True) as (sender, receiver, _):
        sender.send_pages(src["a"], np.arange(3) * PAGE_SIZE)
        sender.sync()
        receiver.wait_sync(TIMEOUT)
    first, _ = recorder.packets("send", multifd_channel(0))
    assert (first.normal_pages, first.zero_pages, first.next_packet_size) == (0, 3, 0)
    assert not dst["a"].pages[:3].any()


@pytest.mark.parametrize(
    "offsets",
    [[1], [-PAGE_SIZE], [(1024 + 37) * PAGE_SIZE]],
    ids=["unaligned", "negative", "past-end"],
)
def test_send_pages_rejects_offsets_outside_the_block(offsets: list[int]) -> None:
    src = make_ram()
    pairs = make_pairs(1, "socketpair")
    sender = Sender([pairs[0][0]])
    try:
        sender.start()
        with pytest.raises(ValueError, match="block 'a'"):
            sender.send_pages(src["a"], offsets)
    finally:
        sender.close()
        pairs[0][1].close()
