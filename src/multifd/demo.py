"""``multifd demo``: a live migration on this machine, checked byte for byte.

A writer thread keeps changing a block (sequence numbers into random pages, most of them
in a hot set) while it migrates over loopback TCP into a ``multifd receive`` process, as it
would into another host. At switchover the writer is paused; the destination must then
equal the source exactly. Each pass is printed; a JSON report and a plot of throughput and
remaining dirty bytes per pass are written to the output folder.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import numpy as np
from rich.console import Console

from multifd import api
from multifd.console import describe_pass, print_stats
from multifd.dirty import DirtyLog
from multifd.errors import ChannelError
from multifd.migration.precopy import Hooks, Limits
from multifd.migration.stats import MigrationStats
from multifd.migration.throttle import AutoConverge
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import PAGE_SIZE

BLOCK_NAME: Final = "mem"
_LISTEN_TIMEOUT: Final = 60.0
_TICK: Final = 0.005  # the workload writes in bursts this far apart


@dataclass(frozen=True)
class DemoSettings:
    size: int = 1 << 30
    rate: float = 20_000.0  # pages written per second
    hot_set: int = 64 << 20  # bytes that take most of the writes
    hot_fraction: float = 0.8
    zero_fraction: float = 0.3  # pages left all zero at the start
    channels: int = 2
    downtime_limit: float = 0.3  # seconds
    output: Path = Path("demo-out")
    max_bandwidth: float | None = None  # bytes per second; None: as fast as loopback goes
    auto_converge: bool = False  # hold the workload when it outruns the migration
    timeout: float = 60.0  # seconds to converge before the demo gives up (cancel)


class Workload:
    """Writes sequence numbers into pages at ``rate`` pages per second until paused."""

    def __init__(self, block: RamBlock, log: DirtyLog, settings: DemoSettings) -> None:
        self.block, self.log, self.settings = block, log, settings
        self.rng = np.random.default_rng(11)
        self.stop = threading.Event()  # set by pause(): finish the burst and exit
        self.written = 0  # owned by the workload thread until it has been joined
        # (since, written by then, pages per second): the pace, replaced whole by
        # throttle() from the migration thread, read whole by the workload thread.
        self._pace = (time.monotonic(), 0, settings.rate)
        self.thread = threading.Thread(target=self._run, name="demo-workload")

    def _run(self) -> None:
        pages_total = self.block.page_count
        hot = max(1, min(pages_total, self.settings.hot_set // PAGE_SIZE))
        burst = max(1, round(self.settings.rate * _TICK))
        self._pace = (time.monotonic(), 0, self.settings.rate)
        while not self.stop.is_set():
            in_hot = self.rng.random(burst) < self.settings.hot_fraction
            pages = np.where(in_hot, self.rng.integers(0, hot, burst),
                             self.rng.integers(0, pages_total, burst))  # fmt: skip
            numbers = np.arange(self.written + 1, self.written + burst + 1, dtype=np.uint64)
            self.block.words[pages, 1] = numbers
            self.log.mark_pages(self.block, pages)
            self.written += burst
            # Keep the average rate: wait until this burst's share of time has passed.
            since, before, rate = self._pace
            self.stop.wait(max(0.0, since + (self.written - before) / rate - time.monotonic()))

    def throttle(self, fraction: float) -> None:
        """Auto-converge's hook: write ``1 - fraction`` of the rate from now on, as a
        process held that fraction of the time would."""
        self._pace = (time.monotonic(), self.written, self.settings.rate * (1 - fraction))

    def start(self) -> None:
        if self.settings.rate > 0:
            self.thread.start()

    def pause(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(10)


def generate_block(size: int, zero_fraction: float, *, seed: int = 7) -> RamBlock:
    """A block of random pages with ``zero_fraction`` of them all zero."""
    block = RamBlock.anonymous(BLOCK_NAME, size)
    rng = np.random.default_rng(seed)
    step = 64 << 20
    for start in range(0, size, step):
        chunk = min(step, size - start)
        block.view[start : start + chunk] = rng.bytes(chunk)
    block.pages[rng.random(block.page_count) < zero_fraction] = 0
    return block


def read_listening_line(stream: IO[bytes], timeout: float) -> str:
    """The address from a receiver's first stderr line ``listening on ADDRESS``."""
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise ChannelError("receiver did not start listening in time", channel="main")
            byte = os.read(stream.fileno(), 1)
            if not byte:
                raise ChannelError(f"receiver exited before listening: {line!r}", channel="main")
            line += byte
    text = line.decode().strip()
    prefix = "listening on "
    if not text.startswith(prefix):
        raise ChannelError(f"unexpected receiver output: {text!r}", channel="main")
    return text.removeprefix(prefix)


