"""Migration statistics as frozen snapshots, shaped like QEMU's ``query-migrate``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from multifd.engine.stats import ChannelCounters as ChannelStats
from multifd.errors import MAIN
from multifd.wire.constants import PAGE_SIZE

__all__ = ["ChannelStats", "MigrationStats", "PassStats", "Status"]


class Status(enum.Enum):
    """Migration states, named as QEMU's ``MigrationStatus``."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class PassStats:
    """One pre-copy pass: what it sent, how long it took, what got dirty meanwhile."""

    number: int
    pages: int
    bytes: int
    seconds: float
    dirty_pages: int = 0  # pages dirtied while the pass ran (the next pass's work)

    @property
    def bandwidth(self) -> float:
        """Bytes per second the pass put on the wire."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def dirty_rate(self) -> float:
        """Pages dirtied per second during the pass (QEMU's dirty-pages-rate)."""
        return self.dirty_pages / self.seconds if self.seconds > 0 else 0.0

    def with_dirty(self, pages: int) -> PassStats:
        return replace(self, dirty_pages=pages)

    def to_json(self) -> dict[str, Any]:
        return {
            "pass": self.number,
            "pages": self.pages,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 6),
            "mbps": round(self.bandwidth * 8 / 1e6, 3),
            "dirty-pages": self.dirty_pages,
            "dirty-pages-rate": round(self.dirty_rate, 3),
        }


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """One snapshot of a migration, on either side.

    Times are milliseconds, as in ``query-migrate``; a destination counts them from its
    source's first connection, not from when it started listening. The page and byte
    totals derive from the per-channel figures: ``duplicate`` counts zero pages (QEMU's
    name), ``normal`` the pages whose data crossed the wire.
    """

    status: Status
    total_time_ms: float = 0.0
    setup_time_ms: float = 0.0
    downtime_ms: float = 0.0
    expected_downtime_ms: float = 0.0
    total: int = 0
    remaining: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: float = 0.0
    channels: tuple[ChannelStats, ...] = field(default_factory=tuple)
    passes: tuple[PassStats, ...] = field(default_factory=tuple)
    error: str | None = None
    cpu_throttle_percentage: int = 0  # auto-converge's hold on the writers (source only)

    @property
    def transferred(self) -> int:
        return sum(ch.bytes for ch in self.channels)

    @property
    def multifd_bytes(self) -> int:
        return sum(ch.bytes for ch in self.channels if ch.channel != MAIN)

    @property
    def normal(self) -> int:
        return sum(ch.pages for ch in self.channels)

    @property
    def duplicate(self) -> int:
        return sum(ch.zero_pages for ch in self.channels)

    @property
    def normal_bytes(self) -> int:
        return self.normal * PAGE_SIZE

    @property
    def mbps(self) -> float:
        """Throughput over the whole migration in megabits per second, as QEMU reports it."""
        if self.total_time_ms <= 0:
            return 0.0
        return self.transferred * 8 / 1e6 / (self.total_time_ms / 1e3)

    @property
    def pages_per_second(self) -> float:
        if self.total_time_ms <= 0:
            return 0.0
        return (self.normal + self.duplicate) / (self.total_time_ms / 1e3)

    def to_json(self) -> dict[str, Any]:
        """A ``query-migrate``-shaped dictionary (QEMU's key names)."""
        result: dict[str, Any] = {
            "status": self.status.value,
            "total-time": round(self.total_time_ms, 3),
            "setup-time": round(self.setup_time_ms, 3),
            "downtime": round(self.downtime_ms, 3),
            "expected-downtime": round(self.expected_downtime_ms, 3),
            "ram": {
                "total": self.total,
                "transferred": self.transferred,
                "remaining": self.remaining,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal_bytes,
                "multifd-bytes": self.multifd_bytes,
                "mbps": round(self.mbps, 3),
                "pages-per-second": round(self.pages_per_second, 3),
                "page-size": PAGE_SIZE,
                "dirty-sync-count": self.dirty_sync_count,
                "dirty-pages-rate": round(self.dirty_pages_rate, 3),
            },
            "passes": [p.to_json() for p in self.passes],
            "channels": [
                {
                    "channel": ch.channel,
                    "packets": ch.packets,
                    "sync-packets": ch.sync_packets,
                    "pages": ch.pages,
                    "zero-pages": ch.zero_pages,
                    "bytes": ch.bytes,
                }
                for ch in self.channels
            ],
        }
        if self.cpu_throttle_percentage:
            result["cpu-throttle-percentage"] = self.cpu_throttle_percentage
        if self.error is not None:
            result["error-desc"] = self.error
        return result
