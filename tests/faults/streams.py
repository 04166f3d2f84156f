"""Where a relayed migration stream is: its records and packets, with their byte offsets.

The fault proxy feeds every byte the source writes on a channel to a :class:`StreamWalker`
and asks it for *units*: the records of the main stream (decoded by the project's own
:class:`~multifd.wire.stream.StreamDecoder`, so a unit is a ``SectionPart``, an ``Eof``, a
``RamMultifdFlush``...) or, on a multifd channel, the init packet and each packet (``sync``
or ``packet``). A unit is reported once its position is decided; :attr:`StreamWalker.safe`
is the offset below which no later unit can start, so the proxy may forward those bytes
without missing a trigger.

A multifd packet is reported as soon as its header is in: its payload length (pages times
4096, or ``next_packet_size`` when compressed) is then known, and the payload streams
through without being buffered here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from multifd.errors import MAIN, ProtocolError, multifd_channel
from multifd.wire.constants import (
    INIT_PACKET_SIZE,
    MULTIFD_FLAG_SYNC,
    MULTIFD_MAGIC,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    QEMU_VM_FILE_MAGIC,
)
from multifd.wire.stream import StreamDecoder

MAIN_MAGIC: Final = QEMU_VM_FILE_MAGIC.to_bytes(4, "big")
MULTIFD_MAGIC_BYTES: Final = MULTIFD_MAGIC.to_bytes(4, "big")
_CHANNEL_ID_AT: Final = 24  # MultiFDInit_t.id, after magic, version and uuid
# magic, version, flags, pages_alloc, normal_pages, next_packet_size (spec 3.2)
_COUNTS: Final = struct.Struct(">IIIIII")
UNKNOWN: Final = "unknown"


@dataclass(frozen=True, slots=True)
class Unit:
    """One record or packet of a channel's stream.

    Attributes:
        channel: ``main`` or ``multifd/N``.
        kind: a main-stream event class name (``SectionPart``, ``RamMultifdFlush``, ``Eof``,
            ...), or ``init``, ``sync``, ``packet`` on a multifd channel.
        nth: 1 for the first unit of this kind on this channel, 2 for the next...
        start: stream offset of its first byte.
        end: stream offset after its last byte (for a packet: after its payload).
    """

    channel: str
    kind: str
    nth: int
    start: int
    end: int


class _Counter:
    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def next(self, kind: str) -> int:
        self._seen[kind] = self._seen.get(kind, 0) + 1
        return self._seen[kind]


class _MainWalker:
    def __init__(self) -> None:
        self._decoder = StreamDecoder(MAIN)
        self._count = _Counter()
        self.broken = False  # the stream stopped decoding: no more units, forward everything

    def feed(self, data: bytes) -> list[Unit]:
        if self.broken:
            return []
        self._decoder.feed(data)
        units = []
        try:
            while True:
                start = self._decoder.offset
                event = self._decoder.next_event()
                if event is None:
                    break
                kind = type(event).__name__
                units.append(Unit(MAIN, kind, self._count.next(kind), start, self._decoder.offset))
        except ProtocolError:
            self.broken = True
        return units

    def safe(self, received: int) -> int:
        return received if self.broken else self._decoder.offset


class _MultifdWalker:
    def __init__(self, compressed: bool) -> None:
        self._compressed = compressed
        self._pending = bytearray()  # the init packet or header being gathered
        self._pending_at = 0  # its stream offset
        self._skip = 0  # payload bytes still to pass before the next header
        self._count = _Counter()
        self.channel = UNKNOWN
        self.broken = False

    def feed(self, data: bytes, offset: int) -> list[Unit]:
        """``data`` arrived at stream ``offset``."""
        units: list[Unit] = []
        view = memoryview(data)
        while view and not self.broken:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                offset += step
                view = view[step:]
                continue
            if not self._pending:
                self._pending_at = offset
            want = (INIT_PACKET_SIZE if self.channel == UNKNOWN else PACKET_HEADER_SIZE) - len(
                self._pending
            )
            take = view[:want]
            self._pending += take
            offset += len(take)
            view = view[len(take) :]
            if len(take) == want:
                units.append(self._unit())
                self._pending.clear()
        return units

    def _unit(self) -> Unit:
        start = self._pending_at
        if self.channel == UNKNOWN:
            self.channel = multifd_channel(self._pending[_CHANNEL_ID_AT])
            return Unit(self.channel, "init", 1, start, start + INIT_PACKET_SIZE)
        magic, _version, flags, _alloc, normal, next_size = _COUNTS.unpack_from(self._pending)
        if magic != MULTIFD_MAGIC:
            self.broken = True
        payload = next_size if self._compressed and normal else normal * PAGE_SIZE
        self._skip = payload
        kind = "sync" if flags & MULTIFD_FLAG_SYNC else "packet"
        end = start + PACKET_HEADER_SIZE + payload
        return Unit(self.channel, kind, self._count.next(kind), start, end)

    def safe(self, received: int) -> int:
        if self.broken or not self._pending:
            return received
        return self._pending_at


class StreamWalker:
    """Follows one channel's source-to-destination bytes, whatever the channel turns out to be.

    Args:
        compressed: multifd payloads are ``next_packet_size`` bytes (zlib, zstd), not pages.
    """

    def __init__(self, *, compressed: bool = False) -> None:
        self._compressed = compressed
        self._early = bytearray()  # the bytes before the magic told the channel kind
        self._main: _MainWalker | None = None
        self._multifd: _MultifdWalker | None = None
        self.received = 0  # bytes fed so far

    @property
    def channel(self) -> str:
        """``main``, ``multifd/N`` or ``unknown`` (before the magic, or the init packet)."""
        if self._main is not None:
            return MAIN
        if self._multifd is not None:
            return self._multifd.channel
        return UNKNOWN

    def feed(self, data: bytes) -> list[Unit]:
        """Account for ``data``, the next bytes of the stream; the units it completed."""
        offset = self.received
        self.received += len(data)
        if self._main is None and self._multifd is None:
            self._early += data
            if len(self._early) < len(MAIN_MAGIC):
                return []
            if self._early.startswith(MAIN_MAGIC):
                self._main = _MainWalker()
            else:
                self._multifd = _MultifdWalker(self._compressed)
            data, offset = bytes(self._early), 0  # the walker sees the stream from byte 0
            self._early.clear()
        return self._feed_all(data, offset)

    def _feed_all(self, data: bytes, offset: int) -> list[Unit]:
        if self._main is not None:
            return self._main.feed(data)
        assert self._multifd is not None
        return self._multifd.feed(data, offset)

    @property
    def safe(self) -> int:
        """Every byte before this offset may be forwarded: no unit starts before it later."""
        if self._main is not None:
            return self._main.safe(self.received)
        if self._multifd is not None:
            return self._multifd.safe(self.received)
        return 0