def run_demo(settings: DemoSettings, console: Console) -> bool:
    """Run the demo; True when the destination equals the source after switchover."""
    size = settings.size - settings.size % PAGE_SIZE
    shm = Path("/dev/shm")  # noqa: S108  (a private temporary folder made inside it)
    with tempfile.TemporaryDirectory(prefix="multifd-demo-",
                                     dir=shm if shm.is_dir() else None) as tmp:  # fmt: skip
        console.print(f"generating a {size / 2**20:.0f} MiB block "
                      f"({settings.zero_fraction:.0%} zero pages)...")  # fmt: skip
        block = generate_block(size, settings.zero_fraction)
        out = Path(tmp) / "received"
        receiver = subprocess.Popen(
            [sys.executable, "-m", "multifd", "receive", "tcp:127.0.0.1:0",
             "--channels", str(settings.channels), "--output", str(out),
             "--prealloc", f"{BLOCK_NAME}={size}", "--json"],  # RAM exists before it starts
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            stats = _migrate(receiver, block, settings, console)
            stdout, stderr = receiver.communicate(timeout=120)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.communicate()
        if receiver.returncode != 0:
            console.print(f"receiver failed: {stderr.decode().strip()}", markup=False)
            return False
        equal = _compare(block, out / BLOCK_NAME)
        block.close()
    console.print(f"receiver: {json.loads(stdout)['status']}")
    console.print(
        f"destination {'equals' if equal else 'DIFFERS FROM'} the source byte for byte "
        f"({size // PAGE_SIZE} pages compared)"
    )
    _report(stats, settings, equal, console)
    return equal


def _migrate(
    receiver: subprocess.Popen[bytes], block: RamBlock, settings: DemoSettings, console: Console
) -> MigrationStats:
    assert receiver.stderr is not None
    address = read_listening_line(receiver.stderr, _LISTEN_TIMEOUT)
    log = DirtyLog(Ram([block]))
    workload = Workload(block, log, settings)
    console.print(
        f"receiver listening on {address}; migrating over {settings.channels} channels while "
        f"{settings.rate:.0f} pages/s are written ({settings.hot_fraction:.0%} in "
        f"{settings.hot_set >> 20} MiB)"
    )
    paused = threading.Event()  # set when the workload was paused for switchover
    switch_at: list[float] = []

    def pause() -> None:
        switch_at.append(time.monotonic())
        workload.pause()
        paused.set()
        console.print(f"switchover: workload paused after {workload.written} writes")

    workload.start()
    try:
        stats = api.send(
            address, log, channels=settings.channels,
            limits=Limits(downtime_limit=settings.downtime_limit,
                          max_bandwidth=settings.max_bandwidth, timeout=settings.timeout,
                          auto_converge=AutoConverge() if settings.auto_converge else None),
            hooks=Hooks(pause=pause, throttle=workload.throttle),
            on_pass=lambda report: console.print(describe_pass(report), markup=False),
        )  # fmt: skip
    finally:
        workload.pause()
    print_stats(console, stats, as_json=False)
    console.print(
        f"downtime: {stats.downtime_ms:.1f} ms (limit {settings.downtime_limit * 1e3:.0f} ms)"
    )
    return stats


def _compare(block: RamBlock, path: Path) -> bool:
    received = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return received.shape[0] == block.size and bool(
            np.array_equal(received, np.frombuffer(block.view, dtype=np.uint8))
        )
    finally:
        del received


def _report(stats: MigrationStats, settings: DemoSettings, equal: bool, console: Console) -> None:
    """Write report.json and passes.png into the output folder."""
    settings.output.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()},
        "destination_equals_source": equal,
        "stats": stats.to_json(),
    }
    json_path = settings.output / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = settings.output / "passes.png"
    _plot(stats, png_path)
    console.print(f"wrote {json_path} and {png_path}")


def _plot(stats: MigrationStats, path: Path) -> None:
    import matplotlib  # noqa: PLC0415  (only the demo draws)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    numbers = [p.number for p in stats.passes]
    figure, left = plt.subplots(figsize=(7, 4))
    left.bar(numbers, [p.bandwidth / 1e6 for p in stats.passes], color="tab:blue", alpha=0.6)
    left.set_xlabel("pass")
    left.set_xticks(numbers)
    left.set_ylabel("throughput (MB/s)", color="tab:blue")
    right = left.twinx()
    right.plot(numbers, [p.dirty_pages * PAGE_SIZE / 2**20 for p in stats.passes],
               color="tab:red", marker="o")  # fmt: skip
    right.set_ylabel("dirty after the pass (MiB)", color="tab:red")
    right.set_ylim(bottom=0)
    left.set_title(f"{_passes(len(numbers))}, downtime {stats.downtime_ms:.0f} ms")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _passes(count: int) -> str:
    return f"{count} pass" if count == 1 else f"{count} passes"
