"""CPU time of a row's two ends, counted over the migration only.

Where both ends share the machine's cores, a row's wall time follows the CPU the two ends
burn together, so the tables give each end's CPU seconds beside its time: user plus system
time of the whole process, every thread, from the start of the migration to its end, the
two apart: system time is mostly the kernel copying pages between sockets and memory, the
same work whoever runs it, and user time is the program's own.

- A QEMU process: read from ``/proc`` before ``migrate`` and once its completion is
  reported (:class:`CpuSpan`).
- ``multifd receive``: read from ``/proc`` as it prints ``listening on`` and ``completed``
  (:func:`receiver_cpu`); pre-allocating before it listens and unmapping after it
  completes are left out.
- A Python send worker: ``os.times()`` around ``multifd.send()``, printed by the worker
  itself (:func:`report_cpu`) and read back by :func:`worker_cpu`.

``/proc`` counts in clock ticks, 10 ms at the usual 100 Hz: the figures are medians of
several runs for that reason too.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from typing import Final

from tests.interop.cli import LISTENING_PREFIX, CpuTimes, MultifdProcess, process_cpu

_PREFIX: Final = "cpu "
GIB: Final = 1 << 30


class CpuSpan:
    """The CPU seconds a running process uses from construction to :meth:`stop`."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._before = process_cpu(pid)

    def stop(self) -> CpuTimes | None:
        """Seconds used so far; None if the process was gone at either end."""
        after = process_cpu(self._pid)
        return None if after is None or self._before is None else after - self._before


def receiver_cpu(receiver: MultifdProcess) -> CpuTimes | None:
    """What ``multifd receive`` used between listening and completing (after it exited)."""
    listening, completed = receiver.line_cpu(LISTENING_PREFIX), receiver.line_cpu("completed")
    return None if listening is None or completed is None else completed - listening


def report_cpu(send: Callable[[], object]) -> None:
    """In a send worker: run ``send`` and print the CPU seconds it took on stdout."""
    before = os.times()
    send()
    after = os.times()
    print(f"{_PREFIX}{after.user - before.user:.6f} {after.system - before.system:.6f}", flush=True)


def worker_cpu(stdout: str) -> CpuTimes | None:
    """The CPU seconds a send worker printed with :func:`report_cpu`, if it did."""
    for line in stdout.splitlines():
        if line.startswith(_PREFIX):
            user, system = line.removeprefix(_PREFIX).split()
            return CpuTimes(float(user), float(system))
    return None


def cpu_cells(samples: Sequence[CpuTimes], size: int) -> str:
    """An end's two table cells: the medians of its user and of its system CPU seconds
    moving ``size`` bytes, per GiB (empty where the end was not measured)."""
    if not samples:
        return " | "
    user = statistics.median(times.user for times in samples) * GIB / size
    system = statistics.median(times.system for times in samples) * GIB / size
    return f"{user:.2f} | {system:.2f}"


def cpu_text(source: Sequence[CpuTimes], destination: Sequence[CpuTimes], size: int) -> str:
    """A row's four CPU cells (:data:`CPU_HEADER`): both ends', user and system."""
    return f"{cpu_cells(source, size)} | {cpu_cells(destination, size)}"


CPU_HEADER: Final = "source CPU-s/GiB: user | system | destination: user | system"
CPU_ALIGN: Final = "---:|---:|---:|---:"
CPU_NOTE: Final = (
    "- CPU-s/GiB = median CPU time of each end from the start of the migration to its end, "
    "every thread, per GiB of RAM: user (the program's own code, libzstd included) and "
    "system (the kernel working for it: mostly copying pages between sockets and memory), "
    "see benchmarks/cpu.py"
)
