"""Per-channel counters of the engine and their frozen snapshots."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ChannelCounters:
    """What one multifd channel moved so far (a snapshot; it never changes).

    Attributes:
        channel: the channel name, ``"multifd/N"``.
        packets: RAM packets, SYNC packets included.
        sync_packets: packets with ``MULTIFD_FLAG_SYNC``.
        pages: normal pages (whose data travelled).
        zero_pages: pages announced as zero.
        bytes: bytes on the wire: init packet, headers and payloads.
    """

    channel: str
    packets: int = 0
    sync_packets: int = 0
    pages: int = 0
    zero_pages: int = 0
    bytes: int = 0


class Counters:
    """Mutable counters owned by one channel thread.

    Only the channel thread writes them; other threads call :meth:`snapshot`, which may see
    a packet half-counted but never a torn integer.
    """

    __slots__ = ("bytes", "channel", "packets", "pages", "sync_packets", "zero_pages")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.packets = 0
        self.sync_packets = 0
        self.pages = 0
        self.zero_pages = 0
        self.bytes = 0

    def count(self, *, pages: int, zero_pages: int, sync: bool, size: int) -> None:
        self.packets += 1
        self.sync_packets += sync
        self.pages += pages
        self.zero_pages += zero_pages
        self.bytes += size

    def snapshot(self) -> ChannelCounters:
        return ChannelCounters(
            self.channel,
            self.packets,
            self.sync_packets,
            self.pages,
            self.zero_pages,
            self.bytes,
        )
