"""``multifd`` commands as processes that a test can wait on line by line, stop and kill."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Final

BOUND: Final = 60.0  # longest any wait on a process may take


class Cli:
    """One ``python -m multifd ARGS`` process; a context manager that always kills and reaps it.

    Sharing: a drain thread alone appends to ``_lines`` (under ``_cond``) until stderr ends;
    the test thread reads them under ``_cond``.
    """

    def __init__(self, args: Sequence[str]) -> None:
        self.args = " ".join(args)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "multifd", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._cond = threading.Condition()  # guards _lines, _ended; notified on each line
        self._lines: list[str] = []
        self._ended = False
        self._drain = threading.Thread(target=self._read, name="test-cli-stderr")
        self._drain.start()
        self.end: float | None = None  # time.monotonic() when its exit was seen

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr as stream:
            for line in stream:
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def wait_line(self, text: str, timeout: float = BOUND) -> str:
        """The first stderr line containing ``text``, waiting up to ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    raise AssertionError(f"no {text!r} from {self.args}: {self._lines}")
                self._cond.wait(remaining)

    def address(self) -> str:
        return self.wait_line("listening on ").split("listening on ", 1)[1].strip()

    def wait(self, timeout: float = BOUND) -> int:
        """The exit status, waiting up to ``timeout`` (then the test fails)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.args} still runs after {timeout:g} s") from None
        self.end = self.end or time.monotonic()
        return code

    @property
    def stderr(self) -> str:
        self._drain.join(BOUND)
        with self._cond:
            return "".join(self._lines)

    def signal(self, sig: signal.Signals) -> float:
        """Send ``sig``; returns when (``time.monotonic()``)."""
        self.proc.send_signal(sig)
        return time.monotonic()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process must be able to die
            self.proc.kill()
        self.proc.wait(BOUND)
        self._drain.join(BOUND)

    def __enter__(self) -> Cli:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
