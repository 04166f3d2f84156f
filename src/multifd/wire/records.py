"""Records of QEMU's main migration stream, as the decoder reports them.

One frozen dataclass per record (spec section 7). The decoder in :mod:`multifd.wire.stream_decoder`
yields them in stream order; ``SectionStart``/``SectionPart``/``SectionEnd``/``SectionFull``
open a section, the records inside follow, ``SectionFooter`` closes it.

Non-iterative sections (``QEMU_VM_SECTION_FULL``) carry a device's vmstate. Their body
format depends on the device, so the decoder looks the idstr up in a table of
:class:`SectionParser` objects; this module provides the two a ``-M none`` machine sends
(``timer`` and ``globalstate``). More devices are supported by passing a larger table to
the decoder, e.g. ``{**DEFAULT_SECTIONS, "mydev": MyDevParser()}``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Protocol

from multifd.errors import ProtocolError
from multifd.wire.constants import (
    GLOBALSTATE_RUNSTATE_SIZE,
    GLOBALSTATE_SECTION_VERSION,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_FULL,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    TIMER_SECTION_VERSION,
    TIMER_STATE_SIZE,
)

# Framing layouts shared by the encoder and the decoder (spec 7.1, 7.2, 7.4).
STREAM_HEADER: Final = struct.Struct(">II")  # QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION
TYPE_LEN32: Final = struct.Struct(">BI")  # record type, be32 length (configuration, vmdesc)
SECTION_ID: Final = struct.Struct(">BI")  # record type, be32 section_id
INSTANCE_VERSION: Final = struct.Struct(">II")  # instance_id, version_id
COMMAND_HEADER: Final = struct.Struct(">BHH")  # QEMU_VM_COMMAND, be16 cmd, be16 len
ADDRESS_WORD: Final = struct.Struct(">Q")  # ram record: offset | RAM_SAVE_FLAG_*

RAM_IDSTR: Final = "ram"
TIMER_IDSTR: Final = "timer"
GLOBALSTATE_IDSTR: Final = "globalstate"

# cpu_ticks_offset (int64), an unused 8-byte field, cpu_clock_offset (int64)
_TIMER: Final = struct.Struct(">q8sq")
assert _TIMER.size == TIMER_STATE_SIZE
# size (uint32, strlen + 1), runstate[100] (NUL padded)
_GLOBALSTATE: Final = struct.Struct(f">I{GLOBALSTATE_RUNSTATE_SIZE}s")

# --- stream and section framing ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileHeader:
    """``QEMU_VM_FILE_MAGIC`` and ``QEMU_VM_FILE_VERSION``: the first 8 bytes."""

    version: int


@dataclass(frozen=True, slots=True)
class Configuration:
    """``QEMU_VM_CONFIGURATION``: the source's machine type name."""

    machine: str


@dataclass(frozen=True, slots=True)
class SectionStart:
    """``QEMU_VM_SECTION_START``: first part of an iterative (live) section."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionPart:
    """``QEMU_VM_SECTION_PART``: one iteration of a started section."""

    section_id: int


@dataclass(frozen=True, slots=True)
class SectionEnd:
    """``QEMU_VM_SECTION_END``: the completion part of a started section."""

    section_id: int


@dataclass(frozen=True, slots=True)
class SectionFull:
    """``QEMU_VM_SECTION_FULL``: a whole non-iterative section (device state)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionFooter:
    """``QEMU_VM_SECTION_FOOTER``: closes the section ``section_id``."""

    section_id: int


@dataclass(frozen=True, slots=True)
class Command:
    """``QEMU_VM_COMMAND``: ``cmd`` (``MIG_CMD_*``) and its argument bytes."""

    cmd: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Eof:
    """``QEMU_VM_EOF``: the device state is complete."""


@dataclass(frozen=True, slots=True)
class VmDescription:
    """``QEMU_VM_VMDESCRIPTION``: the JSON description QEMU appends after EOF."""

    data: bytes


# --- records inside the ram section ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RamMemSize:
    """``RAM_SAVE_FLAG_MEM_SIZE``: total RAM and the (idstr, used_length) of each block."""

    total: int
    blocks: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class RamPage:
    """``RAM_SAVE_FLAG_PAGE``: one page of data for ``block`` at byte ``offset``."""

    block: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RamZero:
    """``RAM_SAVE_FLAG_ZERO``: fill the page at ``offset`` with ``fill``.

    QEMU always sends fill 0; 7.2 memsets the page with whatever byte arrives, 9.x+
    rejects anything else. The decoder reports the byte and lets the loader decide.
    """

    block: str
    offset: int
    fill: int


@dataclass(frozen=True, slots=True)
class RamEos:
    """``RAM_SAVE_FLAG_EOS``: end of a ram section part; the per-section sync marker."""


@dataclass(frozen=True, slots=True)
class RamMultifdFlush:
    """``RAM_SAVE_FLAG_MULTIFD_FLUSH``: the per-round sync marker (QEMU 8.1+)."""


