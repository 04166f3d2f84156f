"""Incremental, sans-IO decoder of QEMU's main migration stream (spec section 7).

Theory of operation. The caller ``feed()``s whatever bytes arrived and pulls events with
``next_event()``, which returns ``None`` when it needs more bytes; it never blocks and never
touches a socket. The decoder is a state machine whose table maps each state (what the
stream must hold next) to a reader method. A reader decodes one record only once all of
its bytes are buffered, validating its fields in stream order, and changes no state before
it commits the record; so the event sequence, and the first error, do not depend on how
the input was chunked.

Section bodies depend on the idstr: ``ram`` (START/PART/END) holds ram records up to EOS;
FULL sections are decoded by the :class:`~multifd.wire.records.SectionParser` registered
for their idstr. Every malformed input raises :class:`~multifd.errors.ProtocolError`;
after one, the decoder raises it again on every call. Memory stays bounded by the limits
given to the constructor, whatever lengths the peer announces.

Two opt-in features serve a peer that forwards a stream rather than loading it (a relay,
a recorder). ``keep_raw`` names record types whose exact bytes :attr:`StreamDecoder.raw`
holds after the event is returned, so they can be passed on unchanged. ``tail_after_ram``
stops decoding once the ``ram`` section's END is closed by its footer: the device state
that follows (EOF and the VM description included) has lengths only its device's vmstate
description knows, so it is handed over undecoded by :meth:`StreamDecoder.take_tail`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from multifd.errors import MAIN, ProtocolError
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
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_FLAGS_MASK,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
    RAM_SECTION_VERSION,
)
from multifd.wire.records import (
    ADDRESS_WORD,
    COMMAND_HEADER,
    DEFAULT_SECTIONS,
    INSTANCE_VERSION,
    RAM_IDSTR,
    RAM_RECORDS,
    SECTION_ID,
    STREAM_HEADER,
    TYPE_LEN32,
    UNSUPPORTED_RAM_FLAGS,
    Command,
    Configuration,
    Eof,
    Event,
    FileHeader,
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
    VmDescription,
    ram_flag_names,
)
from multifd.wire.return_path import MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING

# Argument lengths of the MIG_CMD_* we know; any other command is passed through as is.
_COMMAND_LENGTHS: Final = {
    MIG_CMD_SWITCHOVER_START: 0,
    MIG_CMD_OPEN_RETURN_PATH: 0,
    MIG_CMD_PING: 4,  # be32 value
}

# Compact the input buffer once this many consumed bytes sit at its front.
_COMPACT_AT: Final = 1 << 16


class _State(enum.Enum):
    HEADER = "the file header"
    CONFIGURATION = "the configuration record"
    TOP = "a section, a command or EOF"
    RAM = "a ram record"
    FULL_BODY = "a section body"
    FOOTER = "a section footer"
    AFTER_EOF = "a VM description or the end of the stream"
    DONE = "the end of the stream"
    TAIL = "the rest of the stream, undecoded"


@dataclass(slots=True)
class _Section:
    """The section whose body is being read."""

    section_id: int
    idstr: str
    parser: SectionParser | None = None  # FULL sections; None for ram bodies


class StreamDecoder:
    """Incremental decoder of one main migration stream (never blocks, never reads a socket).

    Args:
        channel: channel name put in every error.
        max_blocks: most RAM blocks accepted in MEM_SIZE.
        max_name_len: longest machine type name accepted in the configuration.
        max_vmdesc: largest VM description accepted, in bytes.
        max_section_size: largest FULL section body a parser may need, in bytes.
        sections: FULL section parsers by idstr.
        keep_raw: event types (e.g. ``Configuration``, ``Command``) whose record bytes
            :attr:`raw` keeps.
        tail_after_ram: after the footer of the ``ram`` END, decode nothing more: the
            rest is read with :meth:`take_tail`.
        tail_from_unknown: once the ``ram`` END is closed, a FULL section with no parser
            starts the tail: it and the rest (a real machine's device state) are read with
            :meth:`take_tail`, where they would be an error.

    Not thread-safe: one thread feeds and drains a decoder.
    """

    def __init__(
        self,
        channel: str = MAIN,
        *,
        max_blocks: int = 1024,
        max_name_len: int = 255,
        max_vmdesc: int = 16 << 20,
        max_section_size: int = 1 << 20,
        sections: Mapping[str, SectionParser] = DEFAULT_SECTIONS,
        keep_raw: Collection[type[Event]] = (),
        tail_after_ram: bool = False,
        tail_from_unknown: bool = False,
    ) -> None:
        self.channel: Final = channel
        self._max_blocks = max_blocks
        self._max_name_len = max_name_len
        self._max_vmdesc = max_vmdesc
        self._max_section_size = max_section_size
        self._sections = dict(sections)
        self._keep_raw = frozenset(keep_raw)
        self._tail_after_ram = tail_after_ram
        self._tail_from_unknown = tail_from_unknown
        self._raw: bytes | None = None
        self._buf = bytearray()
        self._pos = 0  # first unconsumed byte of _buf
        self._base = 0  # stream offset of _buf[0], for error messages
        self._state = _State.HEADER
        self._readers: dict[_State, Callable[[], Event | None]] = {
            _State.HEADER: self._read_header,
            _State.CONFIGURATION: self._read_configuration,
            _State.TOP: self._read_top,
            _State.RAM: self._read_ram,
            _State.FULL_BODY: self._read_full_body,
            _State.FOOTER: self._read_footer,
            _State.AFTER_EOF: self._read_after_eof,
            _State.DONE: self._read_done,
            _State.TAIL: self._read_tail,
        }
        self._section: _Section | None = None
        self._started: dict[int, bool] = {}  # ram section ids seen in START -> END seen
        self._blocks: dict[str, int] | None = None  # MEM_SIZE: block -> used_length
        self._last_block: str | None = None  # target of RAM_SAVE_FLAG_CONTINUE
        self._after_configuration = False
        self._closed = False
        self._error: ProtocolError | None = None

    # -- public API -------------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[tuple[str, int], ...] | None:
        """The RAM blocks announced by MEM_SIZE, or ``None`` before it."""
        return None if self._blocks is None else tuple(self._blocks.items())

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet decoded."""
        return self._base + self._pos

    @property
    def raw(self) -> bytes | None:
        """The record bytes of the last event returned, if its type is in ``keep_raw``."""
        return self._raw

    @property
    def in_tail(self) -> bool:
        """Whether the tail has started (``tail_after_ram``, ``tail_from_unknown``)."""
        return self._state is _State.TAIL

    def take_tail(self) -> bytes:
        """The bytes of the tail fed and not taken yet.

        Empty before the tail starts. The bytes are not decoded: whatever they hold is
        for the final destination to judge.

        Raises:
            ProtocolError: the stream failed earlier (the same error again).
        """
        if self._error is not None:
            raise self._error
        if self._state is not _State.TAIL:
            return b""
        end = len(self._buf)
        data = self._take(self._pos, end)
        self._pos = end
        return data

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the peer (copied; the caller may reuse ``data``)."""
        if self._closed:
            raise self._error_at("data after the end of input", "nothing", f"{len(data)} bytes")
        if self._pos >= _COMPACT_AT and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | None:
        """The next decoded record, or ``None`` until more bytes are fed.

        Raises:
            ProtocolError: the stream is malformed (raised again on every later call).
        """
        if self._error is not None:
            raise self._error
        try:
            return self._readers[self._state]()
        except ProtocolError as exc:
            self._error = exc
            raise

    def events(self) -> Iterator[Event]:
        """Yield decoded records until more bytes are needed."""
        while (event := self.next_event()) is not None:
            yield event

    def close(self) -> None:
        """Declare the end of input, after draining :meth:`next_event`.

        Ending right after EOF is allowed (QEMU may omit the VM description), as is ending
        after the VM description.

        Raises:
            ProtocolError: the stream ended before EOF or inside a record.
        """
        if self._error is not None:
            raise self._error
        self._closed = True
        pending = len(self._buf) - self._pos
        if self._state in (_State.AFTER_EOF, _State.DONE, _State.TAIL) and not pending:
            return
        self._error = self._error_at(
            "stream ended early", self._state.value, f"end of input with {pending} undecoded bytes"
        )
        raise self._error

    # -- buffer helpers ---------------------------------------------------------------------
    def _error_at(self, what: str, expected: object, received: object) -> ProtocolError:
        return ProtocolError(
            f"{what} (stream offset {self.offset})",
            channel=self.channel,
            expected=expected,
            received=received,
        )

    def _available(self, at: int) -> int:
        return len(self._buf) - at

    def _take(self, start: int, end: int) -> bytes:
        with memoryview(self._buf) as view, view[start:end] as part:
            return part.tobytes()

    def _name(self, at: int, length: int, what: str) -> str:
        raw = self._take(at, at + length)
        if not raw:
            raise self._error_at(what, "a non-empty name", "an empty name")
        if b"\0" in raw:  # QEMU's names are C strings: a NUL would end them early
            raise self._error_at(what, "a name without NUL bytes", raw[:64])
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise self._error_at(what, "a UTF-8 name", raw[:64]) from None

    def _short_name(self, at: int, what: str) -> tuple[str, int] | None:
        """A u8-length-prefixed name at ``at``: (name, offset after it), or None if short."""
        if self._available(at) < 1:
            return None
        length = self._buf[at]
        if self._available(at + 1) < length:
            return None
        return self._name(at + 1, length, what), at + 1 + length

    def _commit(self, end: int, state: _State, event: Event) -> Event:
        if self._keep_raw:
            self._raw = self._take(self._pos, end) if type(event) in self._keep_raw else None
        self._pos = end
        self._state = state
        return event

    # -- stream framing ---------------------------------------------------------------------
    def _read_header(self) -> Event | None:
        if self._available(self._pos) < STREAM_HEADER.size:
            return None
        magic, version = STREAM_HEADER.unpack_from(self._buf, self._pos)
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._error_at(
                "stream magic", f"{QEMU_VM_FILE_MAGIC:#010x} (QEVM)", f"{magic:#010x}"
            )
        if version != QEMU_VM_FILE_VERSION:
            raise self._error_at("stream version", QEMU_VM_FILE_VERSION, version)
        return self._commit(
            self._pos + STREAM_HEADER.size, _State.CONFIGURATION, FileHeader(version)
        )

    def _read_configuration(self) -> Event | None:
        if self._available(self._pos) < 1:
            return None
        if self._buf[self._pos] != QEMU_VM_CONFIGURATION:
            raise self._error_at(
                "configuration section missing",
                f"{QEMU_VM_CONFIGURATION:#04x}",
                f"{self._buf[self._pos]:#04x}",
            )
        if self._available(self._pos) < TYPE_LEN32.size:
            return None
        _kind, length = TYPE_LEN32.unpack_from(self._buf, self._pos)
        if length > self._max_name_len:
            raise self._error_at("machine type name length", f"<= {self._max_name_len}", length)
        start = self._pos + TYPE_LEN32.size
        if self._available(start) < length:
            return None
        machine = self._name(start, length, "machine type name")
        self._after_configuration = True
        return self._commit(start + length, _State.TOP, Configuration(machine))

    def _read_top(self) -> Event | None:
        if self._available(self._pos) < 1:
            return None
        kind = self._buf[self._pos]
        if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            return self._read_section_header(kind)
        if kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            return self._read_section_continue(kind)
        if kind == QEMU_VM_COMMAND:
            return self._read_command()
        if kind == QEMU_VM_EOF:
            return self._commit(self._pos + 1, _State.AFTER_EOF, Eof())
        if kind == QEMU_VM_SUBSECTION and self._after_configuration:
            # QEMU 7.2 -M none sends none; newer ones may (target-page-bits, uuid, ...).
            raise self._error_at("configuration subsections are not supported", "a section", "0x05")
        raise self._error_at("record type", "a section, a command or EOF", f"{kind:#04x}")

    def _read_command(self) -> Event | None:
        if self._available(self._pos) < COMMAND_HEADER.size:
            return None
        _kind, cmd, length = COMMAND_HEADER.unpack_from(self._buf, self._pos)
        known = _COMMAND_LENGTHS.get(cmd)
        if known is not None and length != known:
            raise self._error_at(f"length of command {cmd:#06x}", known, length)
        start = self._pos + COMMAND_HEADER.size
        if self._available(start) < length:
            return None
        event = Command(cmd, self._take(start, start + length))
        self._after_configuration = False
        return self._commit(start + length, _State.TOP, event)

    def _read_after_eof(self) -> Event | None:
        if self._available(self._pos) < 1:
            return None
        kind = self._buf[self._pos]
        if kind != QEMU_VM_VMDESCRIPTION:
            raise self._error_at(
                "record after EOF", f"{QEMU_VM_VMDESCRIPTION:#04x}", f"{kind:#04x}"
            )
        if self._available(self._pos) < TYPE_LEN32.size:
            return None
        _kind, length = TYPE_LEN32.unpack_from(self._buf, self._pos)
        if length > self._max_vmdesc:
            raise self._error_at("VM description length", f"<= {self._max_vmdesc}", length)
        start = self._pos + TYPE_LEN32.size
        if self._available(start) < length:
            return None
        event = VmDescription(self._take(start, start + length))
        return self._commit(start + length, _State.DONE, event)

    def _read_tail(self) -> Event | None:
        return None  # take_tail() hands the bytes over as they are

    def _read_done(self) -> Event | None:
        if self._available(self._pos) < 1:
            return None
        raise self._error_at(
            "data after the VM description",
            "the end of the stream",
            f"byte {self._buf[self._pos]:#04x}",
        )

    # -- sections ---------------------------------------------------------------------------
    def _read_section_header(self, kind: int) -> Event | None:
        if self._available(self._pos) < SECTION_ID.size:
            return None
        _kind, section_id = SECTION_ID.unpack_from(self._buf, self._pos)
        named = self._short_name(self._pos + SECTION_ID.size, "section idstr")
        if named is None:
            return None
        idstr, at = named
        if self._available(at) < INSTANCE_VERSION.size:
            return None
        instance_id, version_id = INSTANCE_VERSION.unpack_from(self._buf, at)
        end = at + INSTANCE_VERSION.size
        if kind == QEMU_VM_SECTION_START:
            return self._start_ram(end, section_id, idstr, instance_id, version_id)
        parser = self._sections.get(idstr)
        if parser is None and self._tail_from_unknown and any(self._started.values()):
            self._state = _State.TAIL  # from this section's first byte, still unconsumed
            return None
        if parser is None:
            known = ", ".join(sorted(self._sections)) or "none"
            raise self._error_at("unknown FULL section", f"one of: {known}", repr(idstr))
        if version_id != parser.version_id:
            raise self._error_at(f"version of section {idstr!r}", parser.version_id, version_id)
        self._section = _Section(section_id, idstr, parser)
        self._after_configuration = False
        event = SectionFull(section_id, idstr, instance_id, version_id)
        return self._commit(end, _State.FULL_BODY, event)

    def _start_ram(
        self, end: int, section_id: int, idstr: str, instance_id: int, version_id: int
    ) -> Event:
        if idstr != RAM_IDSTR:
            raise self._error_at("unknown iterative section", repr(RAM_IDSTR), repr(idstr))
        if instance_id != 0:
            raise self._error_at("instance of section 'ram'", 0, instance_id)
        if version_id != RAM_SECTION_VERSION:
            raise self._error_at("version of section 'ram'", RAM_SECTION_VERSION, version_id)
        if self._started:
            raise self._error_at(
                "second START of section 'ram'", "one START", f"section id {section_id}"
            )
        self._started[section_id] = False
        self._section = _Section(section_id, idstr)
        self._after_configuration = False
        event = SectionStart(section_id, idstr, instance_id, version_id)
        return self._commit(end, _State.RAM, event)

    def _read_section_continue(self, kind: int) -> Event | None:
        if self._available(self._pos) < SECTION_ID.size:
            return None
        _kind, section_id = SECTION_ID.unpack_from(self._buf, self._pos)
        name = "PART" if kind == QEMU_VM_SECTION_PART else "END"
        ended = self._started.get(section_id)
        if ended is None:
            started = ", ".join(map(str, self._started)) or "none started"
            raise self._error_at(f"SECTION_{name} for a section never started", started, section_id)
        if ended:
            raise self._error_at(
                f"SECTION_{name} after SECTION_END", "a started section", section_id
            )
        self._started[section_id] = kind == QEMU_VM_SECTION_END
        self._section = _Section(section_id, RAM_IDSTR)
        self._after_configuration = False
        event = SectionPart(section_id) if kind == QEMU_VM_SECTION_PART else SectionEnd(section_id)
        return self._commit(self._pos + SECTION_ID.size, _State.RAM, event)

    def _read_full_body(self) -> Event | None:
        assert self._section is not None
        assert self._section.parser is not None
        available = min(self._available(self._pos), self._max_section_size)
        with memoryview(self._buf) as view, view[self._pos : self._pos + available] as body:
            result = self._section.parser.parse(body, channel=self.channel)
        if result is None:
            if available >= self._max_section_size:
                raise self._error_at(
                    f"body of section {self._section.idstr!r}",
                    f"<= {self._max_section_size} bytes",
                    "more",
                )
            return None
        event, used = result
        assert 0 <= used <= available, "a section parser used bytes it was not given"
        return self._commit(self._pos + used, _State.FOOTER, event)

    def _read_footer(self) -> Event | None:
        assert self._section is not None
        section = self._section
        if self._available(self._pos) < 1:
            return None
        kind = self._buf[self._pos]
        if kind != QEMU_VM_SECTION_FOOTER:
            raise self._error_at(
                f"missing section footer for {section.idstr!r}",
                f"{QEMU_VM_SECTION_FOOTER:#04x}",
                f"{kind:#04x}",
            )
        if self._available(self._pos) < SECTION_ID.size:
            return None
        _kind, section_id = SECTION_ID.unpack_from(self._buf, self._pos)
        if section_id != section.section_id:
            raise self._error_at(
                f"footer of section {section.idstr!r}", section.section_id, section_id
            )
        self._section = None
        ram_ended = section.parser is None and self._started.get(section_id, False)
        state = _State.TAIL if ram_ended and self._tail_after_ram else _State.TOP
        return self._commit(self._pos + SECTION_ID.size, state, SectionFooter(section_id))

    # -- ram records ------------------------------------------------------------------------
    def _read_ram(self) -> Event | None:
        if self._available(self._pos) < ADDRESS_WORD.size:
            return None
        (word,) = ADDRESS_WORD.unpack_from(self._buf, self._pos)
        flags = word & RAM_FLAGS_MASK
        address = word - flags
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind in (RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO):
            return self._read_page(address, flags)
        if flags == RAM_SAVE_FLAG_MEM_SIZE:
            return self._read_mem_size(address)
        if flags in (RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MULTIFD_FLUSH):
            if address:
                raise self._error_at(f"address of {ram_flag_names(flags)}", 0, f"{address:#x}")
            end = self._pos + ADDRESS_WORD.size
            if flags == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                return self._commit(end, _State.RAM, RamMultifdFlush())
            return self._commit(end, _State.FOOTER, RamEos())
        for bit, feature in UNSUPPORTED_RAM_FLAGS.items():
            if flags & bit:
                raise self._error_at("unsupported ram record", RAM_RECORDS, feature)
        raise self._error_at("unknown combination of ram flags", RAM_RECORDS, ram_flag_names(flags))

    def _read_page(self, offset: int, flags: int) -> Event | None:
        at = self._pos + ADDRESS_WORD.size
        if flags & RAM_SAVE_FLAG_CONTINUE:
            if self._last_block is None:
                raise self._error_at(
                    "RAM_SAVE_FLAG_CONTINUE without a previous block",
                    "a block name",
                    ram_flag_names(flags),
                )
            block = self._last_block
        else:
            named = self._short_name(at, "ram block name")
            if named is None:
                return None
            block, at = named
        self._check_page(block, offset)
        is_page = flags & RAM_SAVE_FLAG_PAGE
        size = PAGE_SIZE if is_page else 1
        if self._available(at) < size:
            return None
        event: Event
        if is_page:
            event = RamPage(block, offset, self._take(at, at + size))
        else:
            event = RamZero(block, offset, self._buf[at])
        self._last_block = block
        return self._commit(at + size, _State.RAM, event)

    def _check_page(self, block: str, offset: int) -> None:
        if self._blocks is None:
            raise self._error_at(
                "page record before MEM_SIZE", "MEM_SIZE first", f"block {block!r}"
            )
        length = self._blocks.get(block)
        if length is None:
            raise self._error_at("unknown ram block", "a block announced by MEM_SIZE", repr(block))
        if offset + PAGE_SIZE > length:
            raise self._error_at(
                f"offset in block {block!r}", f"<= {length - PAGE_SIZE:#x}", f"{offset:#x}"
            )

    def _read_mem_size(self, total: int) -> Event | None:
        if self._blocks is not None:
            raise self._error_at("second MEM_SIZE record", "one MEM_SIZE", f"total {total:#x}")
        at = self._pos + ADDRESS_WORD.size
        blocks: dict[str, int] = {}
        remaining = total
        while remaining:
            if len(blocks) >= self._max_blocks:
                raise self._error_at("number of ram blocks", f"<= {self._max_blocks}", "more")
            what = f"MEM_SIZE block name ({remaining:#x} of {total:#x} bytes not yet announced)"
            named = self._short_name(at, what)
            if named is None or self._available(named[1]) < ADDRESS_WORD.size:
                return None
            name, at = named
            (length,) = ADDRESS_WORD.unpack_from(self._buf, at)
            at += ADDRESS_WORD.size
            self._check_block(name, length, remaining, blocks)
            blocks[name] = length
            remaining -= length
        self._blocks = blocks
        return self._commit(at, _State.RAM, RamMemSize(total, tuple(blocks.items())))

    def _check_block(
        self, name: str, length: int, remaining: int, blocks: Mapping[str, int]
    ) -> None:
        if name in blocks:
            raise self._error_at("ram block announced twice", "distinct names", repr(name))
        if length == 0 or length % PAGE_SIZE:
            raise self._error_at(
                f"length of ram block {name!r}", f"a positive multiple of {PAGE_SIZE}", length
            )
        if length > remaining:
            raise self._error_at(
                "ram block lengths exceed the MEM_SIZE total",
                f"<= {remaining:#x} left",
                f"{length:#x} for {name!r}",
            )
