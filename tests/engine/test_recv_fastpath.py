"""The receive channel's short paths: runs, scattered and zero pages, block cache, quiet steps."""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from multifd.engine.handshake import (
    RECV_QUIET,
    RECV_TABLE,
    IllegalTransitionError,
    RecvAction,
    RecvEvent,
    RecvState,
    recv_step,
    step,
)
from multifd.engine.pageio import recv_exact_into, run_views
from multifd.engine.recv import Receiver
from multifd.engine.trace import TraceEvent
from multifd.errors import MigrationFailed, ProtocolError
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import MULTIFD_FLAG_SYNC, PAGE_SIZE, RAMBLOCK_NAME_SIZE
from multifd.wire.packets import InitPacket, RamPacket
from tests.engine.helpers import TIMEOUT, engine_threads

PAGES = 512


def page(value: int) -> bytes:
    return bytes([value]) * PAGE_SIZE


def packet(ramblock: str, data: Sequence[int], zero: Sequence[int] = (), num: int = 1) -> bytes:
    """A packet writing page ``i + 1`` (a byte value) at each of the page numbers ``data``."""
    header = RamPacket(
        flags=0,
        packet_num=num,
        normal_pages=len(data),
        zero_pages=len(zero),
        ramblock=ramblock,
        offsets=tuple(p * PAGE_SIZE for p in [*data, *zero]),
    ).pack()
    return header + b"".join(page(i + 1) for i in range(len(data)))


def run(ram: Ram, stream: bytes, trace: list[TraceEvent] | None = None) -> None:
    """Feed ``stream`` then a SYNC to one channel; return once its pages are in ``ram``."""
    rx = Receiver(
        ram, channels=1, io_timeout=TIMEOUT, trace=None if trace is None else trace.append
    )
    ours, theirs = socket.socketpair()
    writer = threading.Thread(target=_write, args=(theirs, stream + RamPacket.sync(99).pack()))
    writer.start()
    try:
        rx.accept_channel(ours, TIMEOUT)
        rx.wait_sync(TIMEOUT)
        writer.join(TIMEOUT)
        rx.finish(TIMEOUT)
    finally:
        writer.join(TIMEOUT)
        rx.close()
    assert not engine_threads()


def _write(sock: socket.socket, data: bytes) -> None:
    with sock:
        sock.sendall(InitPacket(0).pack() + data)


def filled(name: str = "mem", value: int = 0xEE) -> RamBlock:
    block = RamBlock.anonymous(name, PAGES * PAGE_SIZE)
    block.view[:] = bytes([value]) * block.size
    return block


def page_values(block: RamBlock) -> list[int]:
    """The first byte of every page, checking each page is one byte repeated."""
    assert bool((block.pages == block.pages[:, :1]).all())
    return block.pages[:, 0].tolist()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("data", "zero"),
    [
        (list(range(10, 138)), []),  # one full run: the short path
        (list(range(10, 20)), list(range(20, 30))),  # one run, zero pages continue it
        ([5, 3, 4, 100, 101, 7], [50, 8]),  # runs out of order, zero pages apart
        ([9, 11, 13], []),  # no two pages adjacent
        ([], [0, 1, 2, 40]),  # zero pages only
        ([PAGES - 1], [PAGES - 2]),  # the last pages of the block
    ],
    ids=["run", "run+zero", "scattered", "gaps", "zero-only", "block-end"],
)
def test_pages_land_where_the_offsets_say(data: list[int], zero: list[int]) -> None:
    block = filled()
    expected = [0xEE] * PAGES
    for i, number in enumerate(data):
        expected[number] = i + 1
    for number in zero:
        expected[number] = 0
    run(Ram([block]), packet("mem", data, zero))
    assert page_values(block) == expected


def test_blocks_are_told_apart_and_every_packet_is_traced() -> None:
    first, second = filled("a"), filled("b")
    # The same block name padded with different bytes after its NUL is the same block.
    padded = bytearray(packet("a", [7]))
    padded[64 + 2 : 64 + RAMBLOCK_NAME_SIZE] = b"\xff" * (RAMBLOCK_NAME_SIZE - 2)
    stream = packet("a", [1]) + packet("b", [2, 3]) + bytes(padded) + packet("b", [1], [2])
    trace: list[TraceEvent] = []
    run(Ram([first, second]), stream, trace)
    assert page_values(first)[:8] == [0xEE, 1, 0xEE, 0xEE, 0xEE, 0xEE, 0xEE, 1]
    assert page_values(second)[:4] == [0xEE, 1, 0, 2]
    packets = [e.packet for e in trace if e.packet is not None]
    assert [(p.ramblock, p.normal_pages, p.zero_pages) for p in packets] == [
        ("a", 1, 0),
        ("b", 2, 0),
        ("a", 1, 0),
        ("b", 1, 1),
        ("", 0, 0),
    ]
    assert packets[-1].is_sync


