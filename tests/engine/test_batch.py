"""Packet plans: the vectorised packets must be byte for byte those of one batch at a time."""

from __future__ import annotations

import numpy as np
import pytest

from multifd.engine.batch import Batch, PacketPlan, data_in_one_buffer
from multifd.ram import RamBlock
from multifd.wire.constants import PAGE_SIZE, PAGES_PER_PACKET
from multifd.wire.packets import RamPacket, stamp_header

PAGES = 4 * PAGES_PER_PACKET


def _block(zero_every: int, seed: int) -> RamBlock:
    """A block of random pages, every ``zero_every``-th one (and a random few) all zero."""
    block = RamBlock.anonymous("pc.ram", PAGES * PAGE_SIZE)
    rng = np.random.default_rng(seed)
    block.pages[:] = rng.integers(1, 256, size=block.pages.shape, dtype=np.uint8)
    if zero_every:
        block.pages[::zero_every] = 0
    block.pages[rng.choice(PAGES, size=PAGES // 10, replace=False)] = 0
    return block


def _reference(block: RamBlock, offsets: list[int], detect: bool) -> list[tuple[RamPacket, bytes]]:
    """The packets the plain way: every data page, then every zero page, each group in its
    order, cut into packets of 128 (each packet's data pages come before its zero pages)."""
    zeros = [o for o in offsets if detect and not block.page_view(o).tobytes().strip(b"\0")]
    data = [o for o in offsets if o not in zeros]
    packets: list[tuple[RamPacket, bytes]] = []
    for first in range(0, len(offsets), PAGES_PER_PACKET):
        normal = data[first : first + PAGES_PER_PACKET]
        zero = (data + zeros)[first + len(normal) : first + PAGES_PER_PACKET]
        packet = RamPacket(
            flags=0,
            packet_num=len(packets) + 1,
            normal_pages=len(normal),
            zero_pages=len(zero),
            ramblock=block.name,
            offsets=tuple(normal + zero),
            next_packet_size=len(normal) * PAGE_SIZE,
        )
        packets.append((packet, b"".join(block.page_view(o).tobytes() for o in normal)))
    return packets


def _planned(plan: PacketPlan) -> list[tuple[bytes, bytes, list[int]]]:
    """Header, payload and data offsets of each packet of ``plan``, stamped as a channel does."""
    out: list[tuple[bytes, bytes, list[int]]] = []
    for index in range(len(plan)):
        batch = Batch()
        plan.fill(batch, index)
        assert batch.block is plan.block
        stamp_header(
            batch.header,
            flags=0,
            normal_pages=batch.normal,
            zero_pages=batch.zero,
            next_packet_size=batch.normal * PAGE_SIZE,
            packet_num=index + 1,
        )
        payload = b"".join(bytes(run) for run in batch.runs)
        out.append((bytes(batch.header), payload, batch.offsets.tolist()))
    return out


@pytest.mark.parametrize("detect", [True, False])
@pytest.mark.parametrize(
    ("order", "count"),
    [
        ("ascending", PAGES),  # whole packets of one run each
        ("ascending", PAGES - 37),  # a partial last packet
        ("ascending", 1),
        ("sparse", 300),  # runs broken by skipped pages
        ("shuffled", PAGES),  # every page its own run, zero pages scattered
    ],
)
def test_plan_matches_one_batch_at_a_time(detect: bool, order: str, count: int) -> None:
    block = _block(zero_every=3, seed=count)
    rng = np.random.default_rng(7)
    pages = np.arange(PAGES)
    if order == "sparse":
        pages = np.sort(rng.choice(PAGES, size=count, replace=False))
    elif order == "shuffled":
        pages = rng.permutation(PAGES)
    offsets = pages[:count] * PAGE_SIZE
    planned = _planned(PacketPlan(block, offsets, detect_zero_pages=detect))
    expected = _reference(block, offsets.tolist(), detect)
    assert len(planned) == len(expected) == -(-count // PAGES_PER_PACKET)
    for (header, payload, data_offsets), (packet, data) in zip(planned, expected, strict=True):
        assert header == packet.pack()
        assert payload == data
        assert data_offsets == list(packet.offsets[: packet.normal_pages])


def test_all_zero_pages_make_packets_without_data() -> None:
    block = RamBlock.anonymous("pc.ram", PAGES * PAGE_SIZE)
    plan = PacketPlan(block, np.arange(200) * PAGE_SIZE, detect_zero_pages=True)
    packets = _planned(plan)
    assert [RamPacket.unpack(h, channel="t").zero_pages for h, _, _ in packets] == [128, 72]
    assert all(payload == b"" for _, payload, _ in packets)


def test_a_run_never_crosses_a_packet() -> None:
    block = _block(zero_every=0, seed=1)
    plan = PacketPlan(block, np.arange(PAGES) * PAGE_SIZE, detect_zero_pages=False)
    batch = Batch()
    plan.fill(batch, 1)
    assert [run.nbytes for run in batch.runs] == [PAGES_PER_PACKET * PAGE_SIZE]


@pytest.mark.parametrize("order", ["ascending", "sparse", "shuffled"])
def test_data_in_one_buffer_is_the_payload_in_one_piece(order: str) -> None:
    block = _block(zero_every=3, seed=4)
    rng = np.random.default_rng(11)
    pages = {
        "ascending": np.arange(PAGES),
        "sparse": np.sort(rng.choice(PAGES, size=300, replace=False)),
        "shuffled": rng.permutation(PAGES),
    }[order]
    plan = PacketPlan(block, pages * PAGE_SIZE, detect_zero_pages=True)
    scratch = np.full((PAGES_PER_PACKET, PAGE_SIZE), 0xEE, dtype=np.uint8)
    for (_, payload, _), index in zip(_planned(plan), range(len(plan)), strict=True):
        batch = Batch()
        plan.fill(batch, index)
        buffers = data_in_one_buffer(batch, scratch)
        assert len(buffers) == (1 if batch.normal else 0)
        assert b"".join(bytes(b) for b in buffers) == payload
        if len(batch.runs) == 1:
            assert buffers[0] is batch.runs[0]  # one run goes as it is, not copied


def test_data_in_one_buffer_gathers_into_the_scratch_rows() -> None:
    block = _block(zero_every=0, seed=2)
    plan = PacketPlan(block, np.array([9, 3, 4, 0]) * PAGE_SIZE, detect_zero_pages=False)
    batch = Batch()
    plan.fill(batch, 0)
    scratch = np.zeros((PAGES_PER_PACKET, PAGE_SIZE), dtype=np.uint8)
    (buffer,) = data_in_one_buffer(batch, scratch)
    assert buffer.nbytes == 4 * PAGE_SIZE
    assert np.array_equal(scratch[:4], block.pages[[9, 3, 4, 0]])
    assert not scratch[4:].any()  # rows past the packet's pages are left alone
