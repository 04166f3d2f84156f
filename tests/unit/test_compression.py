"""Compression methods: spec TV6/TV7 byte for byte, registry, levels, bad and hostile payloads."""

from __future__ import annotations

import itertools
import random
import tracemalloc
import zlib
from collections.abc import Sequence

import pytest
import zstandard

from multifd import compression
from multifd.compression import Compressor, Decompressor
from multifd.compression import zstd as zstd_module
from multifd.errors import ConfigError, ProtocolError
from multifd.wire.constants import (
    MAX_COMPRESSED_PAYLOAD,
    MULTIFD_FLAG_NOCOMP,
    MULTIFD_FLAG_QPL,
    MULTIFD_FLAG_ZLIB,
    MULTIFD_FLAG_ZSTD,
    PAGE_SIZE,
    PAGES_PER_PACKET,
)

CHANNEL = "multifd/1"
TV_PAGES = [bytes((fill,)) * PAGE_SIZE for fill in (0x01, 0x02, 0x06)]
TV6 = bytes.fromhex(
    "7801ecd0310d00000c03a074c7fc4bae8f06249060c0800103060c183060c0800103060cac0f1c060c18"
    "3060c0800103060c183060c0c0fcc063c0800103060c183060c0800103060ccc0f140000ffff"
)
TV6_NEXT = bytes.fromhex(
    "ecd0310d000000c3a073fe1dd7c7021218060c183060c0800103060c183060c0c0fd40000000ffff"
)
TV7 = bytes.fromhex("28b52ffd004884000020010102060314002ffc17fedffd6301")
METHODS = ("zlib", "zstd")

pytestmark = pytest.mark.usefixtures("zstd_backend")


def out_pages(count: int) -> list[memoryview]:
    return [memoryview(bytearray(PAGE_SIZE)) for _ in range(count)]


def make_compressor(method: str, level: int | None = None) -> Compressor:
    made = compression.compressor(method, level)
    assert made is not None
    return made


def make_decompressor(method: str) -> Decompressor:
    made = compression.decompressor(method)
    assert made is not None
    return made


def roundtrip(
    decompressor: Decompressor, payload: bytes, count: int, *, one_run: bool = False
) -> list[bytes]:
    """Decompress into ``count`` separate pages, or into one run of ``count`` pages."""
    out = [memoryview(bytearray(count * PAGE_SIZE))] if one_run else out_pages(count)
    decompressor.decompress_into(payload, out, channel=CHANNEL)
    data = b"".join(view.tobytes() for view in out)
    return [data[at : at + PAGE_SIZE] for at in range(0, len(data), PAGE_SIZE)]


