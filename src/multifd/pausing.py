"""Pausing a writer process at switchover, the way QEMU stops a VM's CPUs.

``SIGSTOP`` cannot be caught or ignored; it takes effect asynchronously, so the pause hook
waits (bounded) until the kernel reports the process stopped before the last dirty pages
are taken. ``SIGCONT`` resumes it on failure or cancel, or after success on request.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Final

from multifd.errors import ConfigError
from multifd.migration.precopy import Hooks

_STOP_BOUND: Final = 5.0  # seconds a SIGSTOP may take to land
_POLL: Final = 0.001


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


def process_hooks(pid: int, *, resume_after_success: bool = False) -> Hooks:
    """Hooks that stop ``pid`` at switchover and continue it on failure or cancel.

    After success the process stays stopped, as QEMU leaves a migrated source paused,
    unless ``resume_after_success``.
    """
    try:
        os.kill(pid, 0)
    except OSError as exc:
        raise ConfigError(f"cannot signal process {pid}: {exc.strerror}") from exc
    return Hooks(
        pause=lambda: stop_process(pid),
        resume=lambda: continue_process(pid),
        stopped=(lambda: continue_process(pid)) if resume_after_success else (lambda: None),
    )
