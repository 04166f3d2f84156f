"""Suite-wide fixtures: every test fails if it leaves a thread running."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

# Threads get this long to finish after a test before they count as leaked; a thread
# that is still alive then is a bug in the code under test (I6), never a slow machine.
_JOIN_BOUND = 10.0


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for thread in leaked:
        thread.join(_JOIN_BOUND)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked threads: {still}"
