"""CPU time of a row's two ends, counted over the migration only.

Where both ends share the machine's cores, a row's wall time follows the CPU the two ends
burn together, so the tables give each end's CPU seconds beside its time: user plus system
time of the whole process, every thread, from the start of the migration to its end.

- A QEMU process: read from ``/proc`` before ``migrate`` and once its completion is
  reported (:class:`CpuSpan`).
- ``multifd receive``: read from ``/proc`` as it prints ``listening on`` and ``completed``
  (:func:`receiver_cpu`); pre-allocating before it listens and unmapping after it
  completes are left out.
- A Python send worker: ``time.process_time()`` around ``multifd.send()``, printed by the
  worker itself (:func:`report_cpu`) and read back by :func:`worker_cpu`.

``/proc`` counts in clock ticks, 10 ms at the usual 100 Hz: the figures are medians of
several runs for that reason too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Final

from tests.interop.cli import LISTENING_PREFIX, MultifdProcess, process_cpu

_PREFIX: Final = "cpu "
GIB: Final = 1 << 30


class CpuSpan:
    """The CPU seconds a running process uses from construction to :meth:`stop`."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._before = process_cpu(pid)

    def stop(self) -> float | None:
        """Seconds used so far; None if the process was gone at either end."""
        after = process_cpu(self._pid)
        return None if after is None or self._before is None else after - self._before


def receiver_cpu(receiver: MultifdProcess) -> float | None:
    """What ``multifd receive`` used between listening and completing (after it exited)."""
    listening, completed = receiver.line_cpu(LISTENING_PREFIX), receiver.line_cpu("completed")
    return None if listening is None or completed is None else completed - listening


def report_cpu(send: Callable[[], object]) -> None:
    """In a send worker: run ``send`` and print the CPU seconds it took on stdout."""
    before = time.process_time()
    send()
    print(f"{_PREFIX}{time.process_time() - before:.6f}", flush=True)


def worker_cpu(stdout: str) -> float | None:
    """The CPU seconds a send worker printed with :func:`report_cpu`, if it did."""
    for line in stdout.splitlines():
        if line.startswith(_PREFIX):
            return float(line.removeprefix(_PREFIX))
    return None


def cpu_text(source: Sequence[float], destination: Sequence[float], size: int) -> str:
    """A row's table cell: the medians of both ends' CPU seconds moving ``size`` bytes, per
    GiB (empty where an end was not measured)."""

    def per_gib(samples: Sequence[float]) -> str:
        return f"{statistics.median(samples) * GIB / size:.2f}" if samples else ""

    return f"{per_gib(source)}, {per_gib(destination)}"


CPU_NOTE: Final = (
    "- CPU-s per GiB = median CPU time (user + system, every thread) of each end from the "
    "start of the migration to its end, per GiB of RAM (see benchmarks/cpu.py)"
)