def mixed_pages(rng: random.Random, count: int) -> list[bytes]:
    kinds = [
        lambda: rng.randbytes(PAGE_SIZE),
        lambda: bytes(PAGE_SIZE),
        lambda: bytes((rng.randrange(256),)) * PAGE_SIZE,
        lambda: rng.randbytes(64) * (PAGE_SIZE // 64),
    ]
    return [rng.choice(kinds)() for _ in range(count)]


# --- spec test vectors -------------------------------------------------------------------


def test_tv6_zlib_payload_is_byte_identical() -> None:
    compressor = make_compressor("zlib")
    assert compressor.compress(TV_PAGES) == TV6
    assert compressor.compress([bytes((0x07,)) * PAGE_SIZE]) == TV6_NEXT


def test_tv7_zstd_payload_is_byte_identical() -> None:
    assert make_compressor("zstd").compress(TV_PAGES) == TV7


def test_tv6_decodes_with_one_decompressor_per_channel() -> None:
    decompressor = make_decompressor("zlib")
    assert roundtrip(decompressor, TV6, 3) == TV_PAGES
    assert roundtrip(decompressor, TV6_NEXT, 1) == [bytes((0x07,)) * PAGE_SIZE]


def test_tv7_decodes() -> None:
    assert roundtrip(make_decompressor("zstd"), TV7, 3) == TV_PAGES


@pytest.mark.parametrize("method", METHODS)
def test_pages_decode_alike_one_by_one_and_as_one_run(method: str) -> None:
    pages = mixed_pages(random.Random(4), 7)
    payload = first_payload(method, pages)
    by_page, by_run = make_decompressor(method), make_decompressor(method)
    assert roundtrip(by_page, payload, 7) == pages
    assert roundtrip(by_run, payload, 7, one_run=True) == pages


def test_memoryview_pages_compress_like_bytes() -> None:
    views = [memoryview(bytearray(page)) for page in TV_PAGES]
    assert make_compressor("zlib").compress(views) == TV6
    assert make_compressor("zstd").compress(views) == TV7


def test_later_packet_needs_the_channel_stream_state() -> None:
    # TV6_NEXT has no zlib header: only the decompressor that saw TV6 can read it.
    with pytest.raises(ProtocolError):
        roundtrip(make_decompressor("zlib"), TV6_NEXT, 1)


# --- registry and levels -----------------------------------------------------------------


def test_methods_and_flags() -> None:
    assert compression.METHODS == ("none", "zlib", "zstd")
    assert [compression.flag_of(m) for m in compression.METHODS] == [
        MULTIFD_FLAG_NOCOMP,
        MULTIFD_FLAG_ZLIB,
        MULTIFD_FLAG_ZSTD,
    ]
    for method in compression.METHODS:
        assert compression.method_of(compression.flag_of(method)) == method
    for method in METHODS:
        assert make_compressor(method).flag == compression.flag_of(method)
        assert make_decompressor(method).flag == compression.flag_of(method)


def test_none_has_no_objects() -> None:
    assert compression.compressor("none") is None
    assert compression.compressor("none", 5) is None
    assert compression.decompressor("none") is None
    assert compression.level_range("none") is None
    assert compression.default_level("none") is None


@pytest.mark.parametrize("flag", [MULTIFD_FLAG_QPL, 0x06, 0x3E])
def test_unknown_wire_method_is_a_protocol_error(flag: int) -> None:
    with pytest.raises(ProtocolError) as info:
        compression.method_of(flag, channel=CHANNEL)
    assert info.value.channel == CHANNEL
    assert str(info.value.received).startswith(f"{flag:#x}")


def test_unsupported_hardware_method_is_named() -> None:
    with pytest.raises(ProtocolError, match="qpl"):
        compression.method_of(MULTIFD_FLAG_QPL)


@pytest.mark.parametrize(
    "call",
    [
        lambda: compression.flag_of("lz4"),
        lambda: compression.compressor("gzip"),
        lambda: compression.decompressor("zst"),
        lambda: compression.level_range("qpl"),
    ],
)
def test_unknown_method_name_is_a_config_error(call: object) -> None:
    assert callable(call)
    with pytest.raises(ConfigError, match="unknown compression method"):
        call()


@pytest.mark.parametrize(
    ("method", "low", "high"),
    [("zlib", 0, 9), ("zstd", 0, 20)],
)
def test_level_ranges(method: str, low: int, high: int) -> None:
    assert compression.level_range(method) == (low, high)
    assert compression.default_level(method) == 1
    for level in (low, high):
        assert compression.compressor(method, level) is not None
    for level in (low - 1, high + 1):
        with pytest.raises(ConfigError, match=f"{low}..{high}"):
            compression.compressor(method, level)


def test_zstd_level_zero_means_the_library_default() -> None:
    # QEMU hands the level to ZSTD_initCStream, where 0 selects ZSTD_CLEVEL_DEFAULT (3);
    # the zstandard package does the same, so level 0 behaves as QEMU's.
    data = mixed_pages(random.Random(0), 32)
    level0 = make_compressor("zstd", 0).compress(data)
    assert level0 == make_compressor("zstd", 3).compress(data)
    assert level0 != make_compressor("zstd", 1).compress(data)


@pytest.mark.parametrize(("method", "level"), [("zlib", 0), ("zlib", 9), ("zstd", 0), ("zstd", 20)])
def test_extreme_levels_roundtrip(method: str, level: int) -> None:
    data = mixed_pages(random.Random(level), 8)
    payload = make_compressor(method, level).compress(data)
    assert roundtrip(make_decompressor(method), payload, 8) == data


# --- streams over many packets -----------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_many_packets_on_interleaved_channels(method: str) -> None:
    rng = random.Random(method)
    channels = [(make_compressor(method), make_decompressor(method)) for _ in range(2)]
    for packet in range(12):
        compressor, decompressor = channels[packet % 2]
        count = rng.choice([1, 3, PAGES_PER_PACKET])
        data = mixed_pages(rng, count)
        payload = compressor.compress(data)
        assert len(payload) <= MAX_COMPRESSED_PAYLOAD
        assert roundtrip(decompressor, payload, count) == data


@pytest.mark.parametrize("method", METHODS)
def test_incompressible_full_packet_stays_under_the_receive_buffer(method: str) -> None:
    data = [random.Random(7).randbytes(PAGE_SIZE) for _ in range(PAGES_PER_PACKET)]
    assert len(make_compressor(method).compress(data)) <= MAX_COMPRESSED_PAYLOAD


@pytest.mark.parametrize("method", METHODS)
def test_compressor_rejects_bad_pages(method: str) -> None:
    compressor = make_compressor(method)
    with pytest.raises(ValueError, match="at least one page"):
        compressor.compress([])
    with pytest.raises(ValueError, match="4096"):
        compressor.compress([bytes(100)])


# --- bad payloads ------------------------------------------------------------------------


def first_payload(method: str, pages: Sequence[bytes] = TV_PAGES) -> bytes:
    return make_compressor(method).compress(pages)


@pytest.mark.parametrize("one_run", [False, True], ids=["pages", "run"])
@pytest.mark.parametrize("method", METHODS)
def test_payload_too_short_for_the_pages(method: str, one_run: bool) -> None:
    with pytest.raises(ProtocolError) as info:
        roundtrip(make_decompressor(method), first_payload(method), 4, one_run=one_run)
    assert "packet size" in info.value.what
    assert info.value.expected == 4 * PAGE_SIZE
    assert info.value.channel == CHANNEL


@pytest.mark.parametrize("one_run", [False, True], ids=["pages", "run"])
@pytest.mark.parametrize("method", METHODS)
def test_payload_with_more_pages_than_the_packet(method: str, one_run: bool) -> None:
    with pytest.raises(ProtocolError) as info:
        roundtrip(make_decompressor(method), first_payload(method), 2, one_run=one_run)
    assert (info.value.expected, info.value.received) == (
        2 * PAGE_SIZE,
        f"more than {2 * PAGE_SIZE}",
    )


@pytest.mark.parametrize("one_run", [False, True], ids=["pages", "run"])
@pytest.mark.parametrize("method", METHODS)
def test_truncated_payload(method: str, one_run: bool) -> None:
    with pytest.raises(ProtocolError):
        roundtrip(make_decompressor(method), first_payload(method)[:-6], 3, one_run=one_run)


@pytest.mark.parametrize("one_run", [False, True], ids=["pages", "run"])
@pytest.mark.parametrize("method", METHODS)
def test_corrupt_payload(method: str, one_run: bool) -> None:
    payload = bytearray(first_payload(method, [random.Random(1).randbytes(PAGE_SIZE)]))
    for at in range(4, len(payload), 7):
        payload[at] ^= 0x5A
    with pytest.raises(ProtocolError) as info:
        roundtrip(make_decompressor(method), bytes(payload), 1, one_run=one_run)
    assert info.value.channel == CHANNEL


def test_finished_zlib_stream_is_rejected() -> None:
    deflate = zlib.compressobj(1)
    payload = deflate.compress(TV_PAGES[0]) + deflate.flush(zlib.Z_FINISH)
    with pytest.raises(ProtocolError, match="stream ended"):
        roundtrip(make_decompressor("zlib"), payload, 1)


@pytest.mark.parametrize("method", METHODS)
def test_payload_for_a_packet_without_pages(method: str) -> None:
    decompressor = make_decompressor(method)
    decompressor.decompress_into(b"", [], channel=CHANNEL)
    with pytest.raises(ProtocolError, match="without pages"):
        decompressor.decompress_into(b"x", [], channel=CHANNEL)


@pytest.mark.parametrize("method", METHODS)
def test_payload_larger_than_the_receive_buffer(method: str) -> None:
    with pytest.raises(ProtocolError) as info:
        roundtrip(make_decompressor(method), bytes(MAX_COMPRESSED_PAYLOAD + 1), 1)
    assert info.value.received == MAX_COMPRESSED_PAYLOAD + 1


@pytest.mark.parametrize("method", METHODS)
def test_stream_is_unusable_after_an_error(method: str) -> None:
    decompressor = make_decompressor(method)
    with pytest.raises(ProtocolError):
        roundtrip(decompressor, first_payload(method), 2)
    with pytest.raises(ProtocolError, match="unusable") as info:
        roundtrip(decompressor, first_payload(method), 3)
    assert isinstance(info.value.__cause__, ProtocolError)


@pytest.mark.parametrize("method", METHODS)
def test_output_views_must_be_whole_writable_pages(method: str) -> None:
    decompressor = make_decompressor(method)
    with pytest.raises(ValueError, match="writable"):
        decompressor.decompress_into(TV7, [memoryview(bytes(PAGE_SIZE))] * 3, channel=CHANNEL)
    with pytest.raises(ValueError, match="writable"):
        decompressor.decompress_into(TV7, [memoryview(bytearray(100))] * 3, channel=CHANNEL)
    with pytest.raises(ValueError, match="writable"):  # runs are whole pages, too
        decompressor.decompress_into(TV7, [memoryview(bytearray(PAGE_SIZE + 1))], channel=CHANNEL)


@pytest.mark.parametrize("method", METHODS)
def test_parts_are_the_payload_in_pieces(method: str) -> None:
    pages = mixed_pages(random.Random(9), 12)
    whole, pieces = make_compressor(method), make_compressor(method)
    for batch in (pages, pages[:5]):  # the second packet continues both streams
        parts = pieces.compress_parts(batch)
        assert parts
        assert all(parts)  # no empty buffer for sendmsg
        assert b"".join(parts) == whole.compress(batch)


@pytest.mark.parametrize("method", METHODS)
def test_runs_of_pages_take_the_same_output_as_single_pages(method: str) -> None:
    # The receiver hands runs of contiguous pages: 1 + 3 + 2 pages here, 6 views by page.
    pages = mixed_pages(random.Random(5), 6)
    compressor = make_compressor(method)
    payloads = [compressor.compress(pages), compressor.compress(pages[::-1])]
    by_page, by_run = make_decompressor(method), make_decompressor(method)
    for payload, expected in zip(payloads, (pages, pages[::-1]), strict=True):
        singles = out_pages(6)
        by_page.decompress_into(payload, singles, channel=CHANNEL)
        runs = [memoryview(bytearray(n * PAGE_SIZE)) for n in (1, 3, 2)]
        by_run.decompress_into(payload, runs, channel=CHANNEL)
        assert [bytes(v) for v in singles] == expected
        assert b"".join(bytes(v) for v in runs) == b"".join(expected)


def test_zstd_output_chunks_may_cross_runs() -> None:
    # The stream writer hands output in chunks; a chunk ending inside a run, or spanning
    # several, must continue where the last one stopped.
    sink = zstd_module._PageSink()
    runs = [memoryview(bytearray(n * PAGE_SIZE)) for n in (2, 1, 3)]
    data = b"".join(bytes([k]) * PAGE_SIZE for k in range(6))
    sink.start(runs, 6 * PAGE_SIZE)
    cuts = [0, 5000, 5001, 3 * PAGE_SIZE + 7, 6 * PAGE_SIZE]
    for start, end in itertools.pairwise(cuts):
        assert sink.write(data[start:end]) == end - start
    assert sink.finish() == 6 * PAGE_SIZE
    assert b"".join(bytes(v) for v in runs) == data


# --- decompression bombs -----------------------------------------------------------------


def zstd_rle_bomb(blocks: int) -> bytes:
    """A zstd frame of RLE blocks: 4 bytes of input per 128 KiB of output."""
    block_size = 128 << 10
    rle_header = (block_size << 3) | (1 << 1)  # Block_Size, Block_Type = RLE, not last
    body = (rle_header.to_bytes(3, "little") + b"\xaa") * blocks
    return bytes.fromhex("28b52ffd0048") + body


@pytest.mark.parametrize(
    ("method", "bomb", "claimed"),
    [
        ("zstd", lambda: zstd_rle_bomb(65536), 8 << 30),
        ("zlib", lambda: zlib.compress(bytes(64 << 20), 9)[:-4], 64 << 20),
    ],
)
@pytest.mark.parametrize("pages", [1, 3])
def test_decompression_bomb_is_stopped_with_bounded_memory(
    method: str, bomb: object, claimed: int, pages: int
) -> None:
    assert callable(bomb)
    payload = bomb()
    assert len(payload) <= MAX_COMPRESSED_PAYLOAD
    decompressor = make_decompressor(method)
    out = out_pages(pages)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="packet size"):
            decompressor.decompress_into(payload, out, channel=CHANNEL)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The payload asks for `claimed` bytes; the decoder never held more than a few MiB.
    assert peak < 8 << 20 < claimed


