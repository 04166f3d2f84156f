"""Shared helpers for end-to-end migrations inside one test process."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import multifd
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import PAGE_SIZE

BOUND = 60.0  # seconds any single wait in these tests may take


def make_ram(seed: int, sizes: dict[str, int]) -> Ram:
    """Blocks of random pages, with zero pages and pages repeated from elsewhere."""
    rng = np.random.default_rng(seed)
    blocks = []
    for name, size in sizes.items():
        block = RamBlock.from_bytes(name, rng.bytes(size))
        pages = block.page_count
        block.pages[rng.random(pages) < 0.3] = 0
        repeated = rng.integers(0, pages, size=max(1, pages // 10))
        block.pages[repeated] = block.pages[0]
        blocks.append(block)
    return Ram(blocks)


@dataclass
class ReceiverThread:
    """``multifd.receive`` running on a thread; :meth:`result` joins it."""

    kwargs: dict[str, Any]
    address: queue.Queue[str] = field(default_factory=queue.Queue)
    _outcome: list[multifd.Received | BaseException] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self, listen: str) -> str:
        def run() -> None:
            try:
                self._outcome.append(
                    multifd.receive(listen, on_listening=self.address.put, **self.kwargs)
                )
            except BaseException as exc:  # noqa: BLE001  (handed to the test thread)
                self._outcome.append(exc)

        self._thread = threading.Thread(target=run, name="test-receiver")
        self._thread.start()
        return self.address.get(timeout=BOUND)

    def result(self) -> multifd.Received:
        assert self._thread is not None
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "receiver did not finish"
        outcome = self._outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def assert_same(source: Ram, received: Ram) -> None:
    assert [b.name for b in received] == [b.name for b in source]
    for block in source:
        other = received[block.name]
        assert other.size == block.size
        diff = np.flatnonzero((other.pages != block.pages).any(axis=1))
        assert diff.size == 0, f"block {block.name}: {diff.size} pages differ, first {diff[:5]}"


def migrate_locally(
    listen: str, source: Ram, *, send: Callable[[str], object] | None = None, **kwargs: Any
) -> multifd.Received:
    """Receive on a thread, send from this one, return what arrived."""
    receiver = ReceiverThread(dict(kwargs))
    address = receiver.start(listen)
    if send is None:
        multifd.send(address, source, channels=kwargs.get("channels", 2))
    else:
        send(address)
    return receiver.result()


PAGE = PAGE_SIZE
