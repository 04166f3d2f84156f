"""Live pre-copy: convergence, non-convergence, cancel in every state, a second attempt."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

import multifd
from multifd.dirty import DirtyLog
from multifd.engine.trace import TraceEvent
from multifd.migration.precopy import Hooks, Limits, TimeoutPolicy
from multifd.migration.stats import PassStats
from tests.migration.helpers import BOUND, PAGE, ReceiverThread

PAGES = 2048  # 8 MiB
HOT = 256  # the pages the writer favours


class Writer:
    """Writes an increasing sequence number into pages, marking each write dirty after it.

    ``rate`` writes per second, paced by the wall clock (the workload's own speed, not a
    test synchronisation); 80 % of the writes go to the first ``HOT`` pages.
    """

    def __init__(self, block: multifd.RamBlock, log: DirtyLog, rate: float, seed: int = 1):
        self.block, self.log, self.rate = block, log, rate
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()  # set by pause(): the writer finishes its write and exits
        self.number = 0  # owned by the writer thread until it has been joined
        self.history: list[tuple[int, int]] = []  # (number, page) of every write, in order
        self.thread = threading.Thread(target=self._run, name="test-writer")

    def _run(self) -> None:
        batch = max(1, int(self.rate / 200))
        while not self.stop.wait(batch / self.rate):
            hot = self.rng.random(batch) < 0.8
            pages = np.where(hot, self.rng.integers(0, HOT, batch),
                             self.rng.integers(0, PAGES, batch))  # fmt: skip
            for page in pages.tolist():
                self.number += 1
                self.history.append((self.number, page))
                self.block.words[page, 1] = self.number
                self.block.words[page, 0] = page + 1  # never a zero page
                self.log.mark_dirty(self.block, page * PAGE, PAGE)

    def pause(self) -> None:
        self.stop.set()
        self.thread.join(BOUND)
        assert not self.thread.is_alive()


class RecordingLog(DirtyLog):
    """A dirty log that notes the writer's last number at each take."""

    writer: Writer | None = None
    numbers: list[int]
    last: dict[str, np.typing.NDArray[np.int64]]

    def take(self, *, everything: bool = False) -> dict[str, np.typing.NDArray[np.int64]]:
        assert self.writer is not None
        self.numbers.append(self.writer.number)
        self.last = super().take(everything=everything)
        return self.last


@contextmanager
def live_block(rate: float) -> Iterator[tuple[multifd.RamBlock, RecordingLog, Writer]]:
    block = multifd.RamBlock.anonymous("mem", PAGES * PAGE)
    block.words[:, 0] = np.arange(1, PAGES + 1, dtype=np.uint64)
    log = RecordingLog(multifd.Ram([block]))
    log.numbers = []
    writer = Writer(block, log, rate)
    log.writer = writer
    writer.thread.start()
    try:
        yield block, log, writer
    finally:
        if writer.thread.is_alive():
            writer.pause()
        block.close()


def test_a_live_block_converges_and_arrives_exactly_as_paused() -> None:
    passes: list[PassStats] = []
    with live_block(rate=5000) as (block, log, writer):
        receiver = ReceiverThread({"channels": 2})
        address = receiver.start("tcp:127.0.0.1:0")
        stopped = threading.Event()  # the stopped hook ran
        # 50 MB/s: the first pass takes ~0.17 s, long enough for the writer to dirty pages
        # that need further passes before the rest fits 5 ms.
        stats = multifd.send(
            address, log, channels=2, limits=Limits(downtime_limit=0.005, max_bandwidth=50e6),
            hooks=Hooks(pause=writer.pause, stopped=stopped.set), on_pass=passes.append,
        )  # fmt: skip
        received = receiver.result()
        try:
            assert stats.status is multifd.Status.COMPLETED
            assert stopped.is_set()
            assert writer.number > 0
            assert np.array_equal(received.ram["mem"].words, block.words)
        finally:
            received.ram.close()
    assert passes[0].pages == PAGES
    assert len(passes) >= 2
    assert all(p.dirty_pages > 0 for p in passes[:-1])
    assert stats.downtime_ms > 0
    assert [p.number for p in passes] == list(range(1, len(passes) + 1))
    assert stats.dirty_sync_count == len(passes) + 2  # setup, each pass, completion


