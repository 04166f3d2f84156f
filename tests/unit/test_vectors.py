"""Golden tests against the real QEMU 7.2 captures in ``shared/vectors/qemu-7.2``.

Main streams go through :class:`StreamDecoder`; multifd channel captures through
``InitPacket``/``RamPacket`` and the decompressors. Pages are reassembled across the main
channel and the multifd channels of one migration and compared with the guest's known
content; the 7.2 quirks the spec describes must be visible; and our encoder must
reproduce the captured main streams byte for byte.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from multifd import compression
from multifd.errors import UNIDENTIFIED, multifd_channel
from multifd.wire import stream as s
from multifd.wire.constants import (
    INIT_PACKET_SIZE,
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_ZSTD,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    PAGES_PER_PACKET,
)
from multifd.wire.packets import NIL_UUID, InitPacket, RamPacket
from multifd.wire.records import Event
from tests.unit.test_packets import TV1, TV1_UUID, TV4

GUEST_SIZE = 4 << 20
GUEST_PAGES = GUEST_SIZE // PAGE_SIZE
# The backend-file guest: pages 0, 1 and 5 hold these bytes, every other page is zero.
FILLED = {0x0000: 0x01, 0x1000: 0x02, 0x5000: 0x06}

MAIN_STREAMS = ("plain_ram", "plain_backend", "none_conn0", "zlib_conn0", "zstd_conn0")
# multifd runs: compression method -> channel captures in accept order
RUNS = {
    "none": ("none_conn1", "none_conn2"),
    "zlib": ("zlib_conn1", "zlib_conn2"),
    "zstd": ("zstd_conn1", "zstd_conn2"),
}
UUID_RUN = ("uuid_conn1", "uuid_conn2", "uuid_conn3")  # compression none, main not kept
TV6 = "7801ecd0310d00000c03a074c7fc4bae8f06249060c0800103060c183060c0800103060cac0f1c060c18"
TV6 += "3060c0800103060c183060c0c0fcc063c0800103060c183060c0800103060ccc0f140000ffff"
TV7 = "28b52ffd004884000020010102060314002ffc17fedffd6301"


def shared_vectors() -> Path:
    """``shared/vectors`` beside the repository root; fails the test if it is missing."""
    here = Path(__file__).resolve()
    root = next((p for p in here.parents if (p / "pyproject.toml").is_file()), None)
    if root is None:
        pytest.fail(f"no repository root (pyproject.toml) above {here}")
    vectors = root.parent / "shared" / "vectors"
    if not vectors.is_dir():
        pytest.fail(f"golden vectors missing: expected {vectors} (shared/ beside the repo)")
    return vectors


def capture(name: str) -> bytes:
    return (shared_vectors() / "qemu-7.2" / f"{name}.bin").read_bytes()


def decode_main(name: str) -> list[Event]:
    decoder = s.StreamDecoder()
    decoder.feed(capture(name))
    events = list(decoder.events())
    decoder.close()
    return events


@dataclass
class Channel:
    """What one multifd channel capture carried."""

    init: InitPacket
    packets: list[tuple[int, RamPacket]] = field(default_factory=list)  # (stream offset, header)
    payloads: list[bytes] = field(default_factory=list)  # compressed payloads, in order
    pages: dict[int, bytes] = field(default_factory=dict)  # block offset -> page data

    @property
    def syncs(self) -> int:
        return sum(packet.is_sync for _at, packet in self.packets)


def read_channel(data: bytes, method: str) -> Channel:
    """Decode a whole multifd channel capture as a receiver would."""
    init = InitPacket.unpack(data[:INIT_PACKET_SIZE], channel=UNIDENTIFIED)
    name = multifd_channel(init.channel_id)
    channel = Channel(init)
    decompressor = compression.decompressor(method)
    at = INIT_PACKET_SIZE
    while at < len(data):
        header = RamPacket.unpack(data[at : at + PACKET_HEADER_SIZE], channel=name)
        channel.packets.append((at, header))
        at += PACKET_HEADER_SIZE
        header.check_offsets(GUEST_SIZE, channel=name)
        if not header.normal_pages:
            continue  # no payload, whatever a stale next_packet_size says
        out = [memoryview(bytearray(PAGE_SIZE)) for _ in range(header.normal_pages)]
        if decompressor is None:
            size = header.normal_pages * PAGE_SIZE
            for index, view in enumerate(out):
                view[:] = data[at + index * PAGE_SIZE : at + (index + 1) * PAGE_SIZE]
        else:
            assert header.method == decompressor.flag
            size = header.next_packet_size
            channel.payloads.append(data[at : at + size])
            decompressor.decompress_into(data[at : at + size], out, channel=name)
        at += size
        for offset, view in zip(header.offsets[: header.normal_pages], out, strict=True):
            channel.pages[offset] = view.tobytes()
    assert at == len(data), "capture ends inside a packet"
    return channel


def main_pages(events: Iterable[Event]) -> dict[int, bytes]:
    pages: dict[int, bytes] = {}
    for event in events:
        if isinstance(event, s.RamPage):
            pages[event.offset] = event.data
        elif isinstance(event, s.RamZero):
            pages[event.offset] = bytes((event.fill,)) * PAGE_SIZE
    return pages


def expected_guest(filled: dict[int, int]) -> dict[int, bytes]:
    return {
        index * PAGE_SIZE: bytes((filled.get(index * PAGE_SIZE, 0),)) * PAGE_SIZE
        for index in range(GUEST_PAGES)
    }


def reencode(events: Iterable[Event]) -> bytes:
    """Our encoder's bytes for a decoded stream; CONTINUE whenever the block repeats."""
    out: list[bytes] = []
    last_block: str | None = None
    for event in events:
        match event:
            case s.RamPage(block=block, offset=offset, data=data):
                out.append(s.ram_page_header(offset, None if block == last_block else block))
                out.append(data)
                last_block = block
            case s.RamZero(block=block, offset=offset):
                out.append(s.ram_zero(offset, None if block == last_block else block))
                last_block = block
            case _:
                out.append(_encode_framing(event))
    return b"".join(out)


