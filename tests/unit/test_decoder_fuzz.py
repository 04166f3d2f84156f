"""Hypothesis: whatever the bytes, decoders either decode or raise ProtocolError, nothing else.

The stream decoder is also checked for chunking independence: feeding the same bytes in
any pieces gives the same events and the same error as feeding them at once.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multifd import compression
from multifd.errors import ProtocolError
from multifd.wire import stream as s
from multifd.wire.constants import INIT_PACKET_SIZE, PACKET_HEADER_SIZE, PAGE_SIZE
from multifd.wire.packets import InitPacket, RamPacket
from multifd.wire.records import Event
from tests.unit.test_packets import TV1, TV2, TV4, TV5
from tests.unit.test_vectors import capture

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Outcome = tuple[list[Event], str | None]


def run(data: bytes, cuts: Sequence[int] = ()) -> Outcome:
    """Feed ``data`` split at ``cuts``, drain after each piece, then close."""
    decoder = s.StreamDecoder()
    events: list[Event] = []
    bounds = [0, *sorted(cuts), len(data)]
    error: ProtocolError | None = None
    try:
        for start, end in itertools.pairwise(bounds):
            decoder.feed(data[start:end])
            events.extend(decoder.events())
        decoder.close()
    except ProtocolError as exc:
        error = exc
    if error is None:
        return events, None
    assert error.channel == "main"
    return events, str(error)


def check_stream(data: bytes, cuts: Sequence[int]) -> None:
    assert run(data, cuts) == run(data)


def prologue() -> bytes:
    return (
        s.file_header()
        + s.configuration("none")
        + s.section_start(2, "ram", 0, 4)
        + s.ram_mem_size([("mem", 8 * PAGE_SIZE)])
        + s.ram_eos()
        + s.section_footer(2)
    )


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> tuple[bytes, list[int]]:
    raw = draw(data)
    cuts = draw(st.lists(st.integers(0, len(raw)), max_size=12))
    return raw, cuts


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few bytes changed, maybe cut short, maybe with bytes inserted."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


# --- the main stream decoder -------------------------------------------------------------


@FUZZ
@given(chunked(st.binary(max_size=300)))
def test_any_bytes_decode_or_raise_protocol_error(case: tuple[bytes, list[int]]) -> None:
    check_stream(*case)


@FUZZ
@given(chunked(st.binary(max_size=300).map(lambda tail: prologue() + tail)))
def test_any_bytes_after_a_valid_prologue(case: tuple[bytes, list[int]]) -> None:
    check_stream(*case)


@FUZZ
@given(chunked(st.sampled_from(["plain_backend", "none_conn0"]).map(capture).flatmap(mutated)))
def test_mutated_captures(case: tuple[bytes, list[int]]) -> None:
    check_stream(*case)


@FEW
@given(st.sampled_from(["plain_ram", "plain_backend", "zstd_conn0"]), st.data())
def test_real_captures_in_any_chunking(name: str, data: st.DataObject) -> None:
    raw = capture(name)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=40))
    events, error = run(raw, cuts)
    assert error is None
    assert events == run(raw)[0]


# --- multifd packets ---------------------------------------------------------------------


def unpack_any(raw: bytes) -> None:
    try:
        packet = RamPacket.unpack(raw, channel="multifd/0")
    except ProtocolError:
        return
    assert RamPacket.unpack(packet.pack(), channel="multifd/0") == packet
    with contextlib.suppress(ProtocolError):
        packet.check_offsets(64 * PAGE_SIZE, channel="multifd/0")


@FUZZ
@given(
    st.one_of(st.binary(max_size=PACKET_HEADER_SIZE + 8), st.binary(min_size=1344, max_size=1344))
)
def test_ram_packet_unpack_any_bytes(raw: bytes) -> None:
    unpack_any(raw)


@FUZZ
@given(st.sampled_from([TV2, TV4, TV5]).flatmap(mutated))
def test_ram_packet_unpack_mutated_headers(raw: bytes) -> None:
    unpack_any(raw)


@FUZZ
@given(st.one_of(st.binary(max_size=80), st.just(TV1).flatmap(mutated)))
def test_init_packet_unpack_any_bytes(raw: bytes) -> None:
    try:
        packet = InitPacket.unpack(raw, channel="multifd/?")
    except ProtocolError:
        return
    assert len(raw) == INIT_PACKET_SIZE
    assert InitPacket.unpack(packet.pack(), channel="multifd/?") == packet


# --- decompressors -----------------------------------------------------------------------


def valid_payloads(method: str) -> list[bytes]:
    compressor = compression.compressor(method)
    assert compressor is not None
    pages = [bytes((fill,)) * PAGE_SIZE for fill in (1, 2, 6)]
    return [compressor.compress(pages), compressor.compress(pages[:1])]


def decompress_any(method: str, payloads: Sequence[bytes], counts: Sequence[int]) -> None:
    decompressor = compression.decompressor(method)
    assert decompressor is not None
    failed = False
    for payload, count in zip(payloads, counts, strict=False):
        out = [memoryview(bytearray(PAGE_SIZE)) for _ in range(count)]
        try:
            decompressor.decompress_into(payload, out, channel="multifd/2")
        except ProtocolError:
            failed = True
        else:
            assert not failed, "a broken stream must stay broken"


@FUZZ
@given(
    st.sampled_from(["zlib", "zstd"]),
    st.lists(st.binary(max_size=200), min_size=1, max_size=3),
    st.lists(st.integers(0, 4), min_size=3, max_size=3),
)
def test_decompress_any_bytes(method: str, payloads: list[bytes], counts: list[int]) -> None:
    decompressor_payloads = [
        b"" if count == 0 else p for p, count in zip(payloads, counts, strict=False)
    ]
    decompress_any(method, decompressor_payloads, counts)


@FUZZ
@given(st.sampled_from(["zlib", "zstd"]), st.data())
def test_decompress_mutated_payloads(method: str, data: st.DataObject) -> None:
    first, second = valid_payloads(method)
    payloads = [data.draw(mutated(first)) if first else first, data.draw(mutated(second))]
    counts = [data.draw(st.integers(1, 4)), data.draw(st.integers(1, 2))]
    decompress_any(method, payloads, counts)
