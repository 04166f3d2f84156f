"""What the command line shows: a live view of a migration and its final figures."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import NoReturn, Self

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from multifd.errors import ChannelRefused
from multifd.migration.stats import MigrationStats, PassStats, Status
from multifd.wire.constants import PAGE_SIZE

MIB = 1 << 20

# The commands' stderr: one line per message whatever its length (rich would wrap at 80
# columns when stderr is not a terminal, and a script reading "listening on ADDRESS" would
# get half of it).
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(exc: BaseException) -> NoReturn:
    """Say why a command failed, on stderr, and exit 1."""
    err.print(f"multifd: error: {exc}", markup=False)
    sys.exit(1)


def print_listening(address: str) -> None:
    """The first line of a listening command: ``listening on ADDRESS``."""
    err.print(f"listening on {address}", markup=False)


def print_refused(refusal: ChannelRefused) -> None:
    """A connection refused while a listening command waits for its source's channels:
    said as it happens, since the wait may be long."""
    err.print(f"refused {refusal.peer}: {refusal.reason}", markup=False)


def print_stats(console: Console, stats: MigrationStats, *, as_json: bool) -> None:
    """The final statistics: one JSON object on stdout, or a short summary on ``console``."""
    if as_json:
        click.echo(json.dumps(stats.to_json()))
        return
    seconds = stats.total_time_ms / 1e3
    # The pages' data beside the bytes sent: with compression, the two show what it saved.
    line = (
        f"{stats.status.value}: {stats.transferred / MIB:.1f} MiB in {seconds:.2f} s "
        f"({stats.mbps / 8:.1f} MB/s), {stats.normal} pages "
        f"({stats.normal_bytes / MIB:.1f} MiB of data), {stats.duplicate} zero pages"
    )
    if stats.passes:
        count = len(stats.passes)
        line += f", {count} pass{'' if count == 1 else 'es'}, downtime {stats.downtime_ms:.1f} ms"
    if stats.cpu_throttle_percentage:
        line += f", writers held {stats.cpu_throttle_percentage} % (auto-converge)"
    console.print(line, markup=False)
    for ch in stats.channels:
        console.print(
            f"  {ch.channel:>10}: {ch.packets} packets, {ch.bytes / MIB:.1f} MiB", markup=False
        )


def describe_pass(report: PassStats) -> str:
    return (
        f"pass {report.number}: {report.pages} pages ({report.bytes / MIB:.1f} MiB) in "
        f"{report.seconds:.2f} s, {report.bandwidth / 1e6:.0f} MB/s; "
        f"{report.dirty_pages} pages dirtied meanwhile ({report.dirty_rate:.0f} pages/s)"
    )


class _View:
    """A rich view of a running migration: tasks made by the subclass, one bar a channel.

    ``update`` (the subclass's) runs on whichever thread reports progress; rich refreshes
    the screen from its own thread, reading the tasks under its own lock.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress = Progress(
            TextColumn("{task.description:>12}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._channel_tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def _show_channels(self, stats: MigrationStats) -> None:
        top = max((ch.bytes for ch in stats.channels), default=1) or 1
        for ch in stats.channels:
            task = self._channel_tasks.get(ch.channel)
            if task is None:
                task = self._progress.add_task(ch.channel, total=top, detail="")
                self._channel_tasks[ch.channel] = task
            self._progress.update(
                task, completed=ch.bytes, total=top, detail=f"{ch.bytes / MIB:.0f} MiB"
            )


class LiveView(_View):
    """The sending side's view: the current pass, remaining bytes, channels.

    ``update`` and ``on_pass`` are called from the migrating thread.
    """

    def __init__(self, console: Console, total_bytes: int) -> None:
        super().__init__(console)
        self._lock = threading.Lock()  # guards the pass bookkeeping below
        self._pass = 1
        self._pass_pages = total_bytes // PAGE_SIZE
        self._pages_before = 0  # pages sent before the current pass began
        self._pass_task: TaskID = self._progress.add_task(
            "pass 1", total=self._pass_pages, detail=""
        )

    def on_pass(self, report: PassStats) -> None:
        self._console.print(describe_pass(report), markup=False)
        with self._lock:
            self._pages_before += report.pages
            self._pass = report.number + 1
            self._pass_pages = max(1, report.dirty_pages)
        self._progress.reset(
            self._pass_task, total=self._pass_pages, description=f"pass {self._pass}"
        )

    def update(self, stats: MigrationStats) -> None:
        with self._lock:
            done = stats.normal + stats.duplicate - self._pages_before
        rate = stats.dirty_pages_rate
        held = stats.cpu_throttle_percentage
        self._progress.update(
            self._pass_task,
            completed=min(done, self._pass_pages),
            detail=f"{stats.remaining / MIB:.0f} MiB dirty, {rate:.0f} pages/s dirtied, "
            f"{stats.mbps / 8:.0f} MB/s" + (f", writers held {held} %" if held else ""),
        )
        self._show_channels(stats)


class ReceiveView(_View):
    """The receiving side's view: pages in against the RAM announced, the rate, the syncs
    seen, and one bar a channel.

    ``update`` is called from one progress thread (see :class:`multifd.migration.ticker.
    Ticker`). A source that sends pages again in later passes fills the bar before the end:
    it shows pages received, not pages left.
    """

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self._task: TaskID = self._progress.add_task("waiting", total=None, detail="")

    def update(self, stats: MigrationStats) -> None:
        pages = stats.normal + stats.duplicate
        total = stats.total // PAGE_SIZE or None  # unknown until the source announces it
        self._progress.update(
            self._task,
            description=stats.status.value,
            total=total,
            completed=min(pages, total) if total else pages,
            detail=f"{stats.transferred / MIB:.0f} MiB in, {stats.mbps / 8:.0f} MB/s, "
            f"{stats.dirty_sync_count} syncs",
        )
        self._show_channels(stats)


class JsonLines:
    """Statistics snapshots as JSON lines on stdout, one per ``interval`` seconds at most:
    a script follows a migration by reading them (``--json-progress``). A completed
    snapshot is left to the command, which prints the final statistics as the last line; a
    failed one is printed at once, so the last line says so.

    Called from one thread at a time (the migration's, or a progress ticker's).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self._interval = interval
        self._last = -interval  # time.monotonic() of the last line printed

    def __call__(self, stats: MigrationStats) -> None:
        if stats.status is Status.COMPLETED:
            return
        now = time.monotonic()
        ended = stats.status in (Status.FAILED, Status.CANCELLED)
        if now - self._last < self._interval and not ended:
            return
        self._last = now
        click.echo(json.dumps(stats.to_json()))


@contextlib.contextmanager
def receive_progress(
    *, as_json: bool, json_progress: bool = False
) -> Iterator[Callable[[MigrationStats], None] | None]:
    """For a command that receives, what to pass as ``progress`` while the block runs:
    JSON lines with ``json_progress``; else a :class:`ReceiveView` on stderr when it is a
    terminal and the output is not JSON; else None."""
    if json_progress:
        yield JsonLines()
        return
    if as_json or not err.is_terminal:
        yield None
        return
    with ReceiveView(err) as view:
        yield view.update
