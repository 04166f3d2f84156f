"""Pausing a writer process at switchover, the way QEMU stops a VM's CPUs.

``SIGSTOP`` cannot be caught or ignored; it takes effect asynchronously, so the pause hook
waits (bounded) until the kernel reports the process stopped before the last dirty pages
are taken. ``SIGCONT`` resumes it on failure or cancel, or after success on request.

Auto-converge throttles the process the same way: :class:`ProcessThrottle` stops it for a
fraction of every 20 ms and continues it for the rest, as QEMU makes each vCPU sleep a
fraction of every 10 ms slice (signals cost more than a vCPU's sleep, hence the longer
slice).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Final

from multifd.errors import ConfigError
from multifd.migration.precopy import Hooks

_STOP_BOUND: Final = 5.0  # seconds a SIGSTOP may take to land
_POLL: Final = 0.001
_SLICE: Final = 0.02  # seconds: a throttled process is stopped a fraction of each
_JOIN_BOUND: Final = 5.0  # seconds the throttle's thread may take to finish its slice


def _state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc (``T``: stopped)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def stop_process(pid: int, timeout: float = _STOP_BOUND) -> None:
    """Send SIGSTOP and return once ``pid`` is stopped; ConfigError if it never stops."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while _state(pid) not in ("T", "t"):
        if time.monotonic() > deadline:
            raise ConfigError(f"process {pid} did not stop within {timeout:g} s")
        time.sleep(_POLL)  # the kernel gives no stop notification to a non-parent


def continue_process(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


class ProcessThrottle:
    """Holds process ``pid`` a fraction of the time: stopped for that fraction of every
    slice, running for the rest.

    :meth:`set` and :meth:`end` are called from one thread (the migration's); the duty
    cycle runs on a thread of its own, started by the first non-zero :meth:`set`.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fraction = 0.0  # written by set(), read by the duty thread (one float)
        self._done = threading.Event()  # signals: the duty thread must end its cycle
        self._thread: threading.Thread | None = None

    def set(self, fraction: float) -> None:
        """Hold the process ``fraction`` of the time; 0 lets it run freely again."""
        self._fraction = fraction
        if not fraction:
            self.end()
        elif self._thread is None:
            self._done.clear()
            self._thread = threading.Thread(target=self._cycle, name="multifd-throttle")
            self._thread.start()

    def end(self) -> None:
        """Stop throttling and leave the process running (a no-op when not throttling)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._done.set()
        thread.join(_JOIN_BOUND)
        if thread.is_alive():
            raise ConfigError(f"the throttle of process {self.pid} did not end")

    def _cycle(self) -> None:
        try:
            while not self._done.is_set():
                held = self._fraction * _SLICE
                os.kill(self.pid, signal.SIGSTOP)
                self._done.wait(held)
                os.kill(self.pid, signal.SIGCONT)
                self._done.wait(_SLICE - held)
        except ProcessLookupError:
            return  # the process is gone: nothing left to hold
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)


def process_hooks(pid: int, *, resume_after_success: bool = False) -> Hooks:
    """Hooks that stop ``pid`` at switchover and continue it on failure or cancel, and
    throttle it for auto-converge.

    After success the process stays stopped, as QEMU leaves a migrated source paused,
    unless ``resume_after_success``.
    """
    try:
        os.kill(pid, 0)
    except OSError as exc:
        raise ConfigError(f"cannot signal process {pid}: {exc.strerror}") from exc
    throttle = ProcessThrottle(pid)

    def pause() -> None:
        throttle.end()  # it leaves the process running: the stop below is the last word
        stop_process(pid)

    return Hooks(
        pause=pause,
        resume=lambda: continue_process(pid),
        stopped=(lambda: continue_process(pid)) if resume_after_success else (lambda: None),
        throttle=throttle.set,
    )
