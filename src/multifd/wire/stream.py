"""QEMU's main migration stream (spec section 7): the encoder, and the public face of the codec.

The stream is a file header, a configuration record, then top-level records: sections
(START / PART / END / FULL, each closed by a footer), commands, and finally EOF and an
optional VM description. The ``ram`` section's body is a list of ram records (an address
word whose low bits are ``RAM_SAVE_FLAG_*``, then per-flag data), ended by EOS.

The encoder is a set of functions returning bytes; callers concatenate them (and send page
data from RAM themselves after :func:`ram_page_header`). The decoder is
:class:`~multifd.wire.stream_decoder.StreamDecoder`; the events it yields are the
dataclasses of :mod:`multifd.wire.records`. Both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

from multifd.wire.constants import (
    MIG_CMD_SWITCHOVER_START,
    PAGE_SIZE,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
)
from multifd.wire.records import (
    ADDRESS_WORD,
    COMMAND_HEADER,
    DEFAULT_SECTIONS,
    GLOBALSTATE_IDSTR,
    INSTANCE_VERSION,
    RAM_IDSTR,
    SECTION_ID,
    STREAM_HEADER,
    TIMER_IDSTR,
    TYPE_LEN32,
    Command,
    Configuration,
    Eof,
    Event,
    FileHeader,
    GlobalState,
    RamEos,
    RamMemSize,
    RamMultifdFlush,
    RamPage,
    RamZero,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionParser,
    SectionPart,
    SectionStart,
    TimerState,
    VmDescription,
)
from multifd.wire.return_path import MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING
from multifd.wire.stream_decoder import StreamDecoder

__all__ = [
    "DEFAULT_SECTIONS",
    "RAM_IDSTR",
    "Command",
    "Configuration",
    "Eof",
    "Event",
    "FileHeader",
    "GlobalState",
    "RamEos",
    "RamMemSize",
    "RamMultifdFlush",
    "RamPage",
    "RamZero",
    "SectionEnd",
    "SectionFooter",
    "SectionFull",
    "SectionParser",
    "SectionPart",
    "SectionStart",
    "StreamDecoder",
    "TimerState",
    "VmDescription",
    "command",
    "configuration",
    "ends_with_eof",
    "eof",
    "file_header",
    "globalstate_section",
    "open_return_path",
    "ping",
    "ram_eos",
    "ram_mem_size",
    "ram_multifd_flush",
    "ram_page_header",
    "ram_zero",
    "section_end",
    "section_footer",
    "section_full",
    "section_part",
    "section_start",
    "switchover_start",
    "timer_section",
    "vmdescription",
]


def _idstr(name: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= 0xFF:
        raise ValueError(f"an idstr must be 1..255 bytes, got {name!r}")
    return bytes((len(raw),)) + raw


def file_header() -> bytes:
    """``QEVM`` magic and stream version 3."""
    return STREAM_HEADER.pack(QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)


def configuration(machine: str) -> bytes:
    """The configuration record naming the machine type, without subsections."""
    raw = machine.encode()
    return TYPE_LEN32.pack(QEMU_VM_CONFIGURATION, len(raw)) + raw


def _section_header(
    kind: int, section_id: int, idstr: str, instance_id: int, version_id: int
) -> bytes:
    return (
        SECTION_ID.pack(kind, section_id)
        + _idstr(idstr)
        + INSTANCE_VERSION.pack(instance_id, version_id)
    )


def section_start(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """A SECTION_START header; the body and a footer must follow."""
    return _section_header(QEMU_VM_SECTION_START, section_id, idstr, instance_id, version_id)


def section_full(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """A SECTION_FULL header; the body and a footer must follow."""
    return _section_header(QEMU_VM_SECTION_FULL, section_id, idstr, instance_id, version_id)


def section_part(section_id: int) -> bytes:
    """A SECTION_PART header; ram records up to EOS and a footer must follow."""
    return SECTION_ID.pack(QEMU_VM_SECTION_PART, section_id)


def section_end(section_id: int) -> bytes:
    """A SECTION_END header; ram records up to EOS and a footer must follow."""
    return SECTION_ID.pack(QEMU_VM_SECTION_END, section_id)


def section_footer(section_id: int) -> bytes:
    """The footer closing section ``section_id``."""
    return SECTION_ID.pack(QEMU_VM_SECTION_FOOTER, section_id)


def ram_mem_size(blocks: Sequence[tuple[str, int]]) -> bytes:
    """The MEM_SIZE setup record: be64 total | MEM_SIZE, then each block's idstr and length."""
    parts = []
    for name, length in blocks:
        if length <= 0 or length % PAGE_SIZE:
            raise ValueError(f"block {name!r}: length {length} is not a positive page multiple")
        parts.append(_idstr(name) + ADDRESS_WORD.pack(length))
    total = sum(length for _name, length in blocks)
    return ADDRESS_WORD.pack(total | RAM_SAVE_FLAG_MEM_SIZE) + b"".join(parts)


