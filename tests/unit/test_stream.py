"""Main migration stream: encoder bytes (spec 7, TV8) and the decoder on good and bad input."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from multifd.errors import ProtocolError
from multifd.wire import stream as s
from multifd.wire.constants import (
    MIG_CMD_SWITCHOVER_START,
    PAGE_SIZE,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_FULL,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
)
from multifd.wire.records import Event, TimerParser

BLOCK = "mem"
BLOCK_SIZE = 16 * PAGE_SIZE
RAM_ID = 2


def page(fill: int) -> bytes:
    return bytes((fill,)) * PAGE_SIZE


def word(value: int) -> bytes:
    return value.to_bytes(8, "big")


def prologue(blocks: Sequence[tuple[str, int]] = ((BLOCK, BLOCK_SIZE),)) -> bytes:
    """Header, configuration and a ram START section announcing ``blocks``."""
    return (
        s.file_header()
        + s.configuration("none")
        + s.section_start(RAM_ID, "ram", 0, 4)
        + s.ram_mem_size(blocks)
        + s.ram_eos()
        + s.section_footer(RAM_ID)
    )


def part(records: bytes) -> bytes:
    """A ram PART section holding ``records``, EOS and footer."""
    return s.section_part(RAM_ID) + records + s.ram_eos() + s.section_footer(RAM_ID)


def epilogue() -> bytes:
    return s.timer_section(0) + s.globalstate_section(4) + s.eof() + s.vmdescription(b"{}")


def decode(
    data: bytes, *, chunk: int | None = None, max_blocks: int = 1024, max_name_len: int = 255
) -> list[Event]:
    """Every event of a complete stream, fed whole or in ``chunk``-byte pieces."""
    decoder = s.StreamDecoder(max_blocks=max_blocks, max_name_len=max_name_len)
    events: list[Event] = []
    step = chunk or max(len(data), 1)
    for at in range(0, len(data), step):
        decoder.feed(data[at : at + step])
        events.extend(decoder.events())
    decoder.close()
    return events


def decode_error(data: bytes, *, max_blocks: int = 1024, max_name_len: int = 255) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, max_blocks=max_blocks, max_name_len=max_name_len)
    assert info.value.channel == "main"
    return info.value


# --- encoder -----------------------------------------------------------------------------


def test_tv8_stream_prefix() -> None:
    expected = bytes.fromhex(
        "5145564d 00000003"
        "07 00000004 6e6f6e65"
        "01 00000002 03 72616d 00000000 00000004"
        "0000000000400004"
        "03 72616d 0000000000400000"
        "0000000000000010"
        "7e 00000002"
        "02 00000002"
        "0000000000000002 03 72616d 00"
        "0000000000001022 00"
    )
    encoded = (
        s.file_header()
        + s.configuration("none")
        + s.section_start(2, "ram", 0, 4)
        + s.ram_mem_size([("ram", 4 << 20)])
        + s.ram_eos()
        + s.section_footer(2)
        + s.section_part(2)
        + s.ram_zero(0, "ram")
        + s.ram_zero(0x1000, None)
    )
    assert encoded == expected


def test_tv8_single_records() -> None:
    assert s.ram_multifd_flush() == bytes.fromhex("00 00 00 00 00 00 02 00")
    assert s.switchover_start() == bytes.fromhex("08 00 0b 00 00")
    assert s.eof() == b"\x00"
    assert s.timer_section(0) == (
        bytes.fromhex("04 00000000 05 74696d6572 00000000 00000002")
        + bytes(24)
        + bytes.fromhex("7e 00000000")
    )


def test_spec_74_example_records() -> None:
    assert s.ram_zero(0x2000, "mem") == bytes.fromhex("00 00 00 00 00 00 20 02 03 6d 65 6d 00")
    assert s.ram_zero(0x3000, None) == bytes.fromhex("00 00 00 00 00 00 30 22 00")
    assert s.ram_eos() == bytes.fromhex("00 00 00 00 00 00 00 10")
    assert s.section_footer(2) == bytes.fromhex("7e 00 00 00 02")


def test_page_header_leaves_the_data_to_the_caller() -> None:
    assert s.ram_page_header(0x5000, "mem") == word(0x5000 | RAM_SAVE_FLAG_PAGE) + b"\x03mem"
    assert s.ram_page_header(0x6000, None) == word(
        0x6000 | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
    )


def test_globalstate_section_layout() -> None:
    body = s.globalstate_section(4, "running")
    header = s.section_full(4, "globalstate", 0, 1)
    assert body.startswith(header)
    assert body[len(header) : len(header) + 4] == (8).to_bytes(4, "big")
    assert body[len(header) + 4 : len(header) + 104] == b"running".ljust(100, b"\0")
    assert body.endswith(s.section_footer(4))
    assert len(body) == len(header) + 104 + 5


def test_vmdescription_and_command_framing() -> None:
    assert s.vmdescription(b'{"a": 1}') == b"\x06\x00\x00\x00\x08" + b'{"a": 1}'
    assert s.command(0x1234, b"xy") == bytes.fromhex("08 1234 0002") + b"xy"


@pytest.mark.parametrize(
    "build",
    [
        lambda: s.ram_page_header(0x800, "mem"),
        lambda: s.ram_zero(-PAGE_SIZE, "mem"),
        lambda: s.ram_zero(0, ""),
        lambda: s.ram_zero(0, "x" * 256),
        lambda: s.ram_mem_size([("mem", 100)]),
        lambda: s.ram_mem_size([("mem", 0)]),
        lambda: s.globalstate_section(4, "r" * 100),
        lambda: s.globalstate_section(4, "läuft"),
        lambda: s.command(0x10000),
        lambda: s.command(1, bytes(0x10000)),
    ],
)
def test_encoder_rejects_what_cannot_be_encoded(build: object) -> None:
    assert callable(build)
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        build()


# --- decoder: good streams ---------------------------------------------------------------


def rich_stream() -> tuple[bytes, list[Event]]:
    """A stream using every record the decoder knows, with the events it must give."""
    records = (
        s.ram_page_header(0, BLOCK)
        + page(1)
        + s.ram_zero(PAGE_SIZE, None)
        + s.ram_multifd_flush()
        + s.ram_page_header(5 * PAGE_SIZE, None)
        + page(6)
    )
    data = (
        prologue()
        + part(records)
        + s.switchover_start()
        + s.section_end(RAM_ID)
        + s.ram_zero(15 * PAGE_SIZE, None)  # CONTINUE reaches back across sections
        + s.ram_eos()
        + s.section_footer(RAM_ID)
        + epilogue()
    )
    events: list[Event] = [
        s.FileHeader(3),
        s.Configuration("none"),
        s.SectionStart(RAM_ID, "ram", 0, 4),
        s.RamMemSize(BLOCK_SIZE, ((BLOCK, BLOCK_SIZE),)),
        s.RamEos(),
        s.SectionFooter(RAM_ID),
        s.SectionPart(RAM_ID),
        s.RamPage(BLOCK, 0, page(1)),
        s.RamZero(BLOCK, PAGE_SIZE, 0),
        s.RamMultifdFlush(),
        s.RamPage(BLOCK, 5 * PAGE_SIZE, page(6)),
        s.RamEos(),
        s.SectionFooter(RAM_ID),
        s.Command(MIG_CMD_SWITCHOVER_START, b""),
        s.SectionEnd(RAM_ID),
        s.RamZero(BLOCK, 15 * PAGE_SIZE, 0),
        s.RamEos(),
        s.SectionFooter(RAM_ID),
        s.SectionFull(0, "timer", 0, 2),
        s.TimerState(0, 0),
        s.SectionFooter(0),
        s.SectionFull(4, "globalstate", 0, 1),
        s.GlobalState("running"),
        s.SectionFooter(4),
        s.Eof(),
        s.VmDescription(b"{}"),
    ]
    return data, events


def test_decodes_every_record_kind() -> None:
    data, expected = rich_stream()
    assert decode(data) == expected


@pytest.mark.parametrize("chunk", [1, 7, 4096, 4097])
def test_chunking_does_not_change_events(chunk: int) -> None:
    data, expected = rich_stream()
    assert decode(data, chunk=chunk) == expected


def test_next_event_returns_none_until_a_record_is_complete() -> None:
    decoder = s.StreamDecoder()
    header = s.file_header()
    decoder.feed(header[:-1])
    assert decoder.next_event() is None
    decoder.feed(header[-1:])
    assert decoder.next_event() == s.FileHeader(3)
    assert decoder.next_event() is None
    assert decoder.offset == len(header)


def test_blocks_are_known_after_mem_size() -> None:
    decoder = s.StreamDecoder()
    decoder.feed(prologue([("a", PAGE_SIZE), ("b", 2 * PAGE_SIZE)]))
    assert decoder.blocks is None
    events = list(decoder.events())
    assert s.RamMemSize(3 * PAGE_SIZE, (("a", PAGE_SIZE), ("b", 2 * PAGE_SIZE))) in events
    assert decoder.blocks == (("a", PAGE_SIZE), ("b", 2 * PAGE_SIZE))


def test_stream_may_end_right_after_eof() -> None:
    events = decode(prologue() + s.eof())
    assert events[-1] == s.Eof()


def test_nonzero_fill_byte_is_reported_not_rejected() -> None:
    records = word(PAGE_SIZE | RAM_SAVE_FLAG_ZERO) + b"\x03mem\x5a"
    assert s.RamZero(BLOCK, PAGE_SIZE, 0x5A) in decode(prologue() + part(records) + s.eof())


def test_unknown_commands_are_passed_through() -> None:
    events = decode(prologue() + s.command(0x42, b"abc") + s.eof())
    assert s.Command(0x42, b"abc") in events


def test_more_full_sections_can_be_registered() -> None:
    data = prologue() + s.section_full(9, "clock2", 0, 2) + bytes(24) + s.section_footer(9)
    sections = {**s.DEFAULT_SECTIONS, "clock2": TimerParser()}
    decoder = s.StreamDecoder(sections=sections)
    decoder.feed(data + s.eof())
    assert s.SectionFull(9, "clock2", 0, 2) in list(decoder.events())
    decoder.close()
    assert "'clock2'" in str(decode_error(data))


def test_input_buffer_is_compacted() -> None:
    chunk = 64 << 10
    pages = b"".join(s.ram_page_header(i * PAGE_SIZE, BLOCK) + page(i) for i in range(16))
    decoder = s.StreamDecoder()
    decoder.feed(prologue())
    list(decoder.events())
    for _ in range(40):  # 40 passes over the block, 2.6 MiB of input
        data = part(pages)
        for at in range(0, len(data), chunk):
            decoder.feed(data[at : at + chunk])
            list(decoder.events())
            # Consumed bytes are dropped: the buffer never holds much more than one chunk.
            assert len(decoder._buf) <= 2 * chunk + (64 << 10)


# --- decoder: stream framing errors ------------------------------------------------------


def test_bad_magic() -> None:
    error = decode_error(b"QEVN" + bytes(4))
    assert "magic" in error.what
    assert error.received == "0x5145564e"


def test_obsolete_stream_version() -> None:
    error = decode_error(bytes.fromhex("5145564d 00000002"))
    assert (error.expected, error.received) == (3, 2)


def test_configuration_missing() -> None:
    error = decode_error(s.file_header() + s.section_part(2))
    assert "configuration section missing" in error.what
    assert error.received == "0x02"


def test_machine_name_length_is_bounded() -> None:
    error = decode_error(s.file_header() + b"\x07\x00\x00\x00\x09", max_name_len=8)
    assert (error.expected, error.received) == ("<= 8", 9)
    error = decode_error(s.file_header() + b"\x07\xff\xff\xff\xff")
    assert (error.expected, error.received) == ("<= 255", 0xFFFFFFFF)


def test_configuration_subsections_are_rejected() -> None:
    data = s.file_header() + s.configuration("none") + b"\x05\x0fconfiguration/x"
    error = decode_error(data)
    assert "subsection" in error.what


@pytest.mark.parametrize("kind", [0x05, 0x06, 0x07, 0x09, 0x7E, 0xFF])
def test_unexpected_top_level_record(kind: int) -> None:
    error = decode_error(prologue() + bytes((kind,)) + bytes(16))
    assert error.received == f"{kind:#04x}"


def test_error_names_the_stream_offset_and_channel() -> None:
    decoder = s.StreamDecoder("main-test")
    decoder.feed(prologue() + b"\x09")
    with pytest.raises(ProtocolError) as info:
        list(decoder.events())
    assert info.value.channel == "main-test"
    assert f"stream offset {len(prologue())}" in info.value.what


# --- decoder: section errors -------------------------------------------------------------


def test_unknown_full_section_names_its_idstr() -> None:
    error = decode_error(prologue() + s.section_full(5, "apic", 0, 1) + bytes(8))
    assert error.received == "'apic'"
    assert "globalstate" in str(error.expected)
    assert "timer" in str(error.expected)


def _tail_decoder(data: bytes) -> tuple[s.StreamDecoder, list[Event]]:
    decoder = s.StreamDecoder(tail_from_unknown=True)
    decoder.feed(data)
    return decoder, list(decoder.events())


def test_an_unknown_section_after_the_ram_end_starts_the_tail() -> None:
    """A real machine's device state: handed over undecoded, from the section's first byte."""
    ram_end = s.section_end(RAM_ID) + s.ram_eos() + s.section_footer(RAM_ID)
    device = s.section_full(5, "cpu_common", 0, 1) + bytes(9) + s.section_footer(5)
    tail = device + s.timer_section(0) + s.eof() + s.vmdescription(b"{}")
    decoder, events = _tail_decoder(prologue() + ram_end + tail[:7])
    assert events[-1] == s.SectionFooter(RAM_ID)
    assert decoder.take_tail() == b""  # no tail yet: the idstr is not complete
    decoder.feed(tail[7:])
    assert list(decoder.events()) == []  # nothing of the device section
    assert decoder.in_tail
    assert decoder.take_tail() == tail
    decoder.close()
    assert s.ends_with_eof(tail, description=True)


def test_an_unknown_section_before_the_ram_end_is_still_an_error() -> None:
    data = prologue() + s.section_full(5, "cpu_common", 0, 1) + bytes(9)
    with pytest.raises(ProtocolError, match="unknown FULL section"):
        _tail_decoder(data)


def test_full_section_version_mismatch() -> None:
    error = decode_error(prologue() + s.section_full(0, "timer", 0, 3) + bytes(24))
    assert (error.expected, error.received) == (2, 3)


@pytest.mark.parametrize(
    ("header", "expected", "received"),
    [
        (s.section_start(3, "block", 0, 1), "'ram'", "'block'"),
        (s.section_start(3, "ram", 1, 4), 0, 1),
        (s.section_start(3, "ram", 0, 5), 4, 5),
    ],
)
def test_bad_section_start(header: bytes, expected: object, received: object) -> None:
    error = decode_error(s.file_header() + s.configuration("none") + header)
    assert (error.expected, error.received) == (expected, received)


def test_second_ram_start() -> None:
    error = decode_error(prologue() + s.section_start(7, "ram", 0, 4))
    assert "second START" in error.what


@pytest.mark.parametrize("continuation", [s.section_part, s.section_end])
def test_ram_part_or_end_before_start(continuation: object) -> None:
    assert callable(continuation)
    data = s.file_header() + s.configuration("none") + continuation(RAM_ID)
    error = decode_error(data)
    assert "never started" in error.what
    assert error.received == RAM_ID


def test_part_after_end() -> None:
    data = prologue() + s.section_end(RAM_ID) + s.ram_eos() + s.section_footer(RAM_ID)
    error = decode_error(data + s.section_part(RAM_ID))
    assert "after SECTION_END" in error.what


def test_footer_of_another_section() -> None:
    data = (
        s.file_header()
        + s.configuration("none")
        + s.section_start(RAM_ID, "ram", 0, 4)
        + s.ram_mem_size([(BLOCK, BLOCK_SIZE)])
        + s.ram_eos()
        + s.section_footer(3)
    )
    error = decode_error(data)
    assert "footer of section 'ram'" in error.what
    assert (error.expected, error.received) == (RAM_ID, 3)


@pytest.mark.parametrize("byte", [0x00, 0x05])
def test_missing_footer(byte: int) -> None:
    data = prologue() + s.section_full(0, "timer", 0, 2) + bytes(24) + bytes((byte,)) + bytes(4)
    error = decode_error(data)
    assert "missing section footer for 'timer'" in error.what
    assert (error.expected, error.received) == ("0x7e", f"{byte:#04x}")


def test_full_section_body_is_bounded() -> None:
    class Endless:
        version_id = 1

        def parse(self, data: memoryview, *, channel: str) -> tuple[Event, int] | None:
            return None

    decoder = s.StreamDecoder(max_section_size=1000, sections={"big": Endless()})
    decoder.feed(prologue() + s.section_full(1, "big", 0, 1) + bytes(999))
    list(decoder.events())
    decoder.feed(b"\0")
    with pytest.raises(ProtocolError, match="body of section 'big'"):
        decoder.next_event()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ((9).to_bytes(4, "big") + b"running".ljust(100, b"\0"), "size"),
        ((3).to_bytes(4, "big") + b"\xe4\xe4".ljust(100, b"\0"), "runstate"),
        ((1).to_bytes(4, "big") + bytes(100), "runstate"),
    ],
)
def test_bad_globalstate(body: bytes, fragment: str) -> None:
    data = prologue() + s.section_full(4, "globalstate", 0, 1) + body + s.section_footer(4)
    assert fragment in decode_error(data).what


def test_switchover_start_with_arguments() -> None:
    error = decode_error(prologue() + s.command(MIG_CMD_SWITCHOVER_START, b"x"))
    assert (error.expected, error.received) == (0, 1)


# --- decoder: ram record errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "feature"),
    [
        (RAM_SAVE_FLAG_XBZRLE, "XBZRLE"),
        (RAM_SAVE_FLAG_HOOK, "HOOK"),
        (RAM_SAVE_FLAG_COMPRESS_PAGE, "COMPRESS_PAGE"),
        (RAM_SAVE_FLAG_FULL, "FULL"),
        (RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_CONTINUE, "XBZRLE"),
    ],
)
def test_unsupported_ram_flags(flags: int, feature: str) -> None:
    error = decode_error(prologue() + s.section_part(RAM_ID) + word(flags) + bytes(64))
    assert error.what.startswith("unsupported ram record")
    assert str(error.received).startswith(feature)


@pytest.mark.parametrize(
    ("flags", "received"),
    [
        (0, "no flag"),
        (0x400, "0x400"),
        (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE, "ZERO|PAGE"),
        (RAM_SAVE_FLAG_EOS | RAM_SAVE_FLAG_CONTINUE, "EOS|CONTINUE"),
    ],
)
def test_unknown_ram_flag_combinations(flags: int, received: str) -> None:
    error = decode_error(prologue() + s.section_part(RAM_ID) + word(flags) + bytes(64))
    assert error.received == received


def test_eos_with_an_address() -> None:
    error = decode_error(prologue() + s.section_part(RAM_ID) + word(PAGE_SIZE | RAM_SAVE_FLAG_EOS))
    assert (error.expected, error.received) == (0, "0x1000")


def test_continue_without_a_previous_block() -> None:
    error = decode_error(prologue() + s.section_part(RAM_ID) + s.ram_zero(0, None))
    assert "CONTINUE" in error.what


def test_page_before_mem_size() -> None:
    data = (
        s.file_header()
        + s.configuration("none")
        + s.section_start(RAM_ID, "ram", 0, 4)
        + s.ram_zero(0, BLOCK)
    )
    assert "before MEM_SIZE" in decode_error(data).what


def test_page_of_an_unknown_block() -> None:
    error = decode_error(prologue() + part(s.ram_zero(0, "other")))
    assert error.received == "'other'"


@pytest.mark.parametrize("offset", [BLOCK_SIZE, 1 << 40])
def test_page_offset_outside_its_block(offset: int) -> None:
    error = decode_error(prologue() + part(s.ram_page_header(offset, BLOCK) + page(0)))
    assert (error.expected, error.received) == (f"<= {BLOCK_SIZE - PAGE_SIZE:#x}", f"{offset:#x}")


def test_mem_size_block_longer_than_the_total() -> None:
    mem_size = word(BLOCK_SIZE | 0x04) + b"\x03mem" + word(2 * BLOCK_SIZE)
    data = s.file_header() + s.configuration("none") + s.section_start(2, "ram", 0, 4) + mem_size
    error = decode_error(data)
    assert "exceed the MEM_SIZE total" in error.what


def test_mem_size_total_larger_than_the_blocks() -> None:
    mem_size = word(2 * BLOCK_SIZE | 0x04) + b"\x03mem" + word(BLOCK_SIZE)
    data = (
        s.file_header()
        + s.configuration("none")
        + s.section_start(2, "ram", 0, 4)
        + mem_size
        + s.ram_eos()  # read as the next block name: it is not one
    )
    assert "MEM_SIZE" in decode_error(data).what


@pytest.mark.parametrize(
    ("blocks", "fragment"),
    [
        (b"\x03mem" + word(PAGE_SIZE) + b"\x03mem" + word(PAGE_SIZE), "announced twice"),
        (b"\x03mem" + word(100) + b"\x01x" + word(2 * PAGE_SIZE - 100), "length of ram block"),
        (b"\x02\xff\xfe" + word(2 * PAGE_SIZE), "MEM_SIZE block name"),
    ],
)
def test_bad_mem_size_blocks(blocks: bytes, fragment: str) -> None:
    data = (
        s.file_header()
        + s.configuration("none")
        + s.section_start(2, "ram", 0, 4)
        + word(2 * PAGE_SIZE | 0x04)
        + blocks
    )
    assert fragment in decode_error(data).what


def test_second_mem_size() -> None:
    error = decode_error(prologue() + part(s.ram_mem_size([(BLOCK, BLOCK_SIZE)])))
    assert "second MEM_SIZE" in error.what


def test_number_of_blocks_is_bounded() -> None:
    blocks = [(f"b{i}", PAGE_SIZE) for i in range(5)]
    error = decode_error(prologue(blocks), max_blocks=4)
    assert error.expected == "<= 4"


# --- decoder: end of stream --------------------------------------------------------------


def test_junk_after_eof() -> None:
    error = decode_error(prologue() + s.eof() + b"\x01")
    assert (error.expected, error.received) == ("0x06", "0x01")


def test_vm_description_length_is_checked_before_its_body_arrives() -> None:
    decoder = s.StreamDecoder(max_vmdesc=1024)
    decoder.feed(prologue() + s.eof() + b"\x06\x00\x00\x04\x01")
    with pytest.raises(ProtocolError) as info:
        list(decoder.events())
    assert (info.value.expected, info.value.received) == ("<= 1024", 1025)


def test_data_after_the_vm_description() -> None:
    error = decode_error(prologue() + s.eof() + s.vmdescription(b"{}") + b"\x00")
    assert "after the VM description" in error.what


@pytest.mark.parametrize(
    "data",
    [
        b"",
        s.file_header()[:5],
        prologue(),
        prologue() + s.section_part(RAM_ID) + s.ram_page_header(0, BLOCK) + page(1)[:100],
        prologue() + s.eof() + s.vmdescription(b"{}")[:-1],
    ],
)
def test_stream_ending_early(data: bytes) -> None:
    error = decode_error(data)
    assert "ended early" in error.what


def test_errors_are_sticky() -> None:
    decoder = s.StreamDecoder()
    decoder.feed(b"XXXXXXXX" + prologue())
    with pytest.raises(ProtocolError) as first:
        decoder.next_event()
    with pytest.raises(ProtocolError) as again:
        decoder.next_event()
    assert again.value is first.value
    with pytest.raises(ProtocolError) as on_close:
        decoder.close()
    assert on_close.value is first.value


def test_feed_after_close_is_an_error() -> None:
    decoder = s.StreamDecoder()
    decoder.feed(prologue() + s.eof())
    list(decoder.events())
    decoder.close()
    decoder.close()  # idempotent
    with pytest.raises(ProtocolError, match="after the end of input"):
        decoder.feed(b"\x06")