def test_many_padded_names_still_resolve_and_an_unknown_block_fails() -> None:
    block = filled()
    stream = b""
    for pad in range(70):  # more distinct raw names than the cache keeps
        raw = bytearray(packet("mem", [pad]))
        raw[64 + 4] = pad + 1
        stream += bytes(raw)
    run(Ram([block]), stream)
    assert page_values(block)[:70] == [1] * 70
    with pytest.raises(MigrationFailed) as info:
        run(Ram([filled()]), packet("mem", [1]) + packet("other", [2]))
    cause = info.value.__cause__
    assert isinstance(cause, ProtocolError)
    assert (cause.what, cause.received) == ("unknown ramblock", "'other'")


def test_recv_exact_into_gathers_a_stream_written_in_pieces() -> None:
    buffers = [bytearray(3), bytearray(5000), bytearray(1), bytearray(7)]
    data = bytes(range(256)) * 20
    total = sum(len(b) for b in buffers)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(TIMEOUT)
        # Written in pieces that cut every view somewhere else.
        for start in range(0, total, 997):
            theirs.sendall(data[start : min(start + 997, total)])
        got = recv_exact_into(ours, [memoryview(b) for b in buffers])
        assert got == total
        assert b"".join(buffers) == data[:total]
        theirs.sendall(b"xyz")
        theirs.shutdown(socket.SHUT_WR)
        short = [bytearray(2), bytearray(4)]
        assert recv_exact_into(ours, [memoryview(b) for b in short]) == 3
        assert short == [bytearray(b"xy"), bytearray(b"z\0\0\0")]


def test_quiet_steps_are_the_ones_that_change_nothing() -> None:
    assert (RecvState.RUNNING, RecvEvent.PACKET) in RECV_QUIET
    assert (RecvState.RUNNING, RecvEvent.SYNC) not in RECV_QUIET
    for (state, event), (after, action) in RECV_TABLE.items():
        quiet = after is state and action is RecvAction.CONTINUE
        assert ((state, event) in RECV_QUIET) is quiet
        assert recv_step(state, event) == step(state, event)
    with pytest.raises(IllegalTransitionError):
        recv_step(RecvState.AT_SYNC_POSTED, RecvEvent.PACKET)


def test_sync_with_pages_is_applied_and_counted() -> None:
    block = filled()
    header = RamPacket(
        flags=MULTIFD_FLAG_SYNC,
        packet_num=4,
        normal_pages=2,
        ramblock="mem",
        offsets=(2 * PAGE_SIZE, 3 * PAGE_SIZE),
    ).pack()
    run(Ram([block]), header + page(1) + page(2))
    assert page_values(block)[:5] == [0xEE, 0xEE, 1, 2, 0xEE]
    assert np.count_nonzero(block.pages[:, 0] != 0xEE) == 2


@pytest.mark.parametrize(
    ("pages", "runs"),
    [
        ([], []),
        ([5], [(5, 1)]),
        ([0, 1, 2, 3], [(0, 4)]),
        ([0, 2, 3, 7, 8, 9], [(0, 1), (2, 2), (7, 3)]),
        ([4, 4, 5], [(4, 1), (4, 2)]),  # the same page twice (QEMU < 9.0 may): both land
        ([9, 8, 3], [(9, 1), (8, 1), (3, 1)]),  # descending: header order kept
    ],
)
def test_run_views_cut_where_the_next_page_does_not_follow(
    pages: list[int], runs: list[tuple[int, int]]
) -> None:
    buffer = b"".join(bytes([page]) * PAGE_SIZE for page in range(16))  # one value a page
    views = run_views(memoryview(buffer), np.array(pages, dtype=np.int64) * PAGE_SIZE)
    expected = [buffer[p * PAGE_SIZE : (p + n) * PAGE_SIZE] for p, n in runs]
    assert [bytes(v) for v in views] == expected
    assert [v.nbytes for v in views] == [n * PAGE_SIZE for _, n in runs]