def _encode_framing(event: Event) -> bytes:  # noqa: PLR0911 - one arm per record type
    match event:
        case s.FileHeader():
            return s.file_header()
        case s.Configuration(machine=machine):
            return s.configuration(machine)
        case s.SectionStart(section_id=sid, idstr=idstr, instance_id=inst, version_id=ver):
            return s.section_start(sid, idstr, inst, ver)
        case s.SectionFull(section_id=sid, idstr=idstr, instance_id=inst, version_id=ver):
            return s.section_full(sid, idstr, inst, ver)
        case s.SectionPart(section_id=sid):
            return s.section_part(sid)
        case s.SectionEnd(section_id=sid):
            return s.section_end(sid)
        case s.SectionFooter(section_id=sid):
            return s.section_footer(sid)
        case s.RamMemSize(blocks=blocks):
            return s.ram_mem_size(blocks)
        case s.RamEos():
            return s.ram_eos()
        case s.TimerState() | s.GlobalState():
            return event.pack()
        case s.Eof():
            return s.eof()
        case s.VmDescription(data=data):
            return s.vmdescription(data)
    raise AssertionError(f"no encoder for {event}")


# --- coverage of the capture folder ------------------------------------------------------


def test_vectors_folder_is_found_and_every_capture_is_checked() -> None:
    folder = shared_vectors() / "qemu-7.2"
    present = {path.stem for path in folder.glob("*.bin")}
    checked = set(MAIN_STREAMS) | set(UUID_RUN) | {n for run in RUNS.values() for n in run}
    assert present == checked


