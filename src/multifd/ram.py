"""RAM blocks: named, page-aligned regions of memory that a migration moves.

A :class:`RamBlock` wraps a writable buffer (a ``bytearray``, an anonymous ``mmap`` or a
file mapped with ``mmap``) and exposes it as a ``memoryview`` for zero-copy socket I/O and
as a numpy array for whole-block scans. :class:`Ram` is the ordered set of blocks of one
migration, looked up by name as QEMU looks up a RAMBlock by its idstr.
"""

from __future__ import annotations

import mmap
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
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
# RamBlock.populate() reads one word per this many pages: two reads per 64 KiB fault-around
# window, so a 32 MiB chunk is 1024 reads, past the 500 under which numpy keeps the GIL.
_TOUCH_PAGES: Final = 8
# madvise(MADV_POPULATE_WRITE) (Linux 5.14+) pre-faults a whole mapping in one call; Python
# 3.11's mmap module lacks the constant, so use the Linux value there.
_MADV_POPULATE_WRITE: Final = getattr(
    mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None
)


def zero_pages(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """True for each row of ``words`` (one page of 64-bit words) that is all zero.

    Most non-zero pages have a non-zero first word, so only pages whose first word is zero
    are scanned in full: on random data this reads one cache line per page instead of 64,
    the shortcut QEMU's ``buffer_is_zero()`` takes by stopping at the first non-zero byte.
    """
    zero: npt.NDArray[np.bool_] = words[:, 0] == 0
    candidates = np.flatnonzero(zero)
    if not candidates.size:
        return zero
    # Gathering the candidates copies them; past about a tenth of the pages, scanning every
    # page in place is cheaper (1 GiB: 42 ms either way at 10 %, 94 vs 38 ms at 25 %).
    # Either way, OR-reducing the words is 1.5x faster than .any().
    if candidates.size * 10 > len(words):
        reduced: npt.NDArray[np.bool_] = np.bitwise_or.reduce(words, axis=1) == 0
        return reduced
    zero[candidates] = np.bitwise_or.reduce(words[candidates], axis=1) == 0
    return zero


class RamBlock:
    """One named RAM region (QEMU's RAMBlock) over a writable buffer.

    The buffer's length is the block's ``used_length`` and must be a multiple of the page
    size. The block does not copy the buffer: writes through :attr:`view` land in it.
    """

    def __init__(self, name: str, buffer: bytearray | mmap.mmap, *, owner: object = None) -> None:
        _check_name(name)
        if len(buffer) == 0 or len(buffer) % PAGE_SIZE:
            raise ConfigError(
                f"block {name!r}: size {len(buffer)} is not a positive multiple of {PAGE_SIZE}"
            )
        self.name: Final = name
        self.size: Final = len(buffer)
        self._buffer = buffer
        self._owner = owner  # keeps a file object alive as long as its mapping
        self._closed = False
        self.view: Final = memoryview(buffer)
        self.pages: Final = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        self.words: Final = np.frombuffer(buffer, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
        # One flag per page, True while the page is known to hold only zeros (None: unknown
        # for every page). Kept only where every write goes through write_zero() and
        # written() -- a destination's RAM -- by the one thread that writes the page.
        self.known_zero: npt.NDArray[np.bool_] | None = None
        # One flag per page, True once a write of the page landed since take_changes()
        # (None: not tracked). Each writer sets its pages' flags after their bytes are in
        # (landed(), written_page(), write_zero*()), so a take may run beside the writers.
        # _changes_lock guards the flags and _pending, how many of them are set: a relay
        # asks after every packet, and counting a large block's flags took 150 us (16 GiB).
        self._changed: npt.NDArray[np.bool_] | None = None
        self._pending = 0
        self._changes_lock = threading.Lock()

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
    def from_file(
        cls,
        name: str,
        path: str | os.PathLike[str],
        size: int | None = None,
        create: bool = False,
    ) -> RamBlock:
        """A block mapped from a file, shared with it (writes land in the file).

        With ``create`` the file is created or truncated to ``size`` bytes first; without
        it, the file must exist and, if ``size`` is given, have exactly that size.

        Raises:
            ConfigError: bad name or size, size mismatch, or the file cannot be opened.
        """
        _check_name(name)
        path = Path(path)
        if create:
            if size is None:
                raise ConfigError(f"block {name!r}: a size is needed to create {path}")
            _check_size(name, size)
            try:
                with path.open("wb") as f:
                    f.truncate(size)
                    # Reserve the space now: a full file system must fail here, not as a
                    # SIGBUS on some page write in the middle of a migration.
                    os.posix_fallocate(f.fileno(), 0, size)
            except OSError as exc:
                raise ConfigError(f"block {name!r}: cannot create {path}: {exc.strerror}") from exc
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
        """A writable view of ``count`` pages starting at byte ``offset`` (page aligned).

        Raises:
            ConfigError: the range is unaligned or leaves the block (a short view would
                let a receive silently desynchronise a stream).
        """
        end = offset + count * PAGE_SIZE
        if 0 <= offset <= end <= self.size and not offset % PAGE_SIZE:
            return self.view[offset:end]
        raise ConfigError(
            f"block {self.name!r}: {count} pages at {offset:#x} are not inside its "
            f"{self.size:#x} bytes or not page aligned"
        )

    @property
    def page_count(self) -> int:
        return self.size // PAGE_SIZE

    def zero_page_mask(self, first: int = 0, count: int | None = None) -> npt.NDArray[np.bool_]:
        """A boolean per page in ``[first, first + count)``: True where the page is all zero."""
        stop = self.page_count if count is None else first + count
        if not 0 <= first <= stop <= self.page_count:
            raise ConfigError(
                f"block {self.name!r}: pages [{first}, {stop}) are not inside its "
                f"{self.page_count} pages"
            )
        return zero_pages(self.words[first:stop])

    def assume_zeroed(self) -> None:
        """Start tracking which pages hold only zeros, from a block that is all zero now.

        A destination allocates its blocks zero-filled; a zero page announced for a page
        that nothing wrote since then needs no write (QEMU keeps a receive bitmap for the
        same reason). Every later write must then go through :meth:`written` or
        :meth:`write_zero`.
        """
        self.known_zero = np.ones(self.page_count, dtype=np.bool_)

    def written(self, pages: slice | npt.NDArray[np.int64]) -> None:
        """Note that ``pages`` (page numbers) were written with data."""
        if self.known_zero is not None:
            self.known_zero[pages] = False

    def landed(self, pages: slice | npt.NDArray[np.int64]) -> None:
        """Note that the data announced by :meth:`written` for ``pages`` is now in place."""
        self._note_changed(pages)

    def written_page(self, page: int) -> None:
        """One page's data was written (the main channel's PAGE records come one by one):
        :meth:`written` and :meth:`landed` together, called after the write."""
        if self.known_zero is not None:
            self.known_zero[page] = False
        self._note_changed(page)

    def write_zero_page(self, page: int) -> None:
        """:meth:`write_zero` for one page: the main channel's ZERO records come one by one."""
        known = self.known_zero
        if known is None:
            self.pages[page] = 0
        elif not known[page]:
            self.pages[page] = 0
            known[page] = True
        self._note_changed(page)

    def write_zero(self, pages: slice | npt.NDArray[np.int64]) -> None:
        """Make ``pages`` (page numbers) all zero, writing only those that may not be."""
        self._zero(pages)
        self._note_changed(pages)  # even if already zero: the peer may not know it

    def _zero(self, pages: slice | npt.NDArray[np.int64]) -> None:
        known = self.known_zero
        if known is None:
            self.pages[pages] = 0
            return
        already = known[pages]
        if already.all():
            return
        if isinstance(pages, slice):
            pages = np.arange(*pages.indices(self.page_count))  # this slice only, not the block
        todo = pages[~already]
        self.pages[todo] = 0
        known[todo] = True

    def track_changes(self) -> None:
        """Start noting every page written through :meth:`landed`, :meth:`written_page`,
        :meth:`write_zero` or :meth:`write_zero_page`, zero pages that were zero included.

        A relay forwards what its incoming side wrote; a zero page must be forwarded too,
        since the far side's copy of the page may hold anything (a firmware image, say).
        """
        if self._changed is None:
            self._changed = np.zeros(self.page_count, dtype=np.bool_)

    def pending_changes(self) -> int:
        """How many pages were written since the last :meth:`take_changes` (0 untracked)."""
        return self._pending

    def _note_changed(self, pages: int | slice | npt.NDArray[np.int64]) -> None:
        """Set the flags of ``pages`` (a no-op untracked), counting those not set yet."""
        changed = self._changed
        if changed is None:
            return
        with self._changes_lock:
            if isinstance(pages, slice):
                fresh = len(range(*pages.indices(len(changed)))) - int(
                    np.count_nonzero(changed[pages])
                )
            elif isinstance(pages, np.ndarray):  # a page listed twice counts once
                fresh = len(np.unique(pages[~changed[pages]]))
            else:
                fresh = 0 if changed[pages] else 1
            changed[pages] = True
            self._pending += fresh

    def take_changes(self) -> npt.NDArray[np.int64]:
        """The pages (ascending numbers) written since the last take; clears the record.

        Writers may run meanwhile: a page's flag is set after its bytes landed, so a page
        taken is read after its last counted write, and a write landing later sets its
        flag again for the next take.

        Raises:
            ConfigError: :meth:`track_changes` was not called.
        """
        changed = self._changed
        if changed is None:
            raise ConfigError(f"block {self.name!r}: changes are not tracked")
        with self._changes_lock:
            pages = np.flatnonzero(changed).astype(np.int64)
            changed[pages] = False
            self._pending = 0
        return pages

    def populate(self, first: int, count: int) -> None:
        """Map pages ``[first, first + count)`` for reading ahead of use, without the GIL.

        A source reads each page once; faulting a range in ahead, outside the interpreter
        lock, keeps those faults off the threads that send. One word is read every
        :data:`_TOUCH_PAGES` pages: each read fault also maps the neighbouring pages that
        are in the page cache (the kernel's fault-around, 64 KiB by default). For 1 GiB of
        shared file memory that took 0.05 CPU-s, where ``MADV_POPULATE_READ``'s page by
        page walk took 0.07-0.10. numpy leaves the GIL for the strided read. Best effort:
        a page still unmapped faults on use.
        """
        if not isinstance(self._buffer, mmap.mmap):
            return
        try:
            words = self.words
        except AttributeError:  # closed meanwhile: nothing left to map
            return
        np.bitwise_or.reduce(words[first : first + count : _TOUCH_PAGES, 0])

    def prefault(self) -> None:
        """Touch every page once for writing, so pages arrive into memory that is mapped.

        First touch of fresh anonymous or file memory costs a page fault and a zeroing; paid
        during a migration, it shows as several times slower page writes.
        """
        if isinstance(self._buffer, mmap.mmap) and _MADV_POPULATE_WRITE is not None:
            try:
                self._buffer.madvise(_MADV_POPULATE_WRITE)
            except OSError:
                pass  # kernel older than 5.14 (EINVAL): fall back to touching each page
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

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the buffer; the block must not be used afterwards. Idempotent.

        A mapping that other code still exports (a page view or numpy slice kept
        elsewhere) cannot be unmapped now; it is left to be unmapped when the last of
        those is dropped, rather than failing a shutdown path with ``BufferError``.
        """
        if self._closed:
            return
        self._closed = True
        del self.pages, self.words
        try:
            self.view.release()
            if isinstance(self._buffer, mmap.mmap):
                self._buffer.close()
        except BufferError:
            pass

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, size={self.size:#x})"


def _check_name(name: str) -> None:
    # The main stream writes the name after a one-byte length; multifd packets carry it in
    # char ramblock[256] with a terminating NUL; both sides compare it as a C string.
    try:
        raw = name.encode()
    except UnicodeEncodeError as exc:
        raise ConfigError(f"block name {name!r} is not encodable as UTF-8") from exc
    if not raw or len(raw) >= RAMBLOCK_NAME_SIZE or len(raw) > 255 or b"\0" in raw:
        raise ConfigError(f"block name must be 1..255 bytes without NUL, got {name!r}")


def _check_size(name: str, size: int) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise ConfigError(f"block {name!r}: size {size} is not a positive multiple of {PAGE_SIZE}")


class ReadAhead:
    """Maps ranges of pages for reading on a thread of its own, ahead of their use.

    A source scans and sends its RAM one chunk after the other on the migration thread;
    the first touch of each page (a fault) would stall that thread, and with it the
    channels waiting for their next job. :meth:`ahead` queues the next chunk's pages and
    returns at once; :meth:`RamBlock.populate` runs them without the interpreter lock.
    Best effort: a range not mapped in time is faulted in by its first reader.

    One thread calls :meth:`ahead` and :meth:`close`.
    """

    def __init__(self, name: str = "ram-read-ahead") -> None:
        # Ranges to map, None to stop; the thread drains it in order.
        self._ranges: queue.SimpleQueue[tuple[RamBlock, int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    def ahead(self, block: RamBlock, first: int, count: int) -> None:
        """Queue pages ``[first, first + count)`` of ``block`` to be mapped."""
        self._ranges.put((block, first, count))

    def close(self) -> None:
        """Stop the thread once the queued ranges are mapped, and join it."""
        if self._thread.is_alive():
            self._ranges.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (work := self._ranges.get()) is not None:
            block, first, count = work
            if block.closed:
                continue
            try:
                block.populate(first, count)
            except (ValueError, BufferError):  # closed meanwhile: nothing left to map
                continue


class Ram:
    """The ordered, named blocks of one migration (QEMU's RAMBlock list)."""

    def __init__(self, blocks: Iterable[RamBlock] = ()) -> None:
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
        # A copy first: a progress thread may ask while the loader adds blocks.
        return sum(block.size for block in tuple(self._blocks.values()))

    def close(self) -> None:
        for block in self._blocks.values():
            block.close()