def zstd_rle_frame(window_log: int, blocks: int) -> bytes:
    """A zstd frame that asks for a 2**window_log window, then ``blocks`` RLE blocks of 128
    KiB; no content size, as in a multifd stream."""
    descriptor = (window_log - 10) << 3  # Window_Descriptor: exponent, no mantissa
    header = bytes.fromhex("28b52ffd00") + bytes((descriptor,))
    return header + (((128 << 10) << 3 | 1 << 1).to_bytes(3, "little") + b"\x5a") * blocks


def test_zstd_frame_asking_for_a_larger_window_than_qemu_uses_is_refused() -> None:
    # Level 20, QEMU's highest multifd-zstd-level, asks for 2**25 bytes: one more power is
    # refused before anything is decoded, where libzstd alone would allow up to 2**27.
    level20 = make_compressor("zstd", 20).compress([bytes(PAGE_SIZE)])
    assert zstandard.get_frame_parameters(level20).window_size == 1 << zstd_module.MAX_WINDOW_LOG
    pages = out_pages(PAGES_PER_PACKET)
    make_decompressor("zstd").decompress_into(zstd_rle_frame(25, 4), pages, channel=CHANNEL)
    assert all(page.tobytes() == b"\x5a" * PAGE_SIZE for page in pages)
    with pytest.raises(ProtocolError) as info:
        make_decompressor("zstd").decompress_into(zstd_rle_frame(26, 4), pages, channel=CHANNEL)
    assert info.value.channel == CHANNEL
    assert "a zstd stream" in str(info.value)
    assert "memory" in str(info.value).lower()  # libzstd: the frame needs too much memory


