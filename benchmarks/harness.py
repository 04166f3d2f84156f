"""What every benchmark shares: rows and their runs, the processes, the report's pieces.

A row is one measured configuration (:class:`Row`), run several times by :func:`run_once`
against the same :class:`Setup`. Python ends run as processes of their own, as a user
runs them: ``multifd receive`` on the command line (:func:`receiver_process`, judged by
:func:`finish_receive`), ``multifd.send()`` in a worker started and idle before the clock
(:func:`run_send_worker`). :func:`publish` prints a report and saves it in ``results/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpu import receiver_cpu, worker_cpu  # noqa: E402 - needs the repository root on sys.path
from tests.interop.cli import CpuTimes, MultifdProcess, as_uri, receive_args  # noqa: E402
from tests.interop.qemu import BLOCK_NAME, QEMU_BINARY, ram_mismatch  # noqa: E402

RESULTS: Final = Path(__file__).resolve().parent / "results"
MIB: Final = 1 << 20
# Lifts QEMU's 128 MiB/s max-bandwidth default on every QEMU source.
FAST: Final = 10 << 30


@dataclass
class Row:
    """One measured configuration."""

    name: str
    seconds: float | None = None
    receiver_rss: int | None = None  # peak RSS of `multifd receive`, bytes
    target: str = ""
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)  # seconds of each run
    source_cpu: list[CpuTimes] = field(default_factory=list)  # CPU of each run's source
    destination_cpu: list[CpuTimes] = field(default_factory=list)  # and of its destination

    def add_cpu(
        self, *, source: CpuTimes | None = None, destination: CpuTimes | None = None
    ) -> None:
        """Note one run's CPU seconds (see cpu.py); None: not measured."""
        if source is not None:
            self.source_cpu.append(source)
        if destination is not None:
            self.destination_cpu.append(destination)


@dataclass(frozen=True)
class Setup:
    """What every row needs: the image, its size, a scratch directory, the bounds."""

    image: Path
    size: int
    scratch: Path
    timeout: float


@contextlib.contextmanager
def receiver_process(
    setup: Setup, channels: int, compression: str = "none", extra_args: Sequence[str] = ()
) -> Iterator[tuple[MultifdProcess, str, Path]]:
    """A pre-allocated ``multifd receive`` listening on a free port, and its output folder.

    ``extra_args`` go on its command line after the usual ones (TLS options, say).
    """
    output = Path(tempfile.mkdtemp(prefix="received-", dir=setup.scratch))
    try:
        args = receive_args(
            "tcp:127.0.0.1:0",
            channels=channels,
            output=output,
            json_out=False,
            prealloc={BLOCK_NAME: setup.size},
            compression=compression,
        )
        with MultifdProcess([*args, *extra_args], timeout=setup.timeout) as receiver:
            yield receiver, as_uri(receiver.listening_address(setup.timeout)), output
    finally:
        for leftover in output.iterdir():
            leftover.unlink()
        output.rmdir()


def run_send_worker(
    script: str,
    args: list[str],
    uri: str,
    timeout: float,
    *,
    on_ready: Callable[[int], None] | None = None,
    row: Row | None = None,
) -> float:
    """Start ``script args`` (a worker that prints ``ready`` and then sends to the URI it
    reads on stdin), give it ``uri`` and wait for it; returns when the clock started.

    ``on_ready`` gets the worker's pid once it is ready, before the clock starts; ``row``
    gets the CPU seconds the worker reported (cpu.report_cpu).
    """
    worker = subprocess.Popen(
        [sys.executable, script, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        if worker.stdout.readline().strip() != "ready":
            raise RuntimeError(f"send worker did not start: {worker.communicate()[1][-300:]}")
        if on_ready is not None:
            on_ready(worker.pid)
        start = time.time()
        output, errors = worker.communicate(uri + "\n", timeout=timeout)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    if worker.returncode != 0:
        raise RuntimeError(f"multifd.send() failed: {errors.strip()[-300:]}")
    if row is not None:
        row.add_cpu(source=worker_cpu(output))
    return start


def finish_receive(
    setup: Setup, row: Row, receiver: MultifdProcess, output: Path, start: float
) -> None:
    """Wait for ``multifd receive``, time the row from ``start`` to its ``completed`` line,
    note its peak RSS and check that what it wrote equals the image."""
    result = receiver.wait(setup.timeout)
    require_ok("receive", result.returncode, result.stderr)
    row.seconds = completed_at(receiver, result.end_time) - start
    row.receiver_rss = result.max_rss
    row.add_cpu(destination=receiver_cpu(receiver))
    check_same(setup.image, output / BLOCK_NAME)


def completed_at(receiver: MultifdProcess, exited: float) -> float:
    """When ``multifd receive`` printed its ``completed`` line (its exit if it did not)."""
    return receiver.line_time("completed") or exited


def require_ok(what: str, returncode: int, stderr: str) -> None:
    if returncode != 0:
        last = stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        raise RuntimeError(f"multifd {what} exited {returncode}: {last[0]}")


def check_same(expected: Path, actual: Path) -> None:
    problem = ram_mismatch(expected, actual)
    if problem is not None:
        raise RuntimeError(f"destination differs: {problem}")


def run_once(func: Callable[[Setup, Row], None], setup: Setup, row: Row) -> None:
    trial = Row(row.name)
    try:
        func(setup, trial)
    except Exception as exc:  # noqa: BLE001 - a row's failure is a result, not a crash
        row.error = f"{type(exc).__name__}: {exc}"[:300]
        return
    assert trial.seconds is not None
    row.samples.append(trial.seconds)
    row.notes = trial.notes
    row.source_cpu += trial.source_cpu
    row.destination_cpu += trial.destination_cpu
    if trial.receiver_rss is not None:
        row.receiver_rss = max(row.receiver_rss or 0, trial.receiver_rss)


def mb_per_s(size: int, row: Row | None) -> float | None:
    if row is None or row.seconds is None or row.error or row.seconds <= 0:
        return None
    return size / row.seconds / 1e6


def seconds_text(row: Row) -> str:
    if row.seconds is None:
        return ""
    if len(row.samples) < 2:
        return f"{row.seconds:.3f}"
    return f"{row.seconds:.3f} ({min(row.samples):.2f}-{max(row.samples):.2f})"


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def machine() -> dict[str, str]:
    """What the numbers depend on."""
    qemu = subprocess.run(
        [QEMU_BINARY, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.splitlines()
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    return {
        "cpu": f"{model} x {os.cpu_count()}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu[0] if qemu else "not found",
        "load average (1, 5, 15 min) after the run": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def publish(name: str, markdown: str, data: dict[str, Any], *, save: bool) -> None:
    """Print the report; with ``save``, also write results/<name>-<today>.md and .json."""
    print(markdown)
    if not save:
        return
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d')}.md"
    path.write_text(markdown)
    path.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"saved {path} and {path.with_suffix('.json').name}", file=sys.stderr)


PREALLOC_NOTE: Final = (
    "- destinations pre-allocate their RAM before the clock starts (QEMU prealloc=on, "
    "`multifd receive --prealloc`)"
)


def parse_size(text: str) -> int:
    """``2G``, ``512M``, ``64K`` or a byte count."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def verdict(value: float | None, wanted: float) -> str:
    """A target's result: met, MISSED, or not measured."""
    if value is None:
        return "not measured"
    return "met" if value >= wanted else "MISSED"
