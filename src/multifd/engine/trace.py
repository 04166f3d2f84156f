"""A trace hook that sees every multifd packet and main-channel marker, in wire order.

Events carry a sequence number taken from one process-wide counter under one lock, and the
hook is called under that same lock: the order in which a hook sees events is the order of
their ``seq``, across all threads. Send events are emitted right after their bytes were
written, so on each channel ``seq`` order is wire order, and a marker that the migration
layer emits after ``Sender.sync()`` returned comes after every SYNC of that round.

Hooks run on engine threads while the lock is held: keep them short (append to a list) and
never call back into the engine from one.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from multifd.wire.packets import RamPacket

Direction = Literal["send", "recv"]


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One packet written or read on a multifd channel, or one marker of the main channel.

    Attributes:
        seq: position in the process-wide order of trace events.
        direction: ``"send"`` or ``"recv"``.
        channel: ``"main"`` or ``"multifd/N"``.
        packet: the packet header (None for main-channel records).
        record: the main-channel record, e.g. ``"EOS"`` or ``"MULTIFD_FLUSH"`` (None for packets).
    """

    seq: int
    direction: Direction
    channel: str
    packet: RamPacket | None = None
    record: str | None = None


TraceHook = Callable[[TraceEvent], None]

_lock: Final = threading.Lock()  # guards _counter and serialises hook calls in seq order
_counter: Final = itertools.count()


def emit(
    hook: TraceHook | None,
    direction: Direction,
    channel: str,
    *,
    packet: RamPacket | None = None,
    record: str | None = None,
) -> None:
    """Number one event and hand it to ``hook`` (nothing happens when ``hook`` is None)."""
    if hook is None:
        return
    with _lock:
        hook(TraceEvent(next(_counter), direction, channel, packet, record))
