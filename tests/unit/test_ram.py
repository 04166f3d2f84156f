"""RAM blocks: construction, validation, page access, zero-page scan, pre-faulting, Ram."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from multifd import ram as ram_module
from multifd.errors import ConfigError
from multifd.ram import Ram, RamBlock, zero_pages
from multifd.wire.constants import PAGE_SIZE

PAGE = 4096


def _random_pages(seed: int, count: int, zero_every: int = 3) -> bytes:
    """Random pages where every ``zero_every``-th page is zero, plus nearly-zero pages."""
    rng = np.random.default_rng(seed)
    pages = rng.integers(0, 256, size=(count, PAGE), dtype=np.uint8)
    pages[::zero_every] = 0
    # Pages that are zero except for one byte at an edge or in a middle word must count as
    # non-zero: they catch a scan that skips the first or last word of a page.
    for index, at in ((1, 0), (2, PAGE - 1), (4, 2051)):
        if index < count:
            pages[index] = 0
            pages[index, at] = 0x80
    return pages.tobytes()


def _reference_zero_mask(data: bytes) -> list[bool]:
    return [not any(data[i : i + PAGE]) for i in range(0, len(data), PAGE)]


def _mask(values: npt.NDArray[np.bool_]) -> list[bool]:
    return [bool(v) for v in values]


# -- construction ----------------------------------------------------------------------------
def test_anonymous_block_is_zero_filled_and_shared_by_its_views() -> None:
    block = RamBlock.anonymous("pc.ram", 4 * PAGE)
    assert (block.name, block.size, block.page_count) == ("pc.ram", 4 * PAGE, 4)
    assert block.pages.shape == (4, PAGE)
    assert block.pages.dtype == np.uint8
    assert not block.pages.any()
    block.view[PAGE + 5] = 7
    assert block.pages[1, 5] == 7
    assert repr(block) == "RamBlock('pc.ram', size=0x4000)"
    block.close()


def test_from_bytes_copies_the_data() -> None:
    data = bytearray(_random_pages(1, 3))
    block = RamBlock.from_bytes("b", data)
    data[0] ^= 0xFF
    assert block.view.tobytes() != bytes(data)
    data[0] ^= 0xFF
    assert block.view.tobytes() == bytes(data)
    block.close()


def test_from_existing_file_maps_it_shared(tmp_path: Path) -> None:
    path = tmp_path / "mem.img"
    data = _random_pages(2, 4)
    path.write_bytes(data)
    block = RamBlock.from_file("f", path)
    assert block.view.tobytes() == data
    block.page_view(2 * PAGE)[:3] = b"abc"
    block.flush()
    assert path.read_bytes()[2 * PAGE : 2 * PAGE + 3] == b"abc"
    block.close()


def test_from_file_create_makes_a_zero_file_of_the_size(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    block = RamBlock.from_file("f", path, size=8 * PAGE, create=True)
    assert path.stat().st_size == 8 * PAGE
    assert not block.pages.any()
    block.close()


def test_from_file_create_truncates_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "old.img"
    path.write_bytes(b"\xff" * 3 * PAGE)
    block = RamBlock.from_file("f", path, 2 * PAGE, True)  # positional size and create
    assert block.size == 2 * PAGE
    assert not block.pages.any()
    block.close()


def test_from_file_size_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "mem.img"
    path.write_bytes(bytes(2 * PAGE))
    with pytest.raises(ConfigError, match=f"has {2 * PAGE} bytes, expected {4 * PAGE}"):
        RamBlock.from_file("f", path, size=4 * PAGE)


@pytest.mark.parametrize("length", [0, 100, PAGE + 1])
def test_from_file_with_a_bad_file_size(tmp_path: Path, length: int) -> None:
    path = tmp_path / "mem.img"
    path.write_bytes(bytes(length))
    with pytest.raises(ConfigError, match="not a positive multiple of 4096"):
        RamBlock.from_file("f", path)


def test_from_file_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        RamBlock.from_file("f", tmp_path / "missing.img")
    with pytest.raises(ConfigError, match="a size is needed"):
        RamBlock.from_file("f", tmp_path / "new.img", create=True)
    with pytest.raises(ConfigError, match="cannot create"):
        RamBlock.from_file("f", tmp_path / "no-dir" / "new.img", size=PAGE, create=True)
    with pytest.raises(ConfigError, match="block name"):
        RamBlock.from_file("", tmp_path / "new.img", size=PAGE, create=True)
    assert not (tmp_path / "new.img").exists()  # a bad name creates no file


@pytest.mark.parametrize("size", [0, -PAGE, 1, PAGE - 1, PAGE + 1, 3 * PAGE // 2])
def test_bad_sizes(size: int) -> None:
    with pytest.raises(ConfigError, match="not a positive multiple of 4096"):
        RamBlock.anonymous("a", size)
    if size > 0:
        with pytest.raises(ConfigError, match="not a positive multiple of 4096"):
            RamBlock.from_bytes("b", bytes(size))


@pytest.mark.parametrize("name", ["", "x" * 256, "é" * 128, "a\0b", "\ud800"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ConfigError, match="block name"):
        RamBlock.anonymous(name, PAGE)
    with pytest.raises(ConfigError, match="block name"):
        RamBlock(name, bytearray(PAGE))


def test_longest_name_is_accepted() -> None:
    block = RamBlock.from_bytes("n" * 255, bytes(PAGE))
    assert block.name == "n" * 255
    block.close()


# -- page access -----------------------------------------------------------------------------
def test_page_view_is_a_writable_window() -> None:
    data = _random_pages(3, 4)
    block = RamBlock.from_bytes("b", data)
    view = block.page_view(PAGE, 2)
    assert view.tobytes() == data[PAGE : 3 * PAGE]
    view[0] = data[PAGE] ^ 1
    assert block.pages[1, 0] == data[PAGE] ^ 1
    assert block.page_view(3 * PAGE).nbytes == PAGE
    assert block.page_view(4 * PAGE, 0).nbytes == 0
    block.close()


@pytest.mark.parametrize(("offset", "count"), [(1, 1), (-PAGE, 1), (3 * PAGE, 2), (0, 5), (0, -1)])
def test_page_view_outside_or_unaligned(offset: int, count: int) -> None:
    block = RamBlock.anonymous("b", 4 * PAGE)
    with pytest.raises(ConfigError, match="not inside"):
        block.page_view(offset, count)
    block.close()


# -- zero pages ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_page_mask_matches_a_reference_loop(seed: int) -> None:
    data = _random_pages(seed, 37, zero_every=seed + 2)
    block = RamBlock.from_bytes("b", data)
    expected = _reference_zero_mask(data)
    assert any(expected)
    assert not all(expected)
    assert _mask(block.zero_page_mask()) == expected
    rng = np.random.default_rng(seed)
    for _ in range(20):
        first = int(rng.integers(0, 38))
        count = int(rng.integers(0, 38 - first))
        got = block.zero_page_mask(first, count)
        assert _mask(got) == expected[first : first + count]
    block.close()


def test_zero_page_mask_sees_writes_to_a_mapping() -> None:
    block = RamBlock.anonymous("a", 3 * PAGE)
    assert _mask(block.zero_page_mask()) == [True, True, True]
    block.view[2 * PAGE - 1] = 1
    assert _mask(block.zero_page_mask()) == [True, False, True]
    block.close()


@pytest.mark.parametrize(("first", "count"), [(-1, 1), (0, 5), (4, 1), (2, -3)])
def test_zero_page_mask_outside_the_block(first: int, count: int) -> None:
    block = RamBlock.anonymous("a", 4 * PAGE)
    with pytest.raises(ConfigError, match="not inside"):
        block.zero_page_mask(first, count)
    block.close()


# -- prefault, flush, close ------------------------------------------------------------------
@pytest.mark.parametrize("madvise", [True, False])
@pytest.mark.parametrize("kind", ["anonymous", "bytes", "file"])
def test_prefault_keeps_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, madvise: bool
) -> None:
    if not madvise:
        monkeypatch.setattr(ram_module, "_MADV_POPULATE_WRITE", None)
    data = _random_pages(5, 9)
    if kind == "anonymous":
        block = RamBlock.anonymous("a", len(data))
        block.view[:] = data
    elif kind == "bytes":
        block = RamBlock.from_bytes("b", data)
    else:
        path = tmp_path / "mem.img"
        path.write_bytes(data)
        block = RamBlock.from_file("f", path)
    block.prefault()
    assert block.view.tobytes() == data
    block.close()
    if kind == "file":
        assert (tmp_path / "mem.img").read_bytes() == data


def test_prefault_of_a_fresh_block_leaves_it_zero() -> None:
    block = RamBlock.anonymous("a", 64 * PAGE)
    block.prefault()
    assert not block.pages.any()
    block.close()


def test_close_is_idempotent_and_releases_the_mapping() -> None:
    buffer = mmap.mmap(-1, PAGE)
    block = RamBlock("a", buffer)
    block.close()
    block.close()
    assert buffer.closed


def test_close_with_a_view_still_held_elsewhere_does_not_raise() -> None:
    block = RamBlock.anonymous("a", 2 * PAGE)
    kept = block.page_view(PAGE)
    block.close()
    kept[0] = 1  # the mapping stays valid while someone holds a view of it
    assert kept[0] == 1
    kept.release()


# -- Ram -------------------------------------------------------------------------------------
def test_ram_keeps_blocks_in_order_by_name() -> None:
    first = RamBlock.anonymous("pc.ram", 4 * PAGE)
    second = RamBlock.from_bytes("vga.vram", bytes(2 * PAGE))
    ram = Ram([first])
    ram.add(second)
    assert [block.name for block in ram] == ["pc.ram", "vga.vram"]
    assert ram["vga.vram"] is second
    assert ram.get("pc.ram") is first
    assert ram.get("nope") is None
    assert "pc.ram" in ram
    assert "nope" not in ram
    assert len(ram) == 2
    assert ram.total_size == 6 * PAGE
    with pytest.raises(KeyError):
        ram["nope"]
    ram.close()


def test_ram_refuses_duplicate_names() -> None:
    one = RamBlock.anonymous("pc.ram", PAGE)
    two = RamBlock.anonymous("pc.ram", 2 * PAGE)
    with pytest.raises(ConfigError, match=r"duplicate block name 'pc\.ram'"):
        Ram([one, two])
    ram = Ram([one])
    with pytest.raises(ConfigError, match="duplicate"):
        ram.add(two)
    assert ram["pc.ram"] is one
    assert len(ram) == 1
    ram.close()
    two.close()


def test_ram_close_closes_every_block() -> None:
    buffers = [mmap.mmap(-1, PAGE), mmap.mmap(-1, PAGE)]
    ram = Ram(RamBlock(f"b{i}", buf) for i, buf in enumerate(buffers))
    ram.close()
    assert all(buf.closed for buf in buffers)


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.09, 0.11, 0.5, 1.0])
def test_zero_pages_agrees_with_a_page_by_page_check(fraction: float) -> None:
    """Both scan strategies (gather the candidates, or scan in place) find exactly the zeros."""
    rng = np.random.default_rng(int(fraction * 100))
    block = RamBlock.from_bytes("mem", rng.bytes(400 * PAGE_SIZE))
    chosen = rng.random(block.page_count) < fraction
    block.pages[chosen] = 0
    block.pages[~chosen, : rng.integers(0, PAGE_SIZE)] = 0  # non-zero late in the page
    block.pages[~chosen, PAGE_SIZE - 1] = 1
    expected = [not block.pages[i].any() for i in range(block.page_count)]
    assert zero_pages(block.words).tolist() == expected
    block.close()


class TestKnownZero:
    """write_zero() skips only pages that nothing wrote since assume_zeroed()."""

    def _block(self) -> RamBlock:
        block = RamBlock.from_bytes("ram", bytes(8 * PAGE_SIZE))
        block.assume_zeroed()
        return block

    def test_page_written_with_data_is_zeroed_again(self) -> None:
        block = self._block()
        block.view[PAGE_SIZE : 3 * PAGE_SIZE] = b"\x07" * (2 * PAGE_SIZE)
        block.written(slice(1, 3))
        block.write_zero(np.array([2], dtype=np.int64))
        assert block.view[PAGE_SIZE : 2 * PAGE_SIZE] == b"\x07" * PAGE_SIZE
        assert block.view[2 * PAGE_SIZE : 3 * PAGE_SIZE] == bytes(PAGE_SIZE)
        assert block.known_zero is not None
        assert block.known_zero.tolist() == [True, False] + [True] * 6

    def test_known_zero_page_is_not_written(self) -> None:
        # The contract: a write that bypasses written() is invisible, so the skip shows.
        block = self._block()
        block.view[0:PAGE_SIZE] = b"\x01" * PAGE_SIZE
        block.write_zero(slice(0, 4))
        assert block.view[0:PAGE_SIZE] == b"\x01" * PAGE_SIZE

    def test_untracked_block_always_writes(self) -> None:
        block = RamBlock.from_bytes("ram", b"\x05" * (4 * PAGE_SIZE))
        assert block.known_zero is None
        block.write_zero(slice(1, 2))
        block.write_zero(np.array([2], dtype=np.int64))
        block.write_zero_page(3)
        assert block.pages[:, 0].tolist() == [5, 0, 0, 0]

    def test_one_page_at_a_time(self) -> None:
        block = self._block()
        block.view[0:PAGE_SIZE] = b"\x02" * PAGE_SIZE
        block.write_zero_page(0)  # known zero: skipped
        assert block.pages[0, 0] == 2
        block.written(slice(0, 1))
        block.write_zero_page(0)
        assert block.pages[0, 0] == 0


def test_read_ahead_maps_queued_ranges_in_order_and_skips_closed_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mapped: list[tuple[str, int, int]] = []

    def populate(block: RamBlock, first: int, count: int) -> None:
        mapped.append((block.name, first, count))

    monkeypatch.setattr(RamBlock, "populate", populate)
    open_block = RamBlock.anonymous("a", 8 * PAGE_SIZE)
    closed_block = RamBlock.anonymous("b", 8 * PAGE_SIZE)
    closed_block.close()
    reader = ram_module.ReadAhead(name="test-read-ahead")
    reader.ahead(open_block, 0, 4)
    reader.ahead(closed_block, 0, 8)
    reader.ahead(open_block, 4, 4)
    reader.close()  # maps what is queued, then joins
    assert mapped == [("a", 0, 4), ("a", 4, 4)]
    reader.close()  # idempotent
    open_block.close()


def _mapped_bytes(block: RamBlock) -> int:
    """Resident bytes of ``block``'s mapping in this process (its VMA's ``Rss``)."""
    start = f"{block.pages.ctypes.data:x}-"
    lines = iter(Path("/proc/self/smaps").read_text().splitlines())
    for line in lines:
        if line.startswith(start):
            for field in lines:
                if field.startswith("Rss:"):
                    return int(field.split()[1]) * 1024
    raise AssertionError("the block's mapping is not in /proc/self/smaps")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_populate_maps_the_range_without_changing_it(tmp_path: Path) -> None:
    pages = 1024
    path = tmp_path / "ram.img"
    content = np.random.default_rng(5).integers(0, 256, pages * PAGE_SIZE, dtype=np.uint8)
    path.write_bytes(content.tobytes())  # in the page cache now, mapped by nobody
    block = RamBlock.from_file("f", path)
    try:
        assert _mapped_bytes(block) == 0
        block.populate(256, 512)
        mapped = _mapped_bytes(block)
        # One read every _TOUCH_PAGES pages maps at least those pages (fault-around more).
        assert mapped >= 512 // ram_module._TOUCH_PAGES * PAGE_SIZE
        assert bytes(block.view) == content.tobytes()
    finally:
        block.close()
    block.populate(0, pages)  # closed meanwhile: a no-op, no error
