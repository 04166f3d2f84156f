"""Running a relay, a recorder and the VM commands of the CLI from tests."""

from __future__ import annotations

import contextlib
import queue
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar
from unittest import mock

import numpy as np

import tests.interop.cli
from multifd.dirty import DirtyLog, Pages
from multifd.ram import Ram
from multifd.wire import return_path as rp
from multifd.wire.constants import PAGE_SIZE
from tests.interop.cli import MultifdProcess

BOUND = 60.0  # seconds any single wait may take
_T = TypeVar("_T")

# ``python -m multifd`` with the VM commands registered, whether cli.py does it yet or not.
_LAUNCH = (
    "from multifd.cli import main; from multifd.cli_vm import register; "
    "register(main); main(prog_name='multifd')"
)


class Listening(Generic[_T]):
    """A listening call (``relay``, ``record``, ``receive``) on a thread.

    The call gets ``on_listening``; :meth:`start` returns the address it announced and
    :meth:`result` joins the thread and returns (or raises) what the call did.
    """

    def __init__(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> None:
        self._address: queue.Queue[str] = queue.Queue()
        self._outcome: list[_T | BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(call, args, kwargs), name="test-listening"
        )

    def _run(self, call: Callable[..., _T], args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        try:
            self._outcome.append(call(*args, on_listening=self._address.put, **kwargs))
        except BaseException as exc:  # noqa: BLE001  (handed to the test thread)
            self._outcome.append(exc)
            self._address.put("")

    def start(self) -> str:
        self._thread.start()
        address = self._address.get(timeout=BOUND)
        if not address:
            self.result()  # raises what failed
        return address

    def outcome(self) -> _T | BaseException:
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "the listening call did not finish"
        return self._outcome[0]

    def result(self) -> _T:
        outcome = self.outcome()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class DirtyingLog(DirtyLog):
    """A dirty log whose RAM is rewritten before each of its first takes after the first
    pass, so later passes (and the switchover) carry pages.

    Each time it writes new data into some pages and zeroes some pages that held data: a
    relay must forward both kinds of change.
    """

    def __init__(self, ram: Ram, seed: int, rewrites: int = 3) -> None:
        super().__init__(ram)
        self.rng = np.random.default_rng(seed)
        self.rewrites = rewrites

    def take(self, *, everything: bool = False) -> dict[str, Pages]:
        if not everything and self.rewrites:
            self.rewrites -= 1
            self._rewrite()
        return super().take(everything=everything)

    def _rewrite(self) -> None:
        for block in self.ram:
            pages = self.rng.choice(block.page_count, size=max(2, block.page_count // 8))
            half = len(pages) // 2
            block.pages[pages[:half]] = self.rng.integers(1, 256, (half, PAGE_SIZE), np.uint8)
            block.pages[pages[half:]] = 0
            self.mark_pages(block, pages.astype(np.int64))


def vm_cli(args: Sequence[str], *, timeout: float) -> MultifdProcess:
    """``multifd ARGS`` as a subprocess, with ``relay``/``record``/``replay`` available."""
    command = [sys.executable, "-c", _LAUNCH]
    with mock.patch.object(tests.interop.cli, "multifd_command", lambda *a: [*command, *a]):
        return MultifdProcess(args, timeout=timeout)


class LateFailingDestination:
    """A destination that reads every channel to its end, then answers SHUT(1) on the
    return path: a QEMU that fails while it loads the device state, after the last byte.

    One thread accepts the connections in order (the first is the main channel, as our
    sources connect it first) and starts a reader per connection; :meth:`close` joins
    them all.
    """

    def __init__(self, channels: int) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(BOUND)
        self.address = f"tcp:127.0.0.1:{self._server.getsockname()[1]}"
        self._readers: list[threading.Thread] = []  # appended by the acceptor until joined
        self._acceptor = threading.Thread(
            target=self._accept, args=(1 + channels,), name="late-fail-accept"
        )
        self._acceptor.start()

    def _accept(self, count: int) -> None:
        for index in range(count):
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            reader = threading.Thread(
                target=self._read, args=(sock, index == 0), name=f"late-fail-{index}"
            )
            self._readers.append(reader)
            reader.start()

    @staticmethod
    def _read(sock: socket.socket, main: bool) -> None:
        with contextlib.suppress(OSError), sock:
            sock.settimeout(BOUND)
            while sock.recv(1 << 16):
                pass
            if main:
                sock.sendall(rp.shut(1))

    def close(self) -> None:
        self._acceptor.join(BOUND)
        for reader in self._readers:
            reader.join(BOUND)
        self._server.close()
