"""The receiver's per-packet checks on raw headers agree with RamPacket's (spec 3.4)."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd.errors import ProtocolError
from multifd.wire.constants import (
    MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    PAGE_SIZE,
    PAGES_PER_PACKET,
)
from multifd.wire.packets import (
    RamPacket,
    consecutive_from,
    offsets_view,
    pages_inside,
    unpack_counts,
)

CHANNEL = "multifd/1"
FIXED = struct.Struct(">IIIIIIQI")
FEW = settings(max_examples=300, deadline=None)
U64 = st.integers(0, 2**64 - 1)


def header(offsets: list[int], **fields: int) -> bytes:
    """A header naming block "mem" with ``offsets``, counts and fields as given."""
    data = bytearray(
        RamPacket(flags=0, packet_num=7, ramblock="mem", normal_pages=1, offsets=(0,)).pack()
    )
    values = {
        "magic": MULTIFD_MAGIC,
        "version": MULTIFD_VERSION,
        "flags": 0,
        "alloc": PAGES_PER_PACKET,
        "normal": len(offsets),
        "next_size": 0,
        "packet_num": 7,
        "zero": 0,
    }
    values.update(fields)
    FIXED.pack_into(data, 0, *values.values())
    struct.pack_into(f">{len(offsets)}Q", data, len(data) - 8 * PAGES_PER_PACKET, *offsets)
    return bytes(data)


counts = st.fixed_dictionaries(
    {
        "magic": st.sampled_from([MULTIFD_MAGIC, 0x11223345, 0]),
        "version": st.sampled_from([MULTIFD_VERSION, 2, 0]),
        "flags": st.sampled_from([0, 1, 0x3F, MULTIFD_FLAG_DEVICE_STATE, 0xFFFFFFFF]),
        "alloc": st.sampled_from([0, 1, 127, 128, 129, 0xFFFFFFFF]),
        "normal": st.sampled_from([0, 1, 64, 128, 129, 0xFFFFFFFF]),
        "next_size": st.sampled_from([0, 4096, 0xFFFFFFFF]),
        "zero": st.sampled_from([0, 1, 64, 127, 128, 0xFFFFFFFF]),
    }
)


@FEW
@given(counts)
def test_unpack_counts_accepts_and_refuses_what_unpack_does(fields: dict[str, int]) -> None:
    data = header([0], **fields)
    expected: ProtocolError | None = None
    try:
        packet = RamPacket.unpack(data, channel=CHANNEL)
    except ProtocolError as exc:
        expected = exc
    if expected is not None:
        with pytest.raises(ProtocolError, match="^" + re.escape(str(expected)) + "$"):
            unpack_counts(data, channel=CHANNEL)
    else:
        got = unpack_counts(data, channel=CHANNEL)
        assert got == (
            packet.flags,
            packet.normal_pages,
            packet.zero_pages,
            packet.next_packet_size,
        )


def runs() -> st.SearchStrategy[list[int]]:
    """Offset arrays, most of them consecutive pages (some right below 2**64), some not."""
    consecutive = st.tuples(
        st.one_of(U64, st.integers(2**64 - 200 * PAGE_SIZE, 2**64 - 1)),
        st.integers(1, PAGES_PER_PACKET),
    ).map(lambda t: [t[0] + i * PAGE_SIZE for i in range(t[1])])
    fitting = consecutive.filter(lambda offsets: offsets[-1] < 2**64)
    broken = st.tuples(fitting, st.data()).map(_break)
    return st.one_of(fitting, broken, st.lists(U64, min_size=1, max_size=PAGES_PER_PACKET))


def _break(args: tuple[list[int], st.DataObject]) -> list[int]:
    offsets, data = args
    index = data.draw(st.integers(0, len(offsets) - 1))
    offsets[index] = data.draw(U64.filter(lambda v: v != offsets[index]))
    return offsets


@FEW
@given(runs())
def test_consecutive_from_finds_exactly_the_runs_of_pages(offsets: list[int]) -> None:
    first = offsets[0]
    expected = all(v == first + i * PAGE_SIZE for i, v in enumerate(offsets))
    found = consecutive_from(header(offsets), len(offsets))
    assert found == (first if expected else None)


def test_consecutive_from_refuses_a_run_whose_lanes_would_carry() -> None:
    # 2**64 - 4096 then 0 looks like one run if the top lane carries into the next.
    offsets = [2**64 - PAGE_SIZE, 0]
    assert consecutive_from(header(offsets), 2) is None
    assert consecutive_from(header(offsets), 1) == 2**64 - PAGE_SIZE
    assert consecutive_from(header([]), 0) is None


@FEW
@given(
    st.lists(
        st.one_of(st.integers(0, 64).map(lambda p: p * PAGE_SIZE), U64),
        max_size=PAGES_PER_PACKET,
    ),
    st.integers(1, 64).map(lambda p: p * PAGE_SIZE),
)
def test_pages_inside_agrees_with_check_offsets(offsets: list[int], block_size: int) -> None:
    data = header(offsets or [0], normal=len(offsets))
    packet = (
        RamPacket.unpack(data, channel=CHANNEL) if offsets else RamPacket(flags=0, packet_num=0)
    )
    try:
        packet.check_offsets(block_size, channel=CHANNEL)
        valid = True
    except ProtocolError:
        valid = False
    assert pages_inside(offsets_view(bytearray(data))[: len(offsets)], block_size) is valid


def test_offsets_view_follows_the_header_it_was_made_from() -> None:
    data = bytearray(header([PAGE_SIZE]))
    view = offsets_view(data)
    data[:] = header([5 * PAGE_SIZE, 9 * PAGE_SIZE])
    assert view[:2].tolist() == [5 * PAGE_SIZE, 9 * PAGE_SIZE]
