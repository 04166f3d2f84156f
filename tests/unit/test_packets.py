"""Multifd packets against the spec's test vectors TV1-TV5 and its receiver checks (2.3, 3.4)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from multifd.errors import ProtocolError
from multifd.wire.constants import (
    INIT_PACKET_SIZE,
    MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_ZSTD,
    PACKET_HEADER_SIZE,
    PAGES_PER_PACKET,
)
from multifd.wire.packets import InitPacket, RamPacket

CHANNEL = "multifd/3"
TV1_UUID = bytes.fromhex("123456789abcdef01122334455667788")
TV1 = bytes.fromhex(
    "11223344 00000001 12345678 9abcdef0 11223344 55667788 02000000 00000000" + " 00" * 32
)


def _hexdump(lines: dict[int, str], size: int = PACKET_HEADER_SIZE) -> bytes:
    """Bytes from a spec-style dump: {offset: "hex words"}, every other byte zero."""
    data = bytearray(size)
    for offset, words in lines.items():
        raw = bytes.fromhex(words)
        data[offset : offset + len(raw)] = raw
    return bytes(data)


TV2 = _hexdump(
    {
        0x00: "11223344 00000001 00000000 00000080",
        0x10: "00000002 00002000 00000000 00000005",
        0x40: "70632e72 616d0000",
        0x140: "00000000 00000000 00000000 00001000",
    }
)
TV3 = _hexdump(
    {
        0x00: "11223344 00000001 00000001 00000000",
        0x10: "00000000 00000000 00000000 00000007",
    }
)
TV4 = _hexdump(
    {
        0x00: "11223344 00000001 00000000 00000080",
        0x10: "00000000 00003000 00000000 00000003",
        0x40: "6d656d00",
        0x140: "00000000 00000000 00000000 00001000",
        0x150: "00000000 00005000",
    }
)
TV5 = _hexdump(
    {
        0x00: "11223344 00000001 00000000 00000080",
        0x10: "00000001 00001000 00000000 00000009",
        0x20: "00000002 00000000 00000000 00000000",
        0x40: "70632e72 616d0000",
        0x140: "00000000 00002000 00000000 00003000",
        0x150: "00000000 00004000 00000000 00000000",
    }
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _with(packet: bytes, offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(packet)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


# --- TV1: the init packet ----------------------------------------------------------------


def test_tv1_init_packet_packs_byte_exact() -> None:
    assert len(TV1) == INIT_PACKET_SIZE
    assert InitPacket(channel_id=2, uuid=TV1_UUID).pack() == TV1


def test_tv1_init_packet_unpacks() -> None:
    assert InitPacket.unpack(TV1, channel=CHANNEL) == InitPacket(channel_id=2, uuid=TV1_UUID)


def test_init_packet_without_uuid_is_all_zero_uuid() -> None:
    packed = InitPacket(channel_id=0).pack()
    assert packed[8:24] == bytes(16)
    assert packed[24] == 0


@pytest.mark.parametrize(
    ("offset", "value", "what", "expected", "received"),
    [
        (0, 0x5145564D, "init packet magic", "0x11223344", "0x5145564d"),
        (4, 2, "init packet version", 1, 2),
    ],
)
def test_init_packet_rejects_bad_magic_and_version(
    offset: int, value: int, what: str, expected: object, received: object
) -> None:
    with pytest.raises(ProtocolError) as info:
        InitPacket.unpack(_with(TV1, offset, ">I", value), channel=CHANNEL)
    assert info.value.what == what
    assert (info.value.channel, info.value.expected, info.value.received) == (
        CHANNEL,
        expected,
        received,
    )


@pytest.mark.parametrize("size", [0, 1, INIT_PACKET_SIZE - 1, INIT_PACKET_SIZE + 1])
def test_init_packet_rejects_truncated_input(size: int) -> None:
    with pytest.raises(ProtocolError) as info:
        InitPacket.unpack((TV1 * 2)[:size], channel=CHANNEL)
    assert (info.value.expected, info.value.received) == (INIT_PACKET_SIZE, size)


@pytest.mark.parametrize(
    "packet", [InitPacket(channel_id=256), InitPacket(channel_id=0, uuid=b"short")]
)
def test_init_packet_refuses_to_pack_invalid_fields(packet: InitPacket) -> None:
    with pytest.raises(ValueError, match=r"uuid|byte"):
        packet.pack()


# --- TV2, TV3, TV5: packets we send ------------------------------------------------------


def test_tv2_nocomp_data_packet() -> None:
    packet = RamPacket(
        flags=0,
        packet_num=5,
        normal_pages=2,
        ramblock="pc.ram",
        offsets=(0, 0x1000),
        next_packet_size=8192,
    )
    packed = packet.pack()
    assert packed == TV2
    assert _sha256(packed) == "b062dc59373aa5c0cca633231aaffc01ced8c6018eb07fd1e231535972cb3aa2"
    assert RamPacket.unpack(packed, channel=CHANNEL) == packet


def test_tv3_newest_sync_packet() -> None:
    packed = RamPacket.sync(7).pack()
    assert packed == TV3
    assert _sha256(packed) == "0dc96baf3a176ccd326c1cbede1703edfd10c1311bd2a3ac25dc610cc04e8a7f"
    decoded = RamPacket.unpack(packed, channel=CHANNEL)
    assert decoded.is_sync
    assert (decoded.page_count, decoded.pages_alloc, decoded.stale) == (0, 0, False)


def test_tv5_packet_with_zero_pages() -> None:
    packet = RamPacket(
        flags=0,
        packet_num=9,
        normal_pages=1,
        zero_pages=2,
        ramblock="pc.ram",
        offsets=(0x2000, 0x3000, 0x4000),
        next_packet_size=4096,
    )
    packed = packet.pack()
    assert packed == TV5
    assert _sha256(packed) == "bd5cb2d61ddbb7d88c2a80c8d1022e019fffef6fde5fda21908586b5f9a598f4"
    assert RamPacket.unpack(packed, channel=CHANNEL) == packet


# --- TV4 and other 7.2 artefacts a receiver must accept ----------------------------------


def test_tv4_empty_packet_with_stale_fields_is_accepted_and_cleaned() -> None:
    decoded = RamPacket.unpack(TV4, channel=CHANNEL)
    assert decoded.flags == 0
    assert decoded.packet_num == 3
    assert (decoded.normal_pages, decoded.zero_pages) == (0, 0)
    assert decoded.stale
    # Stale fields must not leak into what the receiver acts on.
    assert decoded.ramblock == ""
    assert decoded.offsets == ()
    assert decoded.next_packet_size == 12288  # kept for traces only


def test_72_sync_packet_may_carry_pages() -> None:
    header = _with(TV2, 8, ">I", MULTIFD_FLAG_SYNC | MULTIFD_FLAG_ZSTD)
    decoded = RamPacket.unpack(header, channel=CHANNEL)
    assert decoded.is_sync
    assert decoded.method == MULTIFD_FLAG_ZSTD
    assert decoded.offsets == (0, 0x1000)


@pytest.mark.parametrize("pages_alloc", [0, 1, PAGES_PER_PACKET])
def test_pages_alloc_up_to_local_page_count_is_accepted(pages_alloc: int) -> None:
    header = _with(_with(TV2, 12, ">I", pages_alloc), 16, ">I", min(2, pages_alloc))
    assert RamPacket.unpack(header, channel=CHANNEL).pages_alloc == pages_alloc


# --- spec 3.4 receiver checks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "value", "what", "expected", "received"),
    [
        (0, 0x5145564D, "packet magic", "0x11223344", "0x5145564d"),
        (4, 0, "packet version", 1, 0),
        (12, PAGES_PER_PACKET + 1, "packet pages_alloc", "<= 128", 129),
        (16, PAGES_PER_PACKET + 1, "packet normal_pages", "<= pages_alloc 128", 129),
        (
            32,
            PAGES_PER_PACKET - 1,
            "packet zero_pages",
            "<= pages_alloc - normal_pages = 126",
            127,
        ),
        (
            8,
            MULTIFD_FLAG_DEVICE_STATE,
            "packet flags",
            "a RAM packet (no DEVICE_STATE bit)",
            "0x40",
        ),
    ],
)
def test_packet_header_checks(
    offset: int, value: int, what: str, expected: object, received: object
) -> None:
    with pytest.raises(ProtocolError) as info:
        RamPacket.unpack(_with(TV2, offset, ">I", value), channel=CHANNEL)
    error = info.value
    assert (error.what, error.channel, error.expected, error.received) == (
        what,
        CHANNEL,
        expected,
        received,
    )


def test_normal_pages_above_a_smaller_pages_alloc_is_rejected() -> None:
    header = _with(_with(TV2, 12, ">I", 1), 16, ">I", 2)
    with pytest.raises(ProtocolError, match="normal_pages"):
        RamPacket.unpack(header, channel=CHANNEL)


@pytest.mark.parametrize("size", [0, 12, 320, PACKET_HEADER_SIZE - 1, PACKET_HEADER_SIZE + 1])
def test_truncated_packet_header_is_rejected(size: int) -> None:
    with pytest.raises(ProtocolError) as info:
        RamPacket.unpack((TV2 * 2)[:size], channel=CHANNEL)
    assert (info.value.expected, info.value.received) == (PACKET_HEADER_SIZE, size)


def test_non_utf8_block_name_is_a_protocol_error() -> None:
    header = bytearray(TV2)
    header[0x40:0x42] = b"\xff\xfe"
    with pytest.raises(ProtocolError, match="ramblock"):
        RamPacket.unpack(bytes(header), channel=CHANNEL)


def test_block_name_ignores_byte_255() -> None:
    # The receiver forces the last name byte to NUL (spec 3.1): a 256-byte name is cut.
    header = bytearray(TV2)
    header[0x40:0x140] = b"a" * 256
    assert RamPacket.unpack(bytes(header), channel=CHANNEL).ramblock == "a" * 255


@pytest.mark.parametrize(
    ("offsets", "expected", "received"),
    [
        ((0x3FF000, 0x400000), "<= 0x3ff000", "0x400000"),
        ((0x1800,), "a multiple of 4096", "0x1800"),
        ((1 << 63,), "<= 0x3ff000", hex(1 << 63)),
    ],
)
def test_offsets_out_of_range_or_unaligned_are_rejected(
    offsets: tuple[int, ...], expected: str, received: str
) -> None:
    packet = RamPacket(
        flags=0, packet_num=1, normal_pages=len(offsets), ramblock="mem", offsets=offsets
    )
    decoded = RamPacket.unpack(packet.pack(), channel=CHANNEL)
    with pytest.raises(ProtocolError) as info:
        decoded.check_offsets(4 << 20, channel=CHANNEL)
    assert (info.value.channel, info.value.expected, info.value.received) == (
        CHANNEL,
        expected,
        received,
    )


def test_offsets_inside_the_block_pass() -> None:
    packet = RamPacket(flags=0, packet_num=1, normal_pages=2, ramblock="mem", offsets=(0, 0x3FF000))
    RamPacket.unpack(packet.pack(), channel=CHANNEL).check_offsets(4 << 20, channel=CHANNEL)
