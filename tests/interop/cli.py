"""The ``multifd`` command line as subprocesses: a receiver that listens, a sender that runs.

Both run as ``[sys.executable, "-m", "multifd", ...]``, exactly as a user would. The
receiver announces its address as the first line of its stderr (``listening on ADDRESS``);
a drain thread reads stderr so the child never blocks on a full pipe, and signals when that
first line is in, and notes when each line came and how much CPU the child had used by
then (the benchmarks count a migration's CPU between two lines). Exits are awaited through
a pidfd so the child's own peak RSS comes back from ``wait4`` (``RUSAGE_CHILDREN`` would
mix in every QEMU the caller ran).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

LISTENING_PREFIX: Final = "listening on "
# A drain thread gets this long to see EOF after its process is gone.
_DRAIN_JOIN: Final = 5.0
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """CPU seconds of a process, every thread: in its own code and in the kernel for it."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, earlier: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - earlier.user, self.system - earlier.system)


def process_cpu(pid: int) -> CpuTimes | None:
    """CPU seconds (user and system, every thread) process ``pid`` used so far; None if gone.

    From ``/proc/PID/stat``, in clock ticks (10 ms at the usual 100 Hz).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return CpuTimes(int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS)


class CliError(Exception):
    """A ``multifd`` subprocess did not start, announce itself or exit in time."""


@dataclass(frozen=True, slots=True)
class CliResult:
    """How a ``multifd`` subprocess ended.

    Attributes:
        returncode: exit status (negative: killed by that signal).
        stdout: everything it printed on stdout.
        stderr: everything it printed on stderr.
        max_rss: its peak resident set size in bytes (from ``wait4``).
        end_time: ``time.time()`` when its exit was noticed.
    """

    returncode: int
    stdout: str
    stderr: str
    max_rss: int
    end_time: float

    def json(self) -> dict[str, Any]:
        """The JSON object printed on stdout (``--json``)."""
        data: dict[str, Any] = json.loads(self.stdout)
        return data


def multifd_command(*args: str) -> list[str]:
    """``python -m multifd ARGS`` with the running interpreter."""
    return [sys.executable, "-m", "multifd", *args]


def receive_args(
    address: str,
    *,
    channels: int,
    output: Path,
    uuid: str | None = None,
    json_out: bool = True,
    prealloc: dict[str, int] | None = None,
    compression: str = "none",
) -> list[str]:
    """Arguments of ``multifd receive``."""
    args = ["receive", address, "--channels", str(channels), "--output", str(output)]
    args += ["--compression", compression] if compression != "none" else []
    args += ["--uuid", uuid] if uuid else []
    for name, size in (prealloc or {}).items():
        args += ["--prealloc", f"{name}={size}"]
    return args + (["--json"] if json_out else [])


def send_args(
    address: str,
    blocks: dict[str, Path],
    *,
    channels: int,
    peer: str = "native",
    uuid: str | None = None,
    json_out: bool = True,
    compression: str = "none",
    level: int | None = None,
) -> list[str]:
    """Arguments of ``multifd send``."""
    args = ["send", address, "--channels", str(channels), "--peer", peer]
    args += ["--compression", compression] if compression != "none" else []
    args += ["--level", str(level)] if level is not None else []
    for name, path in blocks.items():
        args += ["--block", f"{name}={path}"]
    args += ["--uuid", uuid] if uuid else []
    return args + (["--json"] if json_out else [])


def as_uri(address: str) -> str:
    """A QEMU migration URI for an address the CLI printed (``tcp:`` when none is given)."""
    return address if address.startswith(("tcp:", "unix:")) else f"tcp:{address}"


class MultifdProcess:
    """One ``multifd`` subprocess; a context manager that always kills it.

    Sharing: ``_proc``, ``_stdout`` and the result are owned by the driving thread. The
    drain thread alone appends to ``_lines`` (under ``_lines_changed``) until it ends; the
    driving thread reads them under that condition while it runs, and freely after joining.
    """

    def __init__(self, args: Sequence[str], *, timeout: float) -> None:
        """Start ``python -m multifd ARGS``.

        Args:
            args: the arguments after ``python -m multifd``.
            timeout: the default bound for :meth:`wait`.
        """
        self.timeout = timeout
        self.start_time = time.time()
        self._stdout: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            multifd_command(*args),
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=subprocess.PIPE,
        )
        self._lines: list[str] = []
        self._line_times: list[float] = []  # time.time() when each stderr line arrived
        self._line_cpu: list[CpuTimes | None] = []  # process_cpu() of the child by then
        self._lines_changed = threading.Condition()  # signals: a line arrived, or stderr hit EOF
        self._stderr_ended = False  # set by the drain thread under _lines_changed
        self._drain = threading.Thread(target=self._read_stderr, name="multifd-stderr")
        self._drain.start()
        self.result: CliResult | None = None

    def __enter__(self) -> MultifdProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """The subprocess id."""
        return self._proc.pid

    def first_line(self, timeout: float) -> str:
        """The first stderr line; raises :class:`CliError` if none comes in ``timeout``."""
        with self._lines_changed:
            if not self._lines_changed.wait_for(lambda: self._lines or self._stderr_ended, timeout):
                raise CliError(f"no output from {self._describe()} within {timeout:.1f}s")
        if not self._lines:
            self.wait(self.timeout)
            raise CliError(f"{self._describe()} exited silently: {self.result}")
        return self._lines[0]

    def listening_address(self, timeout: float) -> str:
        """The address from the ``listening on ADDRESS`` line."""
        line = self.first_line(timeout)
        if not line.startswith(LISTENING_PREFIX):
            raise CliError(f"first stderr line is {line!r}, expected {LISTENING_PREFIX!r}...")
        return line.removeprefix(LISTENING_PREFIX).strip()

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first stderr line that ``pattern`` matches (``re.search``), waiting up to
        ``timeout`` for it; raises :class:`CliError` if none comes before then or EOF."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        with self._lines_changed:
            while True:
                found = next(filter(None, map(regex.search, self._lines)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if self._stderr_ended or left <= 0:
                    why = "closed its stderr" if self._stderr_ended else f"ran {timeout:g} s"
                    raise CliError(
                        f"{self._describe()} {why} without a line matching {pattern!r}: "
                        f"{''.join(self._lines)[-500:]!r}"
                    )
                self._lines_changed.wait(left)

    def line_time(self, prefix: str) -> float | None:
        """When the first stderr line starting with ``prefix`` arrived (after :meth:`wait`)."""
        assert self.result is not None, "line_time() needs the process to have ended"
        for when, line in zip(self._line_times, self._lines, strict=True):
            if line.startswith(prefix):
                return when
        return None

    def line_cpu(self, prefix: str) -> CpuTimes | None:
        """The child's CPU seconds when the first stderr line starting with ``prefix``
        arrived (after :meth:`wait`); None without such a line, or if it was gone by then."""
        assert self.result is not None, "line_cpu() needs the process to have ended"
        for cpu, line in zip(self._line_cpu, self._lines, strict=True):
            if line.startswith(prefix):
                return cpu
        return None

    def wait(self, timeout: float | None = None) -> CliResult:
        """Wait for exit (kill on timeout) and return how it ended."""
        if self.result is not None:
            return self.result
        bound = self.timeout if timeout is None else timeout
        status, max_rss, timed_out = _wait_with_rusage(self._proc, bound)
        end_time = time.time()
        self._drain.join(_DRAIN_JOIN)
        self._stdout.seek(0)
        stdout = self._stdout.read().decode(errors="replace")
        self.result = CliResult(status, stdout, "".join(self._lines), max_rss, end_time)
        if timed_out:
            raise CliError(f"{self._describe()} did not exit within {bound:.1f}s: {self.result}")
        return self.result

    def close(self) -> None:
        """Kill the process if it still runs, reap it, stop the drain thread (idempotent)."""
        if self.result is None:
            if self._proc.poll() is None:
                self._proc.kill()
            self.wait(self.timeout)
        self._drain.join(_DRAIN_JOIN)
        self._stdout.close()

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        with self._proc.stderr as stream:
            for raw in stream:
                self._line_times.append(time.time())
                self._line_cpu.append(process_cpu(self._proc.pid))
                with self._lines_changed:
                    self._lines.append(raw.decode(errors="replace"))
                    self._lines_changed.notify_all()
        with self._lines_changed:
            self._stderr_ended = True
            self._lines_changed.notify_all()

    def _describe(self) -> str:
        return " ".join(self._proc.args[2:] if isinstance(self._proc.args, list) else [])


def _wait_with_rusage(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, int, bool]:
    """Reap ``proc``, killing it after ``timeout``.

    Returns:
        (exit status, peak RSS in bytes, whether it had to be killed for the timeout).
    """
    if proc.returncode is not None:
        return proc.returncode, 0, False
    pidfd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            proc.kill()
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        os.close(pidfd)
    # We reaped the child ourselves, so tell Popen its status (it would otherwise read 0).
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, not ready