# --- main streams ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAIN_STREAMS)
def test_main_stream_structure(name: str) -> None:
    events = decode_main(name)
    block = "ram" if name == "plain_ram" else "mem"
    frame = [e for e in events if not isinstance(e, s.RamPage | s.RamZero)]
    assert frame[:-1] == [
        s.FileHeader(3),
        s.Configuration("none"),
        s.SectionStart(2, "ram", 0, 4),
        s.RamMemSize(GUEST_SIZE, ((block, GUEST_SIZE),)),
        s.RamEos(),
        s.SectionFooter(2),
        s.SectionPart(2),
        s.RamEos(),
        s.SectionFooter(2),
        s.SectionEnd(2),
        s.RamEos(),
        s.SectionFooter(2),
        s.SectionFull(0, "timer", 0, 2),
        s.TimerState(0, 0),
        s.SectionFooter(0),
        s.SectionFull(4, "globalstate", 0, 1),
        # Every capture says "prelaunch", although the README names -S for plain_ram only.
        s.GlobalState("prelaunch"),
        s.SectionFooter(4),
        s.Eof(),
    ]
    vmdesc = frame[-1]
    assert isinstance(vmdesc, s.VmDescription)
    description = json.loads(vmdesc.data)
    assert description["page_size"] == PAGE_SIZE
    assert [device["name"] for device in description["devices"]] == ["timer", "globalstate"]
    assert {e.block for e in events if isinstance(e, s.RamPage | s.RamZero)} == {block}


def test_plain_ram_is_all_zero_records() -> None:
    events = decode_main("plain_ram")
    zeros = [e for e in events if isinstance(e, s.RamZero)]
    assert not any(isinstance(e, s.RamPage) for e in events)
    assert {e.fill for e in zeros} == {0}
    assert main_pages(events) == expected_guest({})


def test_plain_backend_sends_data_pages_and_zero_records() -> None:
    events = decode_main("plain_backend")
    assert [(e.offset, e.data[0]) for e in events if isinstance(e, s.RamPage)] == sorted(
        FILLED.items()
    )
    assert main_pages(events) == expected_guest(FILLED)


@pytest.mark.parametrize("name", MAIN_STREAMS)
def test_encoder_reproduces_the_whole_capture(name: str) -> None:
    assert reencode(decode_main(name)) == capture(name)


def test_encoder_matches_the_deterministic_pieces_of_plain_ram() -> None:
    data = capture("plain_ram")
    prefix = (
        s.file_header()
        + s.configuration("none")
        + s.section_start(2, "ram", 0, 4)
        + s.ram_mem_size([("ram", GUEST_SIZE)])
        + s.ram_eos()
        + s.section_footer(2)
    )
    assert data.startswith(prefix)
    tail = s.timer_section(0) + s.globalstate_section(4, "prelaunch") + s.eof()
    vmdesc = next(e for e in decode_main("plain_ram") if isinstance(e, s.VmDescription))
    assert data.endswith(tail + s.vmdescription(vmdesc.data))


# --- multifd channels --------------------------------------------------------------------


@pytest.mark.parametrize("method", RUNS)
def test_multifd_run_reassembles_the_guest(method: str) -> None:
    main = main_pages(decode_main(f"{method}_conn0"))
    channels = [read_channel(capture(name), method) for name in RUNS[method]]
    assert sorted(channel.init.channel_id for channel in channels) == [0, 1]
    memory = dict(main)
    for channel in channels:
        # 7.2 sends zero pages on the main channel only (spec 5.1): the sets are disjoint.
        assert not channel.pages.keys() & main.keys()
        memory.update(channel.pages)
    assert memory == expected_guest(FILLED)
    assert sum(len(channel.pages) for channel in channels) == len(FILLED)


@pytest.mark.parametrize("method", RUNS)
def test_one_sync_per_channel_for_every_eos(method: str) -> None:
    eos = sum(isinstance(e, s.RamEos) for e in decode_main(f"{method}_conn0"))
    channels = [read_channel(capture(name), method) for name in RUNS[method]]
    assert [channel.syncs for channel in channels] == [eos] * len(channels)
    for channel in channels:
        assert channel.packets[-1][1].is_sync  # the stream ends right after a SYNC


def test_accept_order_is_arbitrary() -> None:
    # Spec 2.1 says "id 1 was accepted before id 0": true of the nocomp run only.
    order = {
        method: [read_channel(capture(name), method).init.channel_id for name in names]
        for method, names in RUNS.items()
    }
    assert order == {"none": [1, 0], "zlib": [0, 1], "zstd": [0, 1]}


def test_72_sync_packets_keep_pages_alloc() -> None:
    for method, names in RUNS.items():
        for name in names:
            for _at, packet in read_channel(capture(name), method).packets:
                assert packet.pages_alloc == PAGES_PER_PACKET