def test_zstd_bomb_sanity_the_frame_really_inflates() -> None:
    reader = zstandard.ZstdDecompressor().decompressobj()
    assert len(reader.decompress(zstd_rle_bomb(4))) == 4 * (128 << 10)


@pytest.mark.parametrize(("method", "level"), [("zstd", 0), ("zstd", 1), ("zstd", 3), ("zlib", 0),
                                               ("zlib", 1), ("zlib", 9)])  # fmt: skip
def test_runs_of_pages_compress_to_the_bytes_of_page_by_page(method: str, level: int) -> None:
    """The engine hands whole runs; the payload must stay what QEMU makes from single pages."""
    rng = random.Random(level)
    pages = [rng.randbytes(PAGE_SIZE) if i % 3 else bytes([i]) * PAGE_SIZE for i in range(40)]
    by_page = compression.compressor(method, level)
    by_run = compression.compressor(method, level)
    assert by_page is not None
    assert by_run is not None
    for _ in range(2):  # the second packet continues both streams
        runs = [b"".join(pages[:17]), b"".join(pages[17:18]), b"".join(pages[18:])]
        assert by_run.compress(runs) == by_page.compress(pages)


@pytest.mark.skipif(not zstd_module.LIBZSTD_AVAILABLE, reason="needs zstandard's cffi backend")
@pytest.mark.parametrize("level", [0, 1, 5, 19])
def test_zstd_payloads_are_the_same_with_libzstd_and_zstandard(
    level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender calls libzstd once per buffer into a buffer it reuses; zstandard's object
    is the fallback. Same stream, same bytes, whatever the buffers and however long."""
    rng = random.Random(level)
    made = []
    for direct in (True, False):
        monkeypatch.setattr(zstd_module, "use_libzstd", direct)
        made.append(make_compressor("zstd", level))
    direct_compressor, fallback = made
    for count in (1, 7, PAGES_PER_PACKET, 3):  # several packets: one stream continued
        pages = mixed_pages(rng, count)
        cut = rng.randrange(1, count + 1)
        buffers = [b"".join(pages[:cut]), b"".join(pages[cut:])] if cut < count else pages
        parts = direct_compressor.compress_parts(buffers)
        assert len(parts) == 1  # one piece: the reused buffer
        assert bytes(parts[0]) == fallback.compress(buffers)


@pytest.mark.parametrize("method", METHODS)
def test_more_pages_than_a_packet_compress_and_decode(method: str) -> None:
    """A sender never gives more than 128 pages; other callers may: no fixed-size buffer
    may make that fail (random pages: libzstd's output is as large as its input)."""
    rng = random.Random(21)
    pages = [rng.randbytes(PAGE_SIZE) for _ in range(PAGES_PER_PACKET + 72)]
    compressor = make_compressor(method)
    decoder = (
        zstandard.ZstdDecompressor().decompressobj() if method == "zstd" else zlib.decompressobj()
    )
    for batch in (pages, pages[:3]):  # the second payload continues the stream
        payload = compressor.compress([b"".join(batch)])
        assert decoder.decompress(payload) == b"".join(batch)
