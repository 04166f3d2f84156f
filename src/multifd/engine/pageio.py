"""Moving pages between RAM and sockets without copies, shared by both engine sides.

Pages leave the source as memoryviews over its RAM, one per run of contiguous pages, in a
single ``sendmsg``; they arrive with ``recv_into`` straight into the destination's RAM.
``OSError`` is turned into :class:`~multifd.errors.ChannelError` here, at the boundary.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt

from multifd.errors import ChannelError
from multifd.wire.constants import PAGE_SIZE

Offsets = npt.NDArray[np.int64]


def page_runs(offsets: Offsets) -> list[tuple[int, int]]:
    """``(start, length)`` in bytes of each run of contiguous pages, in the given order."""
    count = len(offsets)
    if count == 0:
        return []
    breaks = np.flatnonzero(np.diff(offsets) != PAGE_SIZE) + 1
    if not len(breaks):
        return [(int(offsets[0]), count * PAGE_SIZE)]
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [count]))
    return [
        (int(offsets[s]), int(e - s) * PAGE_SIZE)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


@contextmanager
def channel_io(channel: str, what: str, timeout: float) -> Iterator[None]:
    """Map socket errors in the block to :class:`ChannelError` naming ``channel``."""
    try:
        yield
    except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: a kernel timer ran out
        raise ChannelError(f"{what} timed out after {timeout:g} s", channel=channel) from exc
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ChannelError(f"{what} failed: {reason}", channel=channel) from exc


def send_buffers(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> int:
    """Write every buffer with as few ``sendmsg`` calls as the kernel allows."""
    pending = [memoryview(b) for b in buffers]
    total = sum(view.nbytes for view in pending)
    index = 0
    while index < len(pending):
        sent = sock.sendmsg(pending[index:] if index else pending)
        while index < len(pending) and sent >= pending[index].nbytes:
            sent -= pending[index].nbytes
            index += 1
        if sent:
            pending[index] = pending[index][sent:]
    return total


def recv_exact(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from ``sock``; returns fewer bytes than asked only at end of stream."""
    got = 0
    size = view.nbytes
    while got < size:
        # MSG_WAITALL: the kernel gathers the whole view in one call where it can.
        count = sock.recv_into(view[got:] if got else view, size - got, socket.MSG_WAITALL)
        if count == 0:
            break
        got += count
    return got