def test_uuid_run() -> None:
    channels = [read_channel(capture(name), "none") for name in UUID_RUN]
    assert capture("uuid_conn3")[:INIT_PACKET_SIZE] == TV1
    assert [channel.init for channel in channels] == [
        InitPacket(channel_id=index, uuid=TV1_UUID) for index in range(3)
    ]
    memory: dict[int, bytes] = {}
    for channel in channels:
        memory.update(channel.pages)
    assert memory == {offset: bytes((fill,)) * PAGE_SIZE for offset, fill in FILLED.items()}
    assert len({channel.syncs for channel in channels}) == 1


def test_runs_without_uuid_send_the_nil_uuid() -> None:
    for method, names in RUNS.items():
        for name in names:
            assert read_channel(capture(name), method).init.uuid == NIL_UUID


# --- the 7.2 pending_sync race (spec 6.4) -------------------------------------------------


def race_pairs(channel: Channel) -> list[tuple[RamPacket, RamPacket]]:
    """(SYNC packet with pages, the empty flag-0 packet right after it)."""
    headers = [packet for _at, packet in channel.packets]
    return [
        (first, second)
        for first, second in itertools.pairwise(headers)
        if first.is_sync and first.normal_pages and second.flags == 0 and not second.page_count
    ]


def test_race_sync_with_pages_then_empty_packet_in_nocomp_run() -> None:
    channel = read_channel(capture("none_conn2"), "none")
    [(sync, empty)] = race_pairs(channel)
    assert (sync.flags, sync.normal_pages, sync.packet_num) == (MULTIFD_FLAG_SYNC, 3, 3)
    assert empty.packet_num == sync.packet_num
    assert empty.stale
    assert empty.next_packet_size == 3 * PAGE_SIZE


def test_tv4_is_the_captured_empty_packet() -> None:
    data = capture("none_conn2")
    assert data[0x3AC0 : 0x3AC0 + PACKET_HEADER_SIZE] == TV4


@pytest.mark.usefixtures("zstd_backend")
def test_race_in_zstd_run_has_sync_and_method_bits() -> None:
    channel = read_channel(capture("zstd_conn1"), "zstd")
    [(sync, empty)] = race_pairs(channel)
    assert sync.flags == MULTIFD_FLAG_SYNC | MULTIFD_FLAG_ZSTD
    assert empty.flags == 0  # the empty packet carries no method bits
    assert empty.packet_num == sync.packet_num


def test_race_in_uuid_run() -> None:
    channel = read_channel(capture("uuid_conn1"), "none")
    [(sync, empty)] = race_pairs(channel)
    assert sync.normal_pages == 1
    assert empty.packet_num == sync.packet_num


def test_stale_fields_in_later_sync_packets() -> None:
    # 7.2 reuses its packet buffer: a later SYNC repeats the last block name and sizes.
    data = capture("none_conn2")
    raw = data[0x4000 : 0x4000 + PACKET_HEADER_SIZE]
    assert raw[0x40:0x44] == b"mem\0"
    sync = RamPacket.unpack(raw, channel="multifd/0")
    assert sync.is_sync
    assert sync.stale
    assert (sync.ramblock, sync.offsets) == ("", ())


# --- compression payloads (TV6, TV7) -----------------------------------------------------


@pytest.mark.usefixtures("zstd_backend")
@pytest.mark.parametrize(("method", "vector"), [("zlib", TV6), ("zstd", TV7)])
def test_captured_payload_is_the_spec_vector_and_ours(method: str, vector: str) -> None:
    channel = read_channel(capture(f"{method}_conn1"), method)
    [payload] = channel.payloads
    assert payload == bytes.fromhex(vector)
    pages = [channel.pages[offset] for offset in sorted(FILLED)]
    compressor = compression.compressor(method, 1)
    assert compressor is not None
    assert compressor.compress(pages) == payload


def test_capture_flags_seen() -> None:
    flags: Counter[int] = Counter()
    for method, names in RUNS.items():
        for name in names:
            flags.update(
                packet.flags for _at, packet in read_channel(capture(name), method).packets
            )
    # spec 3.2: SYNC, nocomp data/empty, zlib data, SYNC|ZSTD with data
    assert set(flags) == {0x01, 0x00, 0x02, 0x05}
