"""A live pre-copy migration through the fault proxy, and what each fault-matrix cell checks.

The workload is deterministic so that every run has the same shape: a :class:`TickWriter`
writes ``WRITES_PER_TICK`` pages each time the source hands a chunk of pages to its
channels (the ``progress`` callback, on the migrating thread), and the limits force exactly
``PASSES`` passes (a downtime limit nothing meets, ``max_passes`` with the ``force``
policy). Per multifd channel the stream is then always: init packet, SYNC #1 (setup), the
pages of pass 1 and SYNC #2, pass 2 and SYNC #3, pass 3 and SYNC #4, the last pages and
SYNC #5 (completion). The main stream has one ``SectionPart`` per pass and one
``RamMultifdFlush`` per SYNC round, then ``SectionEnd``, the device sections and ``Eof``.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np

import multifd
from multifd.dirty import DirtyLog
from multifd.errors import MigrationFailed, MultifdError
from multifd.migration.precopy import Hooks, Limits, TimeoutPolicy
from multifd.migration.stats import MigrationStats
from multifd.wire.constants import PAGE_SIZE
from tests.faults.harness import Fault, FaultProxy, Fired

PAGES: Final = 2048  # 8 MiB: 16 full packets per pass 1
WRITES_PER_TICK: Final = 256
PASSES: Final = 3
CHANNELS: Final = 2
IO_TIMEOUT: Final = 1.0
SETUP_TIMEOUT: Final = 10.0
BOUND: Final = 60.0  # longest any wait in these tests may take (a failure, not a delay)
LIMITS: Final = Limits(downtime_limit=1e-9, max_passes=PASSES, on_timeout=TimeoutPolicy.FORCE)


class TickWriter:
    """The workload: writes pages between the chunks a pass sends, marking each after it.

    ``expected`` is the image the writes produce: whatever the migration does, the source
    block must equal it (the migration only reads the source).
    """

    def __init__(self, block: multifd.RamBlock, log: DirtyLog, seed: int = 7) -> None:
        # Owned by the migrating thread (tick, pause and resume are all called on it).
        self.block = block
        self.log = log
        self.rng = np.random.default_rng(seed)
        self.expected = block.words.copy()
        self.number = 0
        self.paused = False
        self.ticks = 0

    def tick(self, _stats: MigrationStats) -> None:
        if self.paused:
            return
        self.ticks += 1
        count = self.block.page_count
        pages = self.rng.choice(count, WRITES_PER_TICK, replace=False).astype(np.int64)
        numbers = np.arange(self.number + 1, self.number + 1 + len(pages), dtype=np.uint64)
        self.number += len(pages)
        for image in (self.block.words, self.expected):
            image[pages, 1] = numbers
            image[pages, 0] = pages.astype(np.uint64) + 1
        self.log.mark_pages(self.block, pages)  # after the write (see multifd.dirty)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


def source_block(pages: int = PAGES) -> multifd.RamBlock:
    """``pages`` numbered pages, one in eight of them zero."""
    block = multifd.RamBlock.anonymous("mem", pages * PAGE_SIZE)
    words = block.words
    words[:, 0] = np.arange(1, pages + 1, dtype=np.uint64)
    words[:, 7] = np.arange(pages, dtype=np.uint64) * 0x9E3779B97F4A7C15 % (1 << 63)
    words[::8] = 0
    return block


@dataclass
class DestinationRun:
    """``multifd.receive`` on a thread; records how and when it ended."""

    io_timeout: float = IO_TIMEOUT
    address: str = ""
    received: multifd.Received | None = None
    error: BaseException | None = None
    end: float = 0.0
    _listening: queue.Queue[str] = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None

    def start(self) -> str:
        self._thread = threading.Thread(target=self._run, name="test-destination")
        self._thread.start()
        self.address = self._listening.get(timeout=BOUND)
        return self.address

    def _run(self) -> None:
        try:
            self.received = multifd.receive(
                "tcp:127.0.0.1:0",
                channels=CHANNELS,
                io_timeout=self.io_timeout,
                setup_timeout=SETUP_TIMEOUT,
                on_listening=self._listening.put,
            )
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
        self.end = time.monotonic()

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "the destination did not end"


@dataclass
class Attempt:
    """What one migration attempt through the proxy did."""

    fault: Fault | None
    fired: Fired | None
    source_error: BaseException | None
    source_stats: MigrationStats | None
    source_end: float
    destination: DestinationRun
    engine_threads: list[str]

    def fail_times(self) -> tuple[float, float]:
        """Seconds from the fault to the source's end and to the destination's end."""
        assert self.fired is not None
        return self.source_end - self.fired.time, self.destination.end - self.fired.time


@dataclass
class LiveSource:
    """A source block, its dirty log and its writer; survives several attempts."""

    pages: int = PAGES
    block: multifd.RamBlock = field(init=False)
    log: DirtyLog = field(init=False)
    writer: TickWriter = field(init=False)

    def __post_init__(self) -> None:
        self.block = source_block(self.pages)
        self.log = DirtyLog(multifd.Ram([self.block]))
        self.writer = TickWriter(self.block, self.log)

    def migrate(self, fault: Fault | None, *, compression: str = "none") -> Attempt:
        """One attempt, through a proxy that injects ``fault`` (None: a clean relay)."""
        destination = DestinationRun()
        target = destination.start()
        error: BaseException | None = None
        stats = None
        with FaultProxy(target, [fault] if fault else [], compressed=compression != "none") as px:
            try:
                stats = self.send(px.address, compression=compression)
            except MultifdError as exc:
                error = exc
            source_end = time.monotonic()
            destination.join()
            threads = [t.name for t in threading.enumerate() if t.name.startswith(_ENGINE)]
            fired = px.wait_fired(0)
        return Attempt(fault, fired, error, stats, source_end, destination, threads)

    def send(self, address: str, *, compression: str = "none") -> MigrationStats:
        writer = self.writer
        return multifd.send(
            address, self.log, channels=CHANNELS, io_timeout=IO_TIMEOUT, limits=LIMITS,
            hooks=Hooks(pause=writer.pause, resume=writer.resume), progress=writer.tick,
            compression=compression,
        )  # fmt: skip

    def fresh_attempt(self) -> None:
        """A migration straight to a new destination succeeds and delivers the final image."""
        destination = DestinationRun()
        stats = self.send(destination.start())
        destination.join()
        received = destination.received
        assert received is not None, f"the fresh attempt failed: {destination.error!r}"
        try:
            assert stats.status is multifd.Status.COMPLETED
            assert received.stats.status is multifd.Status.COMPLETED
            assert np.array_equal(self.block.words, self.writer.expected)
            assert np.array_equal(received.ram["mem"].words, self.block.words)
        finally:
            received.ram.close()

    def undelivered_pages_are_dirty(self) -> None:
        """No migration completed: every page must be dirty in the log (none was delivered)."""
        taken = self.log.take()
        try:
            assert np.array_equal(taken["mem"], np.arange(self.pages)), (
                f"{self.pages - len(taken['mem'])} pages never delivered are not dirty"
            )
        finally:
            self.log.restore(taken)

    def close(self) -> None:
        self.block.close()


_ENGINE: Final = ("send-", "recv-")


def failed(error: BaseException | None) -> MigrationFailed:
    assert isinstance(error, MigrationFailed), f"expected MigrationFailed, got {error!r}"
    return error


def describe(error: BaseException | None) -> str:
    """The error and its causes, one line."""
    parts = []
    while error is not None:
        parts.append(f"{type(error).__name__}({getattr(error, 'channel', None)}): {error}")
        error = error.__cause__
    return " <- ".join(parts)
