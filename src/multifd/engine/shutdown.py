"""The one shutdown path shared by the sender and the receiver.

First error wins: it is recorded with the channel it came from, every waiter is woken
(every semaphore posted, every condition notified, every socket ``shutdown(SHUT_RDWR)`` so
blocked reads and writes return), every thread is joined with a bound, and callers get one
:class:`~multifd.errors.MigrationFailed` chained to the root cause. Errors that threads hit
*because* of the shutdown (a write on a socket that was just shut down) are not failures.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

from multifd.errors import MigrationFailed

# How long close() waits for all threads together; every blocking call in a thread is
# woken by the shutdown, so a thread still alive after this is a bug worth reporting.
JOIN_BOUND: Final = 10.0


class Semaphore:
    """A counting semaphore on ``queue.SimpleQueue``, whose put and get are C code.

    ``Semaphore`` is written in Python over a ``Condition``; the engine posts
    and waits on one several times per packet, where that cost shows.
    """

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()

    def release(self) -> None:
        self._tokens.put(None)

    def acquire(self, timeout: float) -> bool:
        """Take one post; False if none came within ``timeout`` seconds."""
        try:
            self._tokens.get(timeout=timeout)
        except queue.Empty:
            return False
        return True


class Shutdown:
    """Failure state and teardown of a set of channel threads and their sockets."""

    def __init__(self, what: str, log: logging.Logger) -> None:
        self._what = what
        self._log = log
        self._lock = threading.Lock()  # guards error, channel, _closed and the registries
        self._exiting = threading.Event()  # set once: threads must stop, waiters must return
        self.error: BaseException | None = None
        self.channel: str | None = None
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._semaphores: list[Semaphore] = []
        self._wakeups: list[Callable[[], None]] = []

    # -- registration ----------------------------------------------------------------------
    def add(self, sock: socket.socket, thread: threading.Thread, *sems: Semaphore) -> None:
        with self._lock:
            self._sockets.append(sock)
            self._threads.append(thread)
            self._semaphores.extend(sems)
        if self._exiting.is_set():
            self._wake([sock], list(sems), [])

    def add_semaphore(self, sem: Semaphore) -> None:
        with self._lock:
            self._semaphores.append(sem)

    def add_wakeup(self, wakeup: Callable[[], None]) -> None:
        with self._lock:
            self._wakeups.append(wakeup)

    # -- state -----------------------------------------------------------------------------
    @property
    def exiting(self) -> bool:
        return self._exiting.is_set()

    def fail(self, exc: BaseException, channel: str | None) -> None:
        """Record ``exc`` unless an error was recorded or a close began, then stop all."""
        with self._lock:
            if self.error is not None or self._exiting.is_set():
                self._log.debug("ignored after shutdown began (%s): %r", channel, exc)
                return
            self.error = exc
            self.channel = channel if channel is not None else getattr(exc, "channel", None)
        self._log.error("%s failed on %s: %s", self._what, self.channel or "-", exc)
        self.stop()

    def stop(self) -> None:
        """Wake every waiter and shut every socket down; idempotent, never blocks."""
        with self._lock:
            self._exiting.set()
            sockets, sems, wakeups = (
                list(self._sockets),
                list(self._semaphores),
                list(self._wakeups),
            )
        self._wake(sockets, sems, wakeups)

    def close(self) -> None:
        """Stop, join every thread with a bound, close every socket; idempotent."""
        self.stop()
        self.join(JOIN_BOUND)
        with self._lock:
            sockets = [] if self._closed else list(self._sockets)
            self._closed = True
        for sock in sockets:
            sock.close()

    def join(self, timeout: float) -> list[str]:
        """Join the registered threads within ``timeout`` overall; names still alive."""
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        with self._lock:
            threads = [t for t in self._threads if t is not current and t.ident is not None]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            self._log.error("%s: threads still running after %g s: %s", self._what, timeout, alive)
        return alive

    def raise_if_failed(self) -> None:
        """If an error was recorded: tear everything down and raise it as MigrationFailed."""
        error = self.error
        if error is None:
            return
        self.close()
        text = str(error)
        if self.channel and not text.startswith(self.channel):
            text = f"{self.channel}: {text}"
        failed = MigrationFailed(f"{self._what} failed: {text}")
        failed.channel = self.channel
        raise failed from error

    def raise_if_stopped(self) -> None:
        """Like :meth:`raise_if_failed`, and also raise after a clean close."""
        self.raise_if_failed()
        if self._exiting.is_set():
            raise MigrationFailed(f"{self._what} is closed")

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _wake(
        sockets: list[socket.socket],
        sems: list[Semaphore],
        wakeups: list[Callable[[], None]],
    ) -> None:
        for sem in sems:
            sem.release()
        for wakeup in wakeups:
            wakeup()
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed: nothing left to wake
                sock.shutdown(socket.SHUT_RDWR)


class Stoppable:
    """The failure and teardown surface :class:`Sender` and :class:`Receiver` share.

    Subclasses set ``self.shutdown`` in their constructor; every method here may be
    called from any thread.
    """

    shutdown: Shutdown

    def check(self) -> None:
        """Raise the first failure, if any, without waiting.

        Raises:
            MigrationFailed: chained to the first error, naming its channel.
        """
        self.shutdown.raise_if_failed()

    def close(self) -> None:
        """Stop every thread and close every socket; idempotent."""
        self.shutdown.close()

    def abort(self, exc: BaseException) -> None:
        """Fail with ``exc`` (first error wins) and stop everything."""
        self.shutdown.fail(exc, None)
        self.shutdown.close()

    @property
    def failed(self) -> bool:
        return self.shutdown.error is not None

    @property
    def error(self) -> BaseException | None:
        """The first error, or None."""
        return self.shutdown.error