@pytest.mark.parametrize("policy", [TimeoutPolicy.CANCEL, TimeoutPolicy.FORCE])
def test_a_migration_that_cannot_converge_obeys_its_timeout_policy(policy: TimeoutPolicy) -> None:
    """Writes outrun a 16 MB/s cap; after a bounded number of passes the policy decides."""
    limits = Limits(downtime_limit=0.001, max_bandwidth=16e6, max_passes=3, on_timeout=policy)
    with live_block(rate=20000) as (block, log, writer):
        receiver = ReceiverThread({"channels": 2})
        address = receiver.start("tcp:127.0.0.1:0")
        if policy is TimeoutPolicy.CANCEL:
            with pytest.raises(multifd.MigrationFailed, match="did not converge") as info:
                multifd.send(address, log, limits=limits, hooks=Hooks(pause=writer.pause))
            assert "MB/s" in str(info.value)
            assert writer.thread.is_alive(), "the source keeps running"
            with pytest.raises(multifd.MigrationFailed):
                receiver.result()
            writer.pause()
            # Everything written since the last pass was taken is dirty again: the pages
            # of that take were given back, later writes were never taken.
            given_back = set(log.last["mem"].tolist())
            since = {page for number, page in writer.history if number > log.numbers[-1]}
            assert given_back
            assert set(log.take()["mem"].tolist()) >= given_back | since
            return
        stats = multifd.send(address, log, limits=limits, hooks=Hooks(pause=writer.pause))
        received = receiver.result()
        try:
            assert np.array_equal(received.ram["mem"].words, block.words)
        finally:
            received.ram.close()
        assert stats.status is multifd.Status.COMPLETED
        assert len(stats.passes) == 3
        assert stats.downtime_ms > 0


def _cancel_at(where: str, migration_cancel: list[object]) -> dict[str, object]:
    """Send arguments that call cancel() at a given point of the migration."""

    def cancel() -> None:
        send_cancel = migration_cancel[0]
        assert callable(send_cancel)
        send_cancel()

    if where == "setup":
        fired = threading.Event()  # cancel once, on the first SYNC packet (the setup sync)

        def on_packet(event: TraceEvent) -> None:
            if event.packet is not None and event.packet.is_sync and not fired.is_set():
                fired.set()
                cancel()

        return {"trace": on_packet}
    if where == "active":
        return {"on_pass": lambda _report: cancel()}
    return {"hooks_pause_extra": cancel}


@pytest.mark.parametrize("where", ["setup", "active", "device"])
def test_cancel_in_any_state_then_a_second_attempt_succeeds(where: str) -> None:
    from multifd.address import parse_address
    from multifd.migration.precopy import Precopy
    from multifd.wire.compat import profile

    with live_block(rate=2000) as (block, log, writer):
        resumed = threading.Event()  # the resume hook ran
        holder: list[object] = []
        extra = _cancel_at(where, holder)
        pause_extra = extra.pop("hooks_pause_extra", None)

        def pause() -> None:
            if callable(pause_extra):
                pause_extra()

        migration = Precopy(
            log, profile("native"), hooks=Hooks(pause=pause, resume=resumed.set),
            limits=Limits(downtime_limit=10.0), **extra,  # type: ignore[arg-type]
        )  # fmt: skip
        holder.append(migration.cancel)
        receiver = ReceiverThread({"channels": 2})
        address = receiver.start("tcp:127.0.0.1:0")
        with pytest.raises(multifd.MigrationCancelled):
            migration.migrate(parse_address(address))
        assert migration.status is multifd.Status.CANCELLED
        assert resumed.is_set() is (where == "device")
        with pytest.raises(multifd.MigrationFailed):
            receiver.result()
        migration.cancel()  # after the end: nothing happens
        assert migration.status is multifd.Status.CANCELLED

        second = ReceiverThread({"channels": 2})
        address = second.start("tcp:127.0.0.1:0")
        stats = multifd.send(address, log, hooks=Hooks(pause=writer.pause))
        received = second.result()
        try:
            assert stats.status is multifd.Status.COMPLETED
            assert np.array_equal(received.ram["mem"].words, block.words)
        finally:
            received.ram.close()
