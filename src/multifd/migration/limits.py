"""What a destination accepts from a source it does not trust.

A QEMU destination is started with its RAM and only checks that the source announces the
same blocks. Ours creates the blocks the source announces, so without bounds one
``MEM_SIZE`` record could make it fault in any amount of memory or fill a disk. Every
bound here is checked before anything is allocated, and exceeding one fails the migration
with a :class:`~multifd.errors.ProtocolError` that says what was expected and received.

Bounds enforced elsewhere, because they are fixed by the protocol rather than a choice:
a compressed multifd payload is at most ``MAX_COMPRESSED_PAYLOAD`` (1 MiB, QEMU's receive
buffer; ``next_packet_size`` is checked before a byte is read, and ignored for
uncompressed packets); a multifd packet names a block known to the destination and pages
inside it; a zstd stream's window is at most 32 MiB, what QEMU's highest level uses (each
channel's decoder keeps that much); the main stream decoder bounds the VM description
(16 MiB) and FULL sections (1 MiB).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from multifd.errors import ConfigError, ProtocolError
from multifd.wire.constants import PAGE_SIZE

TIB: Final = 1 << 40
# Block names and section idstrs carry a one-byte length on the wire.
MAX_WIRE_NAME: Final = 255


def physical_memory() -> int:
    """This machine's RAM in bytes (1 TiB if the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return TIB


@dataclass(frozen=True)
class ReceiveLimits:
    """Bounds a destination enforces on what the source announces and on its connections.

    Attributes:
        max_ram: most bytes of RAM (all blocks together) the source may announce. The
            default is this machine's physical memory: more cannot be received into
            anonymous memory anyway, and a hostile ``MEM_SIZE`` would otherwise make the
            destination fault in memory until the kernel kills it. Raise it to receive
            into files (``output=``) larger than RAM.
        max_block_size: largest single block, in bytes (default 1 TiB).
        max_blocks: most RAM blocks. A QEMU ``pc`` machine has about a dozen (``pc.ram``,
            ROMs, ``vga.vram``, ACPI tables) plus one per memory device, and x86 offers at
            most 256 DIMM slots: 512 leaves room.
        max_name_len: longest block name, in bytes (at most 255: the wire carries a
            one-byte length); also bounds the machine type, whose length is 32-bit. Section
            idstrs need no bound: the decoder knows the few sections it accepts.
        max_pending: connections that may wait to be identified (TLS handshake, channel
            magic) beyond the 1 + N the source opens; when more wait, the oldest is
            refused. Strangers opening connections cannot exhaust the destination's file
            descriptors, nor crowd out the source (which may stay silent on its first
            channels until it has opened them all).
        handshake_timeout: seconds a connection has, from accept, to finish its TLS
            handshake; then it is refused. A source runs the handshake as soon as it is
            connected, so only a stalled or hostile peer takes longer.
    """

    max_ram: int = field(default_factory=physical_memory)
    max_block_size: int = TIB
    max_blocks: int = 512
    max_name_len: int = MAX_WIRE_NAME
    max_pending: int = 16
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_ram", "max_block_size", "max_blocks", "max_pending"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= self.max_name_len <= MAX_WIRE_NAME:
            raise ConfigError(f"max_name_len must be 1..{MAX_WIRE_NAME}, got {self.max_name_len}")
        if not self.handshake_timeout > 0:
            raise ConfigError(f"handshake_timeout must be > 0, got {self.handshake_timeout}")

    def check_blocks(self, total: int, blocks: Sequence[tuple[str, int]], *, channel: str) -> None:
        """Check a ``MEM_SIZE`` announcement (``total`` and each block's name and size).

        Raises:
            ProtocolError: a bound is exceeded or a size is not a positive multiple of the
                page size; nothing has been allocated yet.
        """
        if len(blocks) > self.max_blocks:
            raise ProtocolError(
                "ram block count", channel=channel, expected=f"<= {self.max_blocks}",
                received=len(blocks),
            )  # fmt: skip
        if total > self.max_ram:
            raise ProtocolError(
                "total ram size", channel=channel, expected=f"<= {self.max_ram} (max_ram)",
                received=total,
            )  # fmt: skip
        for name, size in blocks:
            self.check_name("ram block name", name, channel=channel)
            if size <= 0 or size % PAGE_SIZE:
                raise ProtocolError(
                    f"size of block {name!r}", channel=channel,
                    expected=f"a positive multiple of {PAGE_SIZE}", received=size,
                )  # fmt: skip
            if size > self.max_block_size:
                raise ProtocolError(
                    f"size of block {name!r}", channel=channel,
                    expected=f"<= {self.max_block_size} (max_block_size)", received=size,
                )  # fmt: skip

    def check_name(self, what: str, name: str, *, channel: str) -> None:
        """Check the length in bytes of a block name.

        Raises:
            ProtocolError: longer than :attr:`max_name_len`.
        """
        length = len(name.encode())
        if length > self.max_name_len:
            raise ProtocolError(
                f"{what} length", channel=channel, expected=f"<= {self.max_name_len} bytes",
                received=f"{length} bytes ({name[:32]!r}...)",
            )  # fmt: skip