def _ram_word(offset: int, flag: int, block: str | None) -> bytes:
    if offset < 0 or offset % PAGE_SIZE:
        raise ValueError(f"page offset {offset:#x} is not a non-negative page multiple")
    if block is None:
        return ADDRESS_WORD.pack(offset | flag | RAM_SAVE_FLAG_CONTINUE)
    return ADDRESS_WORD.pack(offset | flag) + _idstr(block)


def ram_page_header(offset: int, block: str | None) -> bytes:
    """A PAGE record without its 4096 data bytes (the caller sends them from RAM).

    Args:
        offset: byte offset of the page in its block.
        block: the block's idstr, or ``None`` for the same block as the previous page
            record on this stream (``RAM_SAVE_FLAG_CONTINUE``).
    """
    return _ram_word(offset, RAM_SAVE_FLAG_PAGE, block)


def ram_zero(offset: int, block: str | None) -> bytes:
    """A ZERO record (fill byte 0); ``block`` as for :func:`ram_page_header`."""
    return _ram_word(offset, RAM_SAVE_FLAG_ZERO, block) + b"\0"


def ram_eos() -> bytes:
    """``RAM_SAVE_FLAG_EOS``: ends a ram section body."""
    return ADDRESS_WORD.pack(RAM_SAVE_FLAG_EOS)


def ram_multifd_flush() -> bytes:
    """``RAM_SAVE_FLAG_MULTIFD_FLUSH``: the per-round sync marker."""
    return ADDRESS_WORD.pack(RAM_SAVE_FLAG_MULTIFD_FLUSH)


def timer_section(section_id: int, instance_id: int = 0) -> bytes:
    """A whole ``timer`` FULL section of a never-started VM (zero offsets), with footer."""
    return (
        section_full(section_id, TIMER_IDSTR, instance_id, DEFAULT_SECTIONS[TIMER_IDSTR].version_id)
        + TimerState().pack()
        + section_footer(section_id)
    )


def globalstate_section(section_id: int, runstate: str = "running") -> bytes:
    """A whole ``globalstate`` FULL section (instance 0) with footer."""
    version = DEFAULT_SECTIONS[GLOBALSTATE_IDSTR].version_id
    return (
        section_full(section_id, GLOBALSTATE_IDSTR, 0, version)
        + GlobalState(runstate).pack()
        + section_footer(section_id)
    )


def command(cmd: int, data: bytes = b"") -> bytes:
    """A QEMU_VM_COMMAND record."""
    if not 0 <= cmd <= 0xFFFF or len(data) > 0xFFFF:
        raise ValueError(f"command {cmd:#x} with {len(data)} bytes does not fit be16 fields")
    return COMMAND_HEADER.pack(QEMU_VM_COMMAND, cmd, len(data)) + data


def switchover_start() -> bytes:
    """``MIG_CMD_SWITCHOVER_START`` (QEMU 10.0+; a 7.2 destination rejects it)."""
    return command(MIG_CMD_SWITCHOVER_START)


def open_return_path() -> bytes:
    """``MIG_CMD_OPEN_RETURN_PATH``: the destination may answer on the main socket from now
    on (see :mod:`multifd.wire.return_path`); sent right after the configuration."""
    return command(MIG_CMD_OPEN_RETURN_PATH)


def ping(value: int) -> bytes:
    """``MIG_CMD_PING`` with a be32 ``value``, answered by a PONG on the return path."""
    return command(MIG_CMD_PING, value.to_bytes(4, "big"))


def eof() -> bytes:
    """``QEMU_VM_EOF``."""
    return bytes((QEMU_VM_EOF,))


def vmdescription(json: bytes) -> bytes:
    """The VM description record that follows EOF: 0x06, be32 length, JSON."""
    return TYPE_LEN32.pack(QEMU_VM_VMDESCRIPTION, len(json)) + json


def ends_with_eof(data: bytes | bytearray, *, description: bool = False) -> bool:
    """Whether ``data``, the end of a stream, is ``QEMU_VM_EOF`` plus a VM description (a
    JSON object) that reaches exactly to its last byte, or with ``description=False``
    ``QEMU_VM_EOF`` alone.

    A passed-through tail cannot be decoded without each device's vmstate layout; this is
    the check left for it: a stream cut short almost never ends like that. ``data`` must
    hold the whole description for the check to see it. A tail still arriving may end
    with an EOF byte by chance, never with a whole description: pass ``description=True``
    to tell that the stream is over while it may still be open.
    """
    if not description and data[-1:] == eof():
        return True
    if data[-1:] != b"}":
        return False
    marker = eof() + bytes((QEMU_VM_VMDESCRIPTION,))
    at = len(data)
    # JSON holds no NUL byte, but the length field may: try each candidate from the end.
    while (at := data.rfind(marker, 0, at)) >= 0:
        header = at + 1
        if len(data) - header >= TYPE_LEN32.size:
            _kind, length = TYPE_LEN32.unpack_from(data, header)
            start = header + TYPE_LEN32.size
            if start + length == len(data) and data[start : start + 1] == b"{":
                return True
    return False
