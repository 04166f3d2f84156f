"""RAM blocks: named, page-aligned regions of memory that a migration moves.

A :class:`RamBlock` wraps a writable buffer (a ``bytearray``, an anonymous ``mmap`` or a
file mapped with ``mmap``) and exposes it as a ``memoryview`` for zero-copy socket I/O and
as a numpy array for whole-block scans. :class:`Ram` is the ordered set of blocks of one
migration, looked up by name as QEMU looks up a RAMBlock by its idstr.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from multifd.errors import ConfigError
from multifd.wire.constants import PAGE_SIZE, RAMBLOCK_NAME_SIZE

_WORDS_PER_PAGE: Final = PAGE_SIZE // 8
# Pre-faulting writes one byte per page through numpy in slices of this many pages, so a
# huge block never needs a temporary of its own size.
_PREFAULT_PAGES: Final = 1 << 16


class RamBlock:
    """One named RAM region (QEMU's RAMBlock) over a writable buffer.

    The buffer's length is the block's ``used_length`` and must be a multiple of the page
    size. The block does not copy the buffer: writes through :attr:`view` land in it.
    """

    def __init__(self, name: str, buffer: bytearray | mmap.mmap, *, owner: object = None) -> None:
        raw = name.encode()
        if not raw or len(raw) >= RAMBLOCK_NAME_SIZE or len(raw) > 255:
            raise ConfigError(f"block name must be 1..255 bytes, got {name!r}")
        if len(buffer) == 0 or len(buffer) % PAGE_SIZE:
            raise ConfigError(
                f"block {name!r}: size {len(buffer)} is not a positive multiple of {PAGE_SIZE}"
            )
        self.name: Final = name
        self.size: Final = len(buffer)
        self._buffer = buffer
        self._owner = owner  # keeps a file object alive as long as its mapping
        self.view: Final = memoryview(buffer)
        self.pages: Final = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, PAGE_SIZE)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def anonymous(cls, name: str, size: int) -> RamBlock:
        """A zero-filled block in anonymous shared memory (``mmap(-1, size)``)."""
        _check_size(name, size)
        return cls(name, mmap.mmap(-1, size))

    @classmethod
    def from_bytes(cls, name: str, data: bytes | bytearray) -> RamBlock:
        """A block holding a copy of ``data`` in a ``bytearray``."""
        return cls(name, bytearray(data))

    @classmethod
    def from_file(cls, name: str, path: str | os.PathLike[str], *, size: int | None = None,
                  create: bool = False) -> RamBlock:
        """A block mapped from a file, shared with it (writes land in the file).

        With ``create`` the file is created or truncated to ``size`` bytes first.
        """
        path = Path(path)
        if create:
            if size is None:
                raise ConfigError(f"block {name!r}: a size is needed to create {path}")
            _check_size(name, size)
            with path.open("wb") as f:
                f.truncate(size)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise ConfigError(f"block {name!r}: cannot open {path}: {exc.strerror}") from exc
        try:
            actual = os.fstat(fd).st_size
            if size is not None and actual != size:
                raise ConfigError(f"block {name!r}: {path} has {actual} bytes, expected {size}")
            _check_size(name, actual)
            mapping = mmap.mmap(fd, actual, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        return cls(name, mapping)

    # -- access ------------------------------------------------------------------------------
    def page_view(self, offset: int, count: int = 1) -> memoryview:
        return self.view[offset : offset + count * PAGE_SIZE]

    @property
    def page_count(self) -> int:
        return self.size // PAGE_SIZE

    def zero_page_mask(self, first: int = 0, count: int | None = None) -> npt.NDArray[np.bool_]:
        """A boolean per page in ``[first, first + count)``: True where the page is all zero."""
        stop = self.page_count if count is None else first + count
        words = np.frombuffer(self._buffer, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
        return ~words[first:stop].any(axis=1)

    def prefault(self) -> None:
        """Touch every page once for writing, so pages arrive into memory that is mapped.

        First touch of fresh anonymous or file memory costs a page fault and a zeroing; paid
        during a migration, it shows as several times slower page writes.
        """
        if isinstance(self._buffer, mmap.mmap) and hasattr(mmap, "MADV_POPULATE_WRITE"):
            try:
                self._buffer.madvise(mmap.MADV_POPULATE_WRITE)
            except OSError:
                pass
            else:
                return
        column = self.pages[:, 0]
        for start in range(0, self.page_count, _PREFAULT_PAGES):
            chunk = column[start : start + _PREFAULT_PAGES]
            chunk |= 0  # a read-modify-write: faults the page in for writing, keeps content

    def flush(self) -> None:
        """Write a file-backed block's dirty pages back to its file."""
        if isinstance(self._buffer, mmap.mmap):
            self._buffer.flush()

    def close(self) -> None:
        """Release the buffer; the block must not be used afterwards."""
        self.view.release()
        del self.pages
        if isinstance(self._buffer, mmap.mmap):
            self._buffer.close()

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, size={self.size:#x})"


def _check_size(name: str, size: int) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise ConfigError(f"block {name!r}: size {size} is not a positive multiple of {PAGE_SIZE}")


class Ram:
    """The ordered, named blocks of one migration (QEMU's RAMBlock list)."""

    def __init__(self, blocks: list[RamBlock] | tuple[RamBlock, ...] = ()) -> None:
        self._blocks: dict[str, RamBlock] = {}
        for block in blocks:
            self.add(block)

    def add(self, block: RamBlock) -> None:
        if block.name in self._blocks:
            raise ConfigError(f"duplicate block name {block.name!r}")
        self._blocks[block.name] = block

    def get(self, name: str) -> RamBlock | None:
        return self._blocks.get(name)

    def __getitem__(self, name: str) -> RamBlock:
        return self._blocks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._blocks

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(list(self._blocks.values()))

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def total_size(self) -> int:
        return sum(block.size for block in self._blocks.values())

    def close(self) -> None:
        for block in self._blocks.values():
            block.close()