# Ram flags we refuse, with the feature that would send them.
UNSUPPORTED_RAM_FLAGS: Final = {
    RAM_SAVE_FLAG_FULL: "FULL (obsolete since 2009)",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE (xbzrle capability)",
    RAM_SAVE_FLAG_HOOK: "HOOK (RDMA migration)",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE (compress capability)",
}
_RAM_FLAG_NAMES: Final = {
    RAM_SAVE_FLAG_FULL: "FULL",
    RAM_SAVE_FLAG_ZERO: "ZERO",
    RAM_SAVE_FLAG_MEM_SIZE: "MEM_SIZE",
    RAM_SAVE_FLAG_PAGE: "PAGE",
    RAM_SAVE_FLAG_EOS: "EOS",
    RAM_SAVE_FLAG_CONTINUE: "CONTINUE",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "HOOK",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}
# What a ram record may be, for error messages.
RAM_RECORDS: Final = "MEM_SIZE, ZERO, PAGE, EOS or MULTIFD_FLUSH"


def ram_flag_names(flags: int) -> str:
    """``flags`` as ``PAGE|CONTINUE``, unknown bits in hex, for error messages."""
    names = [name for bit, name in _RAM_FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~sum(_RAM_FLAG_NAMES)
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "no flag"


# --- device sections a -M none machine sends ---------------------------------------------


@dataclass(frozen=True, slots=True)
class TimerState:
    """Body of the ``timer`` FULL section (``vmstate_timers``, version 2)."""

    cpu_ticks_offset: int = 0
    cpu_clock_offset: int = 0

    def pack(self) -> bytes:
        """The 24-byte body; the unused field goes out as zeros, as QEMU sends it."""
        return _TIMER.pack(self.cpu_ticks_offset, bytes(8), self.cpu_clock_offset)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> TimerState:
        """Decode the first 24 bytes of ``data``; the unused field is ignored, as in QEMU."""
        ticks, _unused, clock = _TIMER.unpack_from(data)
        return cls(cpu_ticks_offset=ticks, cpu_clock_offset=clock)


@dataclass(frozen=True, slots=True)
class GlobalState:
    """Body of the ``globalstate`` FULL section: the source's run state name."""

    runstate: str

    def validate(self) -> None:
        """Raise ``ValueError`` unless the name is ASCII and fits the 100-byte buffer."""
        if not self.runstate.isascii() or not 0 < len(self.runstate) < GLOBALSTATE_RUNSTATE_SIZE:
            raise ValueError(f"run state must be 1..99 ASCII characters, got {self.runstate!r}")

    def pack(self) -> bytes:
        """The 104-byte body: be32 strlen + 1, then the NUL-padded name."""
        self.validate()
        raw = self.runstate.encode("ascii")
        return _GLOBALSTATE.pack(len(raw) + 1, raw)

    @classmethod
    def unpack(cls, data: bytes | memoryview, *, channel: str) -> GlobalState:
        """Decode the first 104 bytes of ``data``; the size field must match the name."""
        size, raw = _GLOBALSTATE.unpack_from(data)
        name = raw.split(b"\0", 1)[0]
        if size != len(name) + 1:
            raise ProtocolError(
                "globalstate size",
                channel=channel,
                expected=f"strlen(runstate) + 1 = {len(name) + 1}",
                received=size,
            )
        if not name or not name.isascii():
            raise ProtocolError(
                "globalstate runstate",
                channel=channel,
                expected="an ASCII run state name",
                received=name[:32],
            )
        return cls(runstate=name.decode("ascii"))


Event = (
    FileHeader
    | Configuration
    | SectionStart
    | SectionPart
    | SectionEnd
    | SectionFull
    | SectionFooter
    | RamMemSize
    | RamPage
    | RamZero
    | RamEos
    | RamMultifdFlush
    | TimerState
    | GlobalState
    | Command
    | Eof
    | VmDescription
)

# --- FULL section parsers ----------------------------------------------------------------


class SectionParser(Protocol):
    """Decodes the body of one kind of FULL section (one device's vmstate).

    Attributes:
        version_id: the only section version this parser understands.
    """

    version_id: int

    def parse(self, data: memoryview, *, channel: str) -> tuple[Event, int] | None:
        """Decode the body at the start of ``data``.

        Args:
            data: every buffered byte after the section header, up to the decoder's
                section size limit; it may hold less than the body or more. It is valid
                only during the call: do not keep it.
            channel: the channel name to put in errors.

        Returns:
            The event and the number of bytes of ``data`` it used, or ``None`` if
            ``data`` cannot hold the whole body yet.

        Raises:
            ProtocolError: the body is malformed.
        """
        ...


class TimerParser:
    """``timer`` (``vmstate_timers``): two int64 offsets around 8 unused bytes."""

    version_id = TIMER_SECTION_VERSION

    def parse(self, data: memoryview, *, channel: str) -> tuple[Event, int] | None:
        if len(data) < _TIMER.size:
            return None
        return TimerState.unpack(data), _TIMER.size


class GlobalStateParser:
    """``globalstate``: be32 size (strlen + 1), then a 100-byte NUL-padded run state."""

    version_id = GLOBALSTATE_SECTION_VERSION

    def parse(self, data: memoryview, *, channel: str) -> tuple[Event, int] | None:
        if len(data) < _GLOBALSTATE.size:
            return None
        return GlobalState.unpack(data, channel=channel), _GLOBALSTATE.size


# The FULL sections a -M none machine sends (spec 7.3); the decoder's default table.
DEFAULT_SECTIONS: Final[Mapping[str, SectionParser]] = MappingProxyType(
    {TIMER_IDSTR: TimerParser(), GLOBALSTATE_IDSTR: GlobalStateParser()}
)
