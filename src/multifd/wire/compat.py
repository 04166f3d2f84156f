"""Peer profiles: what QEMU does not negotiate and both ends must agree on.

QEMU's main stream announces neither the sync mode nor where zero pages travel nor whether
the switchover-start command may appear (spec section 11.4). A sender picks a profile for
the peer it talks to; our receiver detects every variant from the stream itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from multifd.errors import ConfigError


class SyncMode(enum.Enum):
    """Which main-channel record pairs with each round of SYNC packets (spec 6.1)."""

    PER_SECTION = "per-section"  # every RAM_SAVE_FLAG_EOS; QEMU <= 8.0
    PER_ROUND = "per-round"  # RAM_SAVE_FLAG_MULTIFD_FLUSH once per pass; QEMU >= 8.1


class ZeroPageMode(enum.Enum):
    """Where zero pages travel (QEMU's ``zero-page-detection``, spec section 5)."""

    LEGACY = "legacy"  # RAM_SAVE_FLAG_ZERO records on the main channel
    MULTIFD = "multifd"  # listed in the multifd packet's zero_pages array (9.0+)


@dataclass(frozen=True, slots=True)
class PeerProfile:
    """How a sender shapes its streams for one kind of destination."""

    name: str
    sync_mode: SyncMode
    zero_pages: ZeroPageMode
    switchover_start: bool  # send MIG_CMD_SWITCHOVER_START before completion (10.0+)
    description: str


PROFILES: dict[str, PeerProfile] = {
    profile.name: profile
    for profile in (
        PeerProfile(
            "native",
            SyncMode.PER_ROUND,
            ZeroPageMode.MULTIFD,
            switchover_start=False,
            description="QEMU 10.0 semantics without the device-side command; Python peers",
        ),
        PeerProfile(
            "qemu-7.2",
            SyncMode.PER_SECTION,
            ZeroPageMode.LEGACY,
            switchover_start=False,
            description="QEMU 7.2 and 8.0: SYNC before every EOS, zero pages on the main channel",
        ),
        PeerProfile(
            "qemu-10.0",
            SyncMode.PER_ROUND,
            ZeroPageMode.MULTIFD,
            switchover_start=True,
            description="QEMU 10.x defaults: per-round MULTIFD_FLUSH, multifd zero pages",
        ),
    )
}


def profile(name: str) -> PeerProfile:
    """The profile called ``name``; raises :class:`ConfigError` for an unknown name."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ConfigError(f"unknown peer profile {name!r} (known: {known})") from None
