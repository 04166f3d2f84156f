"""Dirty-page tracking: which pages changed since they were last sent.

Theory of operation. Each block has a :class:`DirtyBitmap`, one byte per page. Two kinds of
writers feed it:

* writers in this process call :meth:`DirtyLog.mark_dirty` *after* each write. A pass
  takes the bitmap and clears it in one step under the bitmap's lock (:meth:`DirtyBitmap.take`
  swaps in a fresh array), so a write is either before the take (its page is in this pass,
  and is read after the write) or after it (its page is in the next pass). Marking after
  the write is what makes this hold; a mark made before a write could be taken, sent, and
  then overtaken by the write it announced.
* memory written by other processes (a ``/dev/shm`` file, a shared mapping) cannot call us.
  A :class:`ShadowTracker` keeps a private copy of each block as it was last *sent*; at each
  pass it compares the live block with that copy, page by page with numpy, copies the pages
  that differ into the copy, and the migration sends them *from the copy*. What is sent is
  then exactly what the next comparison is made against, so no change can hide between a
  comparison and the send (a page that changes, is read, and changes back would otherwise be
  missed).

A taken set of pages is not forgotten until the migration acknowledges it: on failure or
cancel :meth:`DirtyLog.restore` marks them dirty again, so nothing dirtied and not delivered
is lost for the next attempt.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

from multifd.errors import ConfigError
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import PAGE_SHIFT, PAGE_SIZE

Pages = npt.NDArray[np.int64]
# Pages compared per numpy step in the shadow tracker: big enough to run at memory speed,
# small enough that its temporaries stay in cache-sized pieces.
_COMPARE_PAGES: Final = 4096


class DirtyBitmap:
    """One byte per page of one block; thread-safe marks, atomic take-and-clear."""

    def __init__(self, page_count: int, *, all_dirty: bool = False) -> None:
        self.page_count: Final = page_count
        self._lock = threading.Lock()  # guards _bits: every mark, every take
        self._bits = np.full(page_count, all_dirty, dtype=np.bool_)

    def mark(self, first: int, count: int = 1) -> None:
        """Mark pages ``[first, first + count)`` dirty."""
        if first < 0 or count < 0 or first + count > self.page_count:
            raise ConfigError(f"pages [{first}, {first + count}) outside {self.page_count} pages")
        with self._lock:
            self._bits[first : first + count] = True

    def mark_pages(self, pages: Pages) -> None:
        """Mark the pages whose numbers are in ``pages`` dirty."""
        if len(pages):
            with self._lock:
                self._bits[pages] = True

    def take(self) -> Pages:
        """The dirty page numbers, ascending; the bitmap is clear afterwards (atomically)."""
        fresh = np.zeros(self.page_count, dtype=np.bool_)
        with self._lock:
            bits, self._bits = self._bits, fresh
        return np.flatnonzero(bits).astype(np.int64)

    def count(self) -> int:
        """How many pages are dirty now."""
        with self._lock:
            return int(np.count_nonzero(self._bits))


class DirtyLog:
    """The dirty bitmaps of every block of a :class:`Ram`, for writers in this process.

    Args:
        ram: the blocks whose writes are logged.
        all_dirty: start with every page dirty (a migration's first pass sends them all).
    """

    def __init__(self, ram: Ram, *, all_dirty: bool = True) -> None:
        self.ram = ram
        self._bitmaps: dict[str, DirtyBitmap] = {
            block.name: DirtyBitmap(block.page_count, all_dirty=all_dirty) for block in ram
        }

    def mark_dirty(self, block: RamBlock | str, offset: int, length: int) -> None:
        """Record that ``length`` bytes at ``offset`` of ``block`` were written.

        Call it after the write (see the module notes). Thread-safe; cost is one lock and
        one slice assignment.
        """
        name = block if isinstance(block, str) else block.name
        try:
            bitmap = self._bitmaps[name]
        except KeyError:
            raise ConfigError(f"no block {name!r} in this dirty log") from None
        if length <= 0:
            return
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        bitmap.mark(first, last - first + 1)

    def mark_pages(self, block: RamBlock | str, pages: Pages) -> None:
        """Record writes to whole pages, by page number: one lock for the lot."""
        name = block if isinstance(block, str) else block.name
        self._bitmaps[name].mark_pages(pages)

    @property
    def source_ram(self) -> Ram:
        """What a migration sends: the live blocks (their writers mark what they change)."""
        return self.ram

    def take(self, *, everything: bool = False) -> dict[str, Pages]:
        """Every block's dirty pages, each bitmap cleared atomically with its read.

        With ``everything`` the bitmaps are cleared and every page is returned (a first pass).
        """
        taken = {name: bitmap.take() for name, bitmap in self._bitmaps.items()}
        if everything:
            return {b.name: np.arange(b.page_count, dtype=np.int64) for b in self.ram}
        return taken

    def restore(self, taken: Mapping[str, Pages]) -> None:
        """Mark pages dirty again that were taken but not delivered."""
        for name, pages in taken.items():
            self._bitmaps[name].mark_pages(pages)

    def dirty_pages(self) -> int:
        return sum(bitmap.count() for bitmap in self._bitmaps.values())

    def bitmap(self, name: str) -> DirtyBitmap:
        return self._bitmaps[name]


class ShadowTracker:
    """Finds the pages other processes changed, by comparing each block with its last-sent copy.

    :attr:`sent` holds the copies; a migration sends from them, never from the live blocks.
    They start all zero, so the first comparison finds every non-zero page: an all-zero
    page needs no first send when the destination starts zeroed — but a migration's first
    pass sends every page anyway (:meth:`take` with ``everything``).
    """

    def __init__(self, live: Ram) -> None:
        self.live = live
        self.sent = Ram([RamBlock.anonymous(block.name, block.size) for block in live])
        self._pending = DirtyLog(self.sent, all_dirty=False)  # taken, not yet acknowledged

    @property
    def source_ram(self) -> Ram:
        """What a migration sends: the copies, refreshed by each :meth:`take`."""
        return self.sent

    def take(self, *, everything: bool = False) -> dict[str, Pages]:
        """Copy changed pages into :attr:`sent` and return their numbers, per block."""
        taken: dict[str, Pages] = {}
        for block in self.live:
            copy = self.sent[block.name]
            pending = self._pending.bitmap(block.name).take()
            changed = _refresh(block, copy, everything=everything)
            taken[block.name] = np.union1d(changed, pending).astype(np.int64)
        return taken

    def restore(self, taken: Mapping[str, Pages]) -> None:
        """Remember pages that were taken but not delivered; the next take returns them."""
        self._pending.restore(taken)

    def close(self) -> None:
        self.sent.close()


def _refresh(live: RamBlock, copy: RamBlock, *, everything: bool) -> Pages:
    """Pages of ``live`` that differ from ``copy`` (all pages with ``everything``), copied over."""
    found: list[Pages] = []
    for first in range(0, live.page_count, _COMPARE_PAGES):
        stop = min(first + _COMPARE_PAGES, live.page_count)
        now, before = live.words[first:stop], copy.words[first:stop]
        if everything:
            differ = np.arange(first, stop, dtype=np.int64)
            before[:] = now
        else:
            rows = np.flatnonzero((now != before).any(axis=1))
            differ = rows.astype(np.int64) + first
            before[rows] = now[rows]
        found.append(differ)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def pages_to_offsets(pages: Iterable[int] | Pages) -> Pages:
    """Byte offsets of page numbers."""
    return np.asarray(pages, dtype=np.int64) * PAGE_SIZE
