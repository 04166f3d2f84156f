"""Multifd channel packets: the init packet and the RAM data packet header.

Layouts follow QEMU's ``MultiFDInit_t`` and ``MultiFDPacket_t`` (spec sections 2.3 and
3.1). Decoding validates what can be checked without knowing the destination's RAM
(magic, version, counts); :meth:`RamPacket.check_offsets` does the rest once the block is
known. Payload bytes are not part of these objects: the engine moves them straight between
sockets and RAM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from multifd.errors import ProtocolError
from multifd.wire.constants import (
    INIT_PACKET_SIZE,
    MULTIFD_FLAG_COMPRESSION_MASK,
    MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_FLAG_SYNC,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    PACKET_FIXED_SIZE,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    PAGES_PER_PACKET,
    RAMBLOCK_NAME_SIZE,
    UUID_SIZE,
)

# magic, version, uuid[16], id, unused1[7], unused2[4] (u64)
_INIT: Final = struct.Struct(">II16sB7s32s")
assert _INIT.size == INIT_PACKET_SIZE

# magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num,
# zero_pages (9.0+; unused[0] high half before), unused32, unused64[3], ramblock[256]
_HEADER: Final = struct.Struct(">IIIIIIQII24s256s")
assert _HEADER.size == PACKET_FIXED_SIZE
_OFFSETS: Final = struct.Struct(f">{PAGES_PER_PACKET}Q")
assert _HEADER.size + _OFFSETS.size == PACKET_HEADER_SIZE

NIL_UUID: Final = bytes(UUID_SIZE)

# The same header as a numpy record, to build many headers in one vectorised pass.
HEADER_DTYPE: Final = np.dtype(
    [
        ("magic", ">u4"),
        ("version", ">u4"),
        ("flags", ">u4"),
        ("pages_alloc", ">u4"),
        ("normal_pages", ">u4"),
        ("next_packet_size", ">u4"),
        ("packet_num", ">u8"),
        ("zero_pages", ">u4"),
        ("unused32", ">u4"),
        ("unused64", "V24"),
        ("ramblock", "S256"),
        ("offsets", ">u8", (PAGES_PER_PACKET,)),
    ]
)
assert HEADER_DTYPE.itemsize == PACKET_HEADER_SIZE

# flags, pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages: the fields of
# a header that vary per packet, contiguous from byte 8 on.
_COUNTS: Final = struct.Struct(">IIIIQI")
_COUNTS_AT: Final = 8
assert HEADER_DTYPE.fields is not None
assert HEADER_DTYPE.fields["flags"][1] == _COUNTS_AT


# magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages:
# what a receiver reads of every header before it knows whether the packet has pages.
_FIXED: Final = struct.Struct(">IIIIIIQI")
RAMBLOCK_AT: Final = _FIXED.size + 4 + 24  # after unused32 and unused64[3]
assert HEADER_DTYPE.fields["ramblock"][1] == RAMBLOCK_AT
_LANE: Final = 64  # bits per offset
# For k consecutive pages from `first`, the offset array read as one big-endian integer is
# first * _ONES[k] + _RAMP[k]: lane i holds first + i * PAGE_SIZE (no lane overflows as long
# as the last offset fits in 64 bits).
_ONES: Final = [
    int.from_bytes(np.ones(k, dtype=">u8").tobytes(), "big") for k in range(PAGES_PER_PACKET + 1)
]
_RAMP: Final = [
    int.from_bytes((np.arange(k, dtype=np.uint64) * PAGE_SIZE).astype(">u8").tobytes(), "big")
    for k in range(PAGES_PER_PACKET + 1)
]


def _encode_name(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= RAMBLOCK_NAME_SIZE:
        raise ValueError(f"ramblock name longer than {RAMBLOCK_NAME_SIZE - 1} bytes: {name!r}")
    return raw


def pack_headers(ramblock: str, offsets: npt.NDArray[np.int64]) -> bytearray:
    """Headers of ``len(offsets)`` packets of one block, back to back, counts left zero.

    Row ``i`` of ``offsets`` (shape ``(count, 128)``, unused slots zero) becomes the offset
    array of header ``i``; :func:`stamp_header` fills in the fields that vary per packet.
    Stamped, each header is byte for byte what :meth:`RamPacket.pack` makes.
    """
    raw = bytearray(len(offsets) * PACKET_HEADER_SIZE)
    headers = np.frombuffer(raw, dtype=HEADER_DTYPE)
    headers["magic"] = MULTIFD_MAGIC
    headers["version"] = MULTIFD_VERSION
    headers["ramblock"] = _encode_name(ramblock)
    headers["offsets"] = offsets
    return raw


def stamp_header(
    header: bytearray | memoryview,
    *,
    flags: int,
    normal_pages: int,
    zero_pages: int,
    next_packet_size: int,
    packet_num: int,
) -> None:
    """Write the per-packet fields into a header made by :func:`pack_headers`.

    ``pages_alloc`` is set to 128 as for every packet with pages (spec 3.1).
    """
    _COUNTS.pack_into(
        header,
        _COUNTS_AT,
        flags,
        PAGES_PER_PACKET,
        normal_pages,
        next_packet_size,
        packet_num,
        zero_pages,
    )


@dataclass(frozen=True, slots=True)
class InitPacket:
    """``MultiFDInit_t``: the first 64 bytes of every multifd channel."""

    channel_id: int  # id
    uuid: bytes = NIL_UUID  # uuid, raw 16 bytes in the textual order of the UUID

    def pack(self) -> bytes:
        self.validate(channel="local")
        return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.uuid, self.channel_id, b"", b"")

    def validate(self, *, channel: str) -> None:
        if len(self.uuid) != UUID_SIZE:
            raise ValueError(f"uuid must be {UUID_SIZE} bytes, got {len(self.uuid)}")
        if not 0 <= self.channel_id <= 0xFF:
            raise ValueError(f"{channel}: channel id {self.channel_id} does not fit in a byte")

    @classmethod
    def unpack(cls, data: bytes | memoryview, *, channel: str) -> InitPacket:
        """Decode and check magic and version (spec 2.3 checks 1 and 2)."""
        if len(data) != INIT_PACKET_SIZE:
            raise ProtocolError(
                "truncated init packet",
                channel=channel,
                expected=INIT_PACKET_SIZE,
                received=len(data),
            )
        magic, version, uuid, channel_id, _unused1, _unused2 = _INIT.unpack(data)
        if magic != MULTIFD_MAGIC:
            raise ProtocolError(
                "init packet magic",
                channel=channel,
                expected=f"{MULTIFD_MAGIC:#010x}",
                received=f"{magic:#010x}",
            )
        if version != MULTIFD_VERSION:
            raise ProtocolError(
                "init packet version",
                channel=channel,
                expected=MULTIFD_VERSION,
                received=version,
            )
        return cls(channel_id=channel_id, uuid=bytes(uuid))


@dataclass(frozen=True, slots=True)
class RamPacket:
    """``MultiFDPacket_t``: the 1344-byte header of a multifd RAM packet.

    ``offsets`` holds the ``normal_pages`` offsets of pages whose data follows, then the
    ``zero_pages`` offsets of pages announced as zero. A packet with no pages carries no
    block name and no offsets, whatever a pre-9.0 sender left in those fields.
    """

    flags: int
    packet_num: int
    normal_pages: int = 0
    zero_pages: int = 0
    ramblock: str = ""
    offsets: tuple[int, ...] = ()
    pages_alloc: int = PAGES_PER_PACKET
    next_packet_size: int = 0
    # Fields a pre-9.0 sender leaves stale in packets without pages; kept for traces only.
    stale: bool = field(default=False, compare=False)

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)

    @property
    def method(self) -> int:
        """The compression method field of ``flags`` (``MULTIFD_FLAG_COMPRESSION_MASK``)."""
        return self.flags & MULTIFD_FLAG_COMPRESSION_MASK

    @property
    def page_count(self) -> int:
        return self.normal_pages + self.zero_pages

    @classmethod
    def sync(cls, packet_num: int) -> RamPacket:
        """A SYNC packet as QEMU 9.0+ sends it: flags 0x1, every count zero."""
        return cls(flags=MULTIFD_FLAG_SYNC, packet_num=packet_num, pages_alloc=0)

    def pack(self) -> bytes:
        """The full 1344-byte header; the offset array is always sent whole (spec 3.1)."""
        name = _encode_name(self.ramblock)
        offsets = self.offsets + (0,) * (PAGES_PER_PACKET - len(self.offsets))
        return _HEADER.pack(
            MULTIFD_MAGIC,
            MULTIFD_VERSION,
            self.flags,
            self.pages_alloc,
            self.normal_pages,
            self.next_packet_size,
            self.packet_num,
            self.zero_pages,
            0,
            b"",
            name,
        ) + _OFFSETS.pack(*offsets)

    @classmethod
    def unpack(cls, data: bytes | memoryview, *, channel: str) -> RamPacket:
        """Decode a header and check it as QEMU does (spec 3.4), before any block lookup."""
        if len(data) != PACKET_HEADER_SIZE:
            raise ProtocolError(
                "truncated packet header",
                channel=channel,
                expected=PACKET_HEADER_SIZE,
                received=len(data),
            )
        (
            magic,
            version,
            flags,
            pages_alloc,
            normal,
            next_size,
            packet_num,
            zero,
            _unused32,
            _unused64,
            raw_name,
        ) = _HEADER.unpack_from(data)
        if magic != MULTIFD_MAGIC:
            raise ProtocolError(
                "packet magic",
                channel=channel,
                expected=f"{MULTIFD_MAGIC:#010x}",
                received=f"{magic:#010x}",
            )
        if version != MULTIFD_VERSION:
            raise ProtocolError(
                "packet version", channel=channel, expected=MULTIFD_VERSION, received=version
            )
        if flags & MULTIFD_FLAG_DEVICE_STATE:
            raise ProtocolError(
                "packet flags",
                channel=channel,
                expected="a RAM packet (no DEVICE_STATE bit)",
                received=f"{flags:#x}",
            )
        if pages_alloc > PAGES_PER_PACKET:
            raise ProtocolError(
                "packet pages_alloc",
                channel=channel,
                expected=f"<= {PAGES_PER_PACKET}",
                received=pages_alloc,
            )
        if normal > pages_alloc:
            raise ProtocolError(
                "packet normal_pages",
                channel=channel,
                expected=f"<= pages_alloc {pages_alloc}",
                received=normal,
            )
        if zero > pages_alloc - normal:
            raise ProtocolError(
                "packet zero_pages",
                channel=channel,
                expected=f"<= pages_alloc - normal_pages = {pages_alloc - normal}",
                received=zero,
            )
        count = normal + zero
        if count == 0:
            stale = bool(next_size or raw_name.strip(b"\0"))
            return cls(
                flags=flags,
                packet_num=packet_num,
                pages_alloc=pages_alloc,
                next_packet_size=next_size,
                stale=stale,
            )
        name = raw_name[: RAMBLOCK_NAME_SIZE - 1].split(b"\0", 1)[0]
        try:
            ramblock = name.decode()
        except UnicodeDecodeError:
            raise ProtocolError(
                "packet ramblock",
                channel=channel,
                expected="a UTF-8 block name",
                received=name[:64],
            ) from None
        offsets = _OFFSETS.unpack_from(data, PACKET_FIXED_SIZE)[:count]
        return cls(
            flags=flags,
            packet_num=packet_num,
            normal_pages=normal,
            zero_pages=zero,
            ramblock=ramblock,
            offsets=offsets,
            pages_alloc=pages_alloc,
            next_packet_size=next_size,
        )

    def check_offsets(self, block_size: int, *, channel: str) -> None:
        """Every offset must name a whole page inside a block of ``block_size`` bytes."""
        limit = block_size - PAGE_SIZE
        for offset in self.offsets:
            if offset > limit:
                raise ProtocolError(
                    f"offset in block {self.ramblock!r}",
                    channel=channel,
                    expected=f"<= {limit:#x}",
                    received=f"{offset:#x}",
                )
            if offset % PAGE_SIZE:
                raise ProtocolError(
                    f"offset in block {self.ramblock!r}",
                    channel=channel,
                    expected=f"a multiple of {PAGE_SIZE}",
                    received=f"{offset:#x}",
                )


# -- the receiver's per-packet fast path ----------------------------------------------------
# RamPacket.unpack builds an object and a tuple of 128 ints per packet; a receiver moving
# gigabytes checks the same things from the raw header instead, and falls back to
# RamPacket for the error (so every message stays the one RamPacket raises) and for traces.


def unpack_counts(
    header: bytes | bytearray | memoryview, *, channel: str
) -> tuple[int, int, int, int]:
    """``flags, normal_pages, zero_pages, next_packet_size`` of a full 1344-byte header.

    Checks what :meth:`RamPacket.unpack` checks before the block name (spec 3.4): magic,
    version, no DEVICE_STATE, ``pages_alloc`` and both counts.

    Raises:
        ProtocolError: as :meth:`RamPacket.unpack` would, with the same message.
    """
    magic, version, flags, alloc, normal, next_size, _num, zero = _FIXED.unpack_from(header)
    if (
        magic == MULTIFD_MAGIC
        and version == MULTIFD_VERSION
        and not flags & MULTIFD_FLAG_DEVICE_STATE
        and normal + zero <= alloc <= PAGES_PER_PACKET
    ):
        return flags, normal, zero, next_size
    RamPacket.unpack(memoryview(header), channel=channel)
    raise AssertionError("RamPacket.unpack accepted a header unpack_counts refused")


def offsets_view(header: bytearray) -> npt.NDArray[np.uint64]:
    """The 128 offsets of ``header`` as a big-endian array sharing its memory."""
    return np.frombuffer(header, dtype=">u8", count=PAGES_PER_PACKET, offset=PACKET_FIXED_SIZE)


def consecutive_from(header: bytes | bytearray | memoryview, count: int) -> int | None:
    """The first offset if the first ``count`` offsets are consecutive ascending pages.

    None when they are not (or when ``count`` is 0). Says nothing about alignment or
    range: the caller checks the first offset and the last.
    """
    if not count:
        return None
    first = int.from_bytes(header[PACKET_FIXED_SIZE : PACKET_FIXED_SIZE + 8], "big")
    last = first + (count - 1) * PAGE_SIZE
    if last >> _LANE:
        return None  # a lane would carry into the next one
    end = PACKET_FIXED_SIZE + 8 * count
    if int.from_bytes(header[end - 8 : end], "big") != last:
        return None  # the usual miss, told without reading every offset
    packed = int.from_bytes(header[PACKET_FIXED_SIZE:end], "big")
    return first if packed == first * _ONES[count] + _RAMP[count] else None


def pages_inside(offsets: npt.NDArray[np.uint64], block_size: int) -> bool:
    """Whether every offset names a whole page inside a block of ``block_size`` bytes.

    The vectorised form of :meth:`RamPacket.check_offsets`, which says which offset is bad.
    """
    if not len(offsets):
        return True
    if int(np.bitwise_or.reduce(offsets)) & (PAGE_SIZE - 1):
        return False
    return int(np.maximum.reduce(offsets)) <= block_size - PAGE_SIZE
