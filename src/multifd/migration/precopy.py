"""The pre-copy orchestrator: passes until the rest fits in the downtime limit, then switch over.

Theory of operation. A migration walks QEMU's states::

    none -> setup -> active -> device -> completed
    setup | active | device -> cancelling -> cancelled
    any state before completed -> failed

In ``active`` it sends passes: the first over every page, each later one over the pages
dirtied since the previous pass was taken. After each pass it measures the bandwidth (bytes
the pass put on the wire over its duration) and the dirty rate (pages dirtied during the
pass over its duration), takes the next dirty set and computes the expected downtime:
remaining bytes / bandwidth. When that is within ``downtime_limit`` it switches over
(``device``): the ``pause`` hook stops the writers, the last dirty pages go out with the
stream's completion, and ``stopped`` is called. If the migration fails or is cancelled after
``pause``, ``resume`` is called instead; the source's memory is never written.

Nothing the source sends is acknowledged before the migration completes: a completed sync
only says the bytes left this host, and a destination that fails throws everything away.
On failure or cancel every page taken during the attempt is therefore given back to the
tracker, so a later attempt (or any other user of the dirty log) loses nothing. With
``return_path`` (QEMU's return path, :mod:`multifd.wire.return_path`) the source completes
only once the destination's SHUT says it completed too; a failure status, a closed
connection or no SHUT within ``io_timeout`` fails the migration like any other failure
(pages given back, ``resume`` called). Without it, the migration is completed once its last
byte has left. Either way a cancel that comes after the last byte left is too late: the
destination may already run, so the migration completes (or fails on the destination's
word) whatever the cancel says.
With ``auto_converge`` (QEMU's capability, :mod:`multifd.migration.throttle`), a
migration whose writers keep dirtying memory faster than it moves holds them a growing
fraction of the time through the ``throttle`` hook, until the rest fits the limit; on
failure or cancel the hold is lifted (``throttle(0.0)``).
A migration that does not converge within ``timeout`` seconds or ``max_passes`` passes
follows ``on_timeout``: ``cancel`` fails it with the reason (dirty rate against bandwidth),
``force`` switches over anyway and the downtime reports what it really cost.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from multifd.address import Address
from multifd.engine.trace import TraceHook
from multifd.errors import (
    ChannelError,
    ConfigError,
    MigrationCancelled,
    MigrationFailed,
    MultifdError,
)
from multifd.migration.pacing import Pacer
from multifd.migration.source import Pages, Source
from multifd.migration.stats import MigrationStats, PassStats, Status
from multifd.migration.throttle import AutoConverge, ThrottleControl
from multifd.ram import Ram
from multifd.wire.compat import PeerProfile
from multifd.wire.constants import PAGE_SIZE

log = logging.getLogger("multifd.precopy")

DEFAULT_DOWNTIME_LIMIT: Final = 0.3  # seconds; QEMU's downtime-limit default is 300 ms

# Which state may follow which (QEMU's MigrationStatus names); anything else is a bug.
_NEXT: Final[Mapping[Status, frozenset[Status]]] = {
    Status.NONE: frozenset({Status.SETUP}),
    Status.SETUP: frozenset({Status.ACTIVE, Status.CANCELLING, Status.FAILED}),
    Status.ACTIVE: frozenset({Status.DEVICE, Status.CANCELLING, Status.FAILED}),
    Status.DEVICE: frozenset({Status.COMPLETED, Status.CANCELLING, Status.FAILED}),
    Status.CANCELLING: frozenset({Status.CANCELLED}),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}


@runtime_checkable
class Tracker(Protocol):
    """Where dirty pages come from, and which copy of the RAM is sent."""

    @property
    def source_ram(self) -> Ram: ...

    def take(self, *, everything: bool = False) -> dict[str, Pages]: ...

    def restore(self, taken: Mapping[str, Pages]) -> None: ...


class StaticTracker:
    """Memory nobody writes during the migration: one pass, nothing dirty afterwards."""

    def __init__(self, ram: Ram) -> None:
        self.source_ram = ram

    def take(self, *, everything: bool = False) -> dict[str, Pages]:
        if not everything:
            return {}
        return {b.name: np.arange(b.page_count, dtype=np.int64) for b in self.source_ram}

    def restore(self, taken: Mapping[str, Pages]) -> None:
        """Nothing to give back: every attempt sends every page."""


class TimeoutPolicy(enum.Enum):
    CANCEL = "cancel"  # fail with the reason; the source keeps running
    FORCE = "force"  # switch over anyway; downtime shows the real cost


@dataclass(frozen=True)
class Hooks:
    """What the orchestrator calls at switchover and after it."""

    pause: Callable[[], None] = lambda: None  # stop the writers (a VM's CPUs)
    resume: Callable[[], None] = lambda: None  # failure or cancel after pause
    stopped: Callable[[], None] = lambda: None  # success: the writers stay stopped
    # Auto-converge (Limits.auto_converge): hold the writers this fraction of the time;
    # 0.0 lets them run freely again (on failure or cancel). Only ever called before pause,
    # which must end any throttling itself.
    throttle: Callable[[float], None] = lambda fraction: None


@dataclass(frozen=True)
class Limits:
    """Convergence settings (QEMU's downtime-limit, max-bandwidth) and our own bounds."""

    downtime_limit: float = DEFAULT_DOWNTIME_LIMIT
    max_bandwidth: float | None = None  # bytes per second
    max_passes: int | None = None
    timeout: float | None = None  # seconds before on_timeout applies
    on_timeout: TimeoutPolicy = TimeoutPolicy.CANCEL
    auto_converge: AutoConverge | None = None  # None: never throttle the writers

    def __post_init__(self) -> None:
        if self.downtime_limit <= 0:
            raise ConfigError(f"downtime limit must be positive, got {self.downtime_limit}")
        if self.max_bandwidth is not None and self.max_bandwidth <= 0:
            raise ConfigError(f"max bandwidth must be positive, got {self.max_bandwidth}")
        if self.max_passes is not None and self.max_passes < 1:
            raise ConfigError(f"max passes must be at least 1, got {self.max_passes}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")


@dataclass
class _Progress:
    """Figures the migration thread updates and :meth:`Precopy.stats` reads."""

    passes: list[PassStats] = field(default_factory=list)
    remaining_pages: int = 0
    expected_downtime_ms: float = 0.0
    downtime_ms: float = 0.0
    end: float | None = None
    error: str | None = None


class Precopy:
    """One live migration of RAM blocks, from setup to completion or cancel.

    Args:
        tracker: the dirty-page source (:class:`StaticTracker`, a
            :class:`~multifd.dirty.DirtyLog` adapter or a shadow tracker).
        profile: the destination's QEMU behaviour.
        limits: convergence settings.
        hooks: pause / resume / stopped callbacks around switchover.
        on_pass: called with each pass's figures.
        progress: called with a statistics snapshot while pages are sent.
        **channel_options: passed to :class:`~multifd.migration.source.Source` (channels,
            uuid, compression, level, io_timeout, trace, return_path).
    """

    def __init__(
        self,
        tracker: Tracker,
        profile: PeerProfile,
        *,
        limits: Limits | None = None,
        hooks: Hooks | None = None,
        on_pass: Callable[[PassStats], None] | None = None,
        progress: Callable[[MigrationStats], None] | None = None,
        channels: int = 2,
        uuid: bytes = bytes(16),
        compression: str = "none",
        level: int | None = None,
        io_timeout: float = 30.0,
        trace: TraceHook | None = None,
        return_path: bool = False,
    ) -> None:
        self.tracker = tracker
        self.limits = limits or Limits()
        self.hooks = hooks or Hooks()
        self.on_pass = on_pass
        self.progress = progress
        self._source = Source(
            tracker.source_ram,
            profile,
            channels=channels,
            uuid=uuid,
            compression=compression,
            level=level,
            io_timeout=io_timeout,
            trace=trace,
            progress=self._tick if progress is not None else None,
            return_path=return_path,
        )
        self._lock = threading.Lock()  # guards status and the cancel decision
        self._cancel = threading.Event()  # set by cancel(); ends pacing waits at once
        self._status = Status.NONE
        self._start = 0.0
        self._figures = _Progress()
        self._undelivered = _Undelivered(tracker.source_ram)  # owned by the migration thread
        # Auto-converge: written by the migration thread; stats() reads its level (a float).
        auto_converge = self.limits.auto_converge
        self._throttle = ThrottleControl(auto_converge) if auto_converge is not None else None
        self._paused = False  # owned by the migration thread
        self._sent_all = False  # the last byte left: too late to cancel; guarded by _lock

    # -- public ------------------------------------------------------------------------------
    @property
    def status(self) -> Status:
        return self._status

    def migrate(self, address: Address, *, connect_timeout: float = 10.0) -> MigrationStats:
        """Run the migration to its end; returns the final statistics.

        Raises:
            MigrationFailed: a channel failed, or the migration did not converge (``cancel``
                policy); the source memory is untouched and the dirty pages are restored.
            MigrationCancelled: :meth:`cancel` was called.
        """
        self._start = time.monotonic()
        self._move(Status.SETUP)
        try:
            self._source.open(address, connect_timeout=connect_timeout)
            self._source.setup()
            self._move(Status.ACTIVE)
            final = self._converge()
            self._switchover(final)
        except BaseException as exc:  # noqa: BLE001 - _fail() records it and always raises
            self._fail(exc)
        finally:
            self._source.close()
            self._figures.end = time.monotonic()
        return self.stats()

    def cancel(self) -> None:
        """Cancel from any thread; a no-op before start and after the end."""
        with self._lock:
            if self._status not in (Status.SETUP, Status.ACTIVE, Status.DEVICE):
                return
            if self._sent_all:
                log.warning("cancel came after the last byte left: too late")
                return
            self._status = Status.CANCELLING
            self._cancel.set()
        log.info("cancelling")
        self._source.abort(MigrationCancelled("migration cancelled"))

    def stats(self) -> MigrationStats:
        """A snapshot of the migration, shaped like QEMU's ``query-migrate``."""
        figures = self._figures
        now = figures.end or time.monotonic()
        passes = tuple(figures.passes)
        last = passes[-1] if passes else None
        return MigrationStats(
            status=self._status,
            total_time_ms=(now - self._start) * 1e3 if self._start else 0.0,
            setup_time_ms=self._source.setup_ms,
            downtime_ms=figures.downtime_ms,
            expected_downtime_ms=figures.expected_downtime_ms,
            total=self.tracker.source_ram.total_size,
            remaining=figures.remaining_pages * PAGE_SIZE,
            dirty_sync_count=self._source.syncs,
            dirty_pages_rate=last.dirty_rate if last is not None else 0.0,
            channels=self._source.channel_stats(),
            passes=passes,
            error=figures.error,
            cpu_throttle_percentage=round(self._throttle_level() * 100),
        )

    # -- the passes --------------------------------------------------------------------------
    def _converge(self) -> dict[str, Pages]:
        """Send passes until the rest fits the downtime limit; returns the rest."""
        pages = self.tracker.take(everything=True)
        pace = Pacer(self.limits.max_bandwidth, self._cancel) if self.limits.max_bandwidth else None
        while True:
            self._undelivered.add(pages)
            report = self._run_pass(pages, pace)
            pages = self.tracker.take()
            self._undelivered.add(pages)
            report = report.with_dirty(_count(pages))
            self._record(report)
            remaining = report.dirty_pages
            # Bandwidth over all passes so far: a short last pass is mostly sync latency and
            # would make the estimate swing.
            bandwidth = _bandwidth(self._figures.passes)
            expected = remaining * PAGE_SIZE / bandwidth if bandwidth else 0.0
            self._figures.remaining_pages = remaining
            self._figures.expected_downtime_ms = expected * 1e3
            log.info("pass %d: %d pages, %d dirty, expected downtime %.0f ms",
                     report.number, report.pages, remaining, expected * 1e3)  # fmt: skip
            if expected <= self.limits.downtime_limit:
                return pages
            reason = self._limit_reached(report, expected, bandwidth)
            if reason is not None:
                if self.limits.on_timeout is TimeoutPolicy.FORCE:
                    log.warning("switching over anyway: %s", reason)
                    return pages
                raise MigrationFailed(f"migration did not converge: {reason}")
            self._step_throttle(report)

    def _run_pass(self, pages: Mapping[str, Pages], pace: Pacer | None) -> PassStats:
        before = sum(ch.bytes for ch in self._source.channel_stats())
        began = time.monotonic()
        self._source.send_pass(pages, pace=pace)
        seconds = max(time.monotonic() - began, 1e-6)
        sent = sum(ch.bytes for ch in self._source.channel_stats()) - before
        number = len(self._figures.passes) + 1
        return PassStats(number=number, pages=_count(pages), bytes=sent, seconds=seconds)

    def _record(self, report: PassStats) -> None:
        self._figures.passes.append(report)
        if self.on_pass is not None:
            self.on_pass(report)

    def _step_throttle(self, report: PassStats) -> None:
        """Auto-converge: after a pass that did not converge, maybe hold the writers more."""
        if self._throttle is None:
            return
        before = self._throttle.level
        level = self._throttle.after_pass(report.dirty_pages * PAGE_SIZE, report.bytes)
        if level is None or level == before:
            return
        log.info("auto-converge: the writers are held %.0f %% of the time", level * 100)
        self.hooks.throttle(level)

    def _throttle_level(self) -> float:
        """The fraction of time auto-converge holds the writers now (0: not at all)."""
        return self._throttle.level if self._throttle is not None else 0.0

    def _limit_reached(self, report: PassStats, expected: float, bandwidth: float) -> str | None:
        limits = self.limits
        elapsed = time.monotonic() - self._start
        hit = None
        if limits.timeout is not None and elapsed >= limits.timeout:
            hit = f"{elapsed:.1f} s elapsed (timeout {limits.timeout:g} s)"
        elif limits.max_passes is not None and report.number >= limits.max_passes:
            hit = f"{report.number} passes (max {limits.max_passes})"
        if hit is None:
            return None
        return (
            f"{hit}; expected downtime {expected * 1e3:.0f} ms exceeds the "
            f"{limits.downtime_limit * 1e3:.0f} ms limit: the memory is dirtied at "
            f"{report.dirty_rate * PAGE_SIZE / 1e6:.1f} MB/s "
            f"against a bandwidth of {bandwidth / 1e6:.1f} MB/s"
        )

    # -- switchover --------------------------------------------------------------------------
    def _switchover(self, rest: dict[str, Pages]) -> None:
        self._move(Status.DEVICE)
        paused_at = time.monotonic()
        self.hooks.pause()
        self._paused = True
        # Pages dirtied since the last take, now that the writers are stopped.
        final = _union(rest, self.tracker.take())
        self._undelivered.add(final)
        self._source.complete(final)
        self._await_destination()
        self._undelivered.clear()
        self._figures.downtime_ms = (time.monotonic() - paused_at) * 1e3
        self._figures.remaining_pages = 0
        self._move(Status.COMPLETED, late_cancel_ok=True)
        self.hooks.stopped()

    def _await_destination(self) -> None:
        """Every byte has left: the destination completes whatever a cancel says now. With
        the return path, its SHUT says whether it did."""
        with self._lock:
            self._sent_all = True
            raced = self._status is Status.CANCELLING
        try:
            self._source.await_destination()
        except ChannelError as exc:
            if not raced:
                raise
            # The cancel shut the sockets down while the last bytes went out: the SHUT
            # cannot be heard, and the destination has everything. As without a return
            # path, the migration completes (see _move).
            log.warning("the destination's verdict was lost to a late cancel: %s", exc)

    # -- the end -----------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C on the migrating thread: a cancel
            self.cancel()
        undelivered = self._undelivered.pages()
        if undelivered:
            self.tracker.restore(undelivered)
            self._undelivered.clear()
        if self._paused:
            self.hooks.resume()
        elif self._throttle_level():
            try:
                self.hooks.throttle(0.0)  # the writers run at full speed again
            except Exception:
                log.exception("lifting the throttle failed")  # the first error is reported
        with self._lock:
            cancelled = self._status is Status.CANCELLING
            self._status = Status.CANCELLED if cancelled else Status.FAILED
        self._figures.error = str(exc)
        if cancelled:
            raise MigrationCancelled("migration cancelled") from exc
        if isinstance(exc, MigrationFailed):
            raise exc
        if isinstance(exc, MultifdError):
            failed = MigrationFailed(str(exc))
            channel = getattr(exc, "channel", None)
            failed.channel = channel if isinstance(channel, str) else None
            raise failed from exc
        raise exc

    def _move(self, status: Status, *, late_cancel_ok: bool = False) -> None:
        with self._lock:
            if self._status is Status.CANCELLING and late_cancel_ok:
                log.warning("cancel came after the last byte left: the migration completed")
                self._status = Status.DEVICE
                self._cancel.clear()
            if self._status is Status.CANCELLING:
                raise MigrationCancelled("migration cancelled")
            if status not in _NEXT[self._status]:
                raise AssertionError(f"no transition {self._status.value} -> {status.value}")
            self._status = status
        log.info("status: %s", status.value)

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress(self.stats())


class _Undelivered:
    """Every page taken during one attempt: none is delivered before the migration completes.

    One flag per page of each block (a byte a page: 16 MiB for 64 GiB of RAM).
    """

    def __init__(self, ram: Ram) -> None:
        self._blocks = {block.name: block.page_count for block in ram}
        self._taken: dict[str, npt.NDArray[np.bool_]] = {}

    def add(self, taken: Mapping[str, Pages]) -> None:
        for name, pages in taken.items():
            if len(pages):
                flags = self._taken.get(name)
                if flags is None:
                    flags = self._taken[name] = np.zeros(self._blocks[name], dtype=np.bool_)
                flags[pages] = True

    def pages(self) -> dict[str, Pages]:
        return {name: np.flatnonzero(flags) for name, flags in self._taken.items()}

    def clear(self) -> None:
        self._taken.clear()


def _bandwidth(passes: list[PassStats]) -> float:
    seconds = sum(p.seconds for p in passes)
    return sum(p.bytes for p in passes) / seconds if seconds > 0 else 0.0


def _count(pages: Mapping[str, Pages]) -> int:
    return sum(len(p) for p in pages.values())


def _union(a: Mapping[str, Pages], b: Mapping[str, Pages]) -> dict[str, Pages]:
    names = set(a) | set(b)
    empty = np.empty(0, dtype=np.int64)
    return {
        name: np.union1d(a.get(name, empty), b.get(name, empty)).astype(np.int64) for name in names
    }
