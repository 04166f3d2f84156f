"""Harness for the engine tests: channel pairs, a loader thread, invariant checks on traces."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, Literal

from multifd.engine.recv import Receiver
from multifd.engine.send import Sender
from multifd.engine.trace import TraceEvent, emit
from multifd.errors import MAIN, multifd_channel
from multifd.ram import Ram
from multifd.wire.constants import MULTIFD_FLAG_SYNC
from multifd.wire.packets import RamPacket

# shared/ is the sibling of the repository root (tests/engine/helpers.py -> parents[2]).
SHARED: Final = Path(__file__).resolve().parents[2].parent / "shared"
VECTORS: Final = SHARED / "vectors" / "qemu-7.2"
TIMEOUT: Final = 10.0  # bound of every wait in these tests; never reached when all is well

Transport = Literal["socketpair", "tcp"]
TRANSPORTS: Final[tuple[Transport, ...]] = ("socketpair", "tcp")


def make_pairs(count: int, transport: Transport) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` connected (source end, destination end) socket pairs."""
    if transport == "socketpair":
        return [socket.socketpair() for _ in range(count)]
    pairs = []
    with socket.create_server(("127.0.0.1", 0), backlog=count) as listener:
        listener.settimeout(TIMEOUT)
        for _ in range(count):
            client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
            server, _ = listener.accept()
            pairs.append((client, server))
    return pairs


class Recorder:
    """A trace hook that keeps every event; also emits the test's own main-channel markers."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []  # appended under the trace module's lock

    def __call__(self, event: TraceEvent) -> None:
        self.events.append(event)

    def marker(self, record: str = "MULTIFD_FLUSH") -> None:
        """What the migration layer does right after ``Sender.sync()`` returned."""
        emit(self, "send", MAIN, record=record)

    def sent(self) -> list[TraceEvent]:
        return sorted((e for e in self.events if e.direction == "send"), key=lambda e: e.seq)

    def packets(self, direction: str, channel: str) -> list[RamPacket]:
        return [
            e.packet
            for e in sorted(self.events, key=lambda e: e.seq)
            if e.direction == direction and e.channel == channel and e.packet is not None
        ]


def check_send_invariants(events: Sequence[TraceEvent], channels: int) -> int:
    """Check I1, I2 and I3 on a send trace; returns the number of markers seen."""
    since_marker = dict.fromkeys((multifd_channel(i) for i in range(channels)), 0)
    markers = 0
    for event in sorted((e for e in events if e.direction == "send"), key=lambda e: e.seq):
        if event.record is not None:
            assert since_marker == dict.fromkeys(since_marker, 1), (  # I3
                f"marker {markers} preceded by SYNCs {since_marker}"
            )
            since_marker = dict.fromkeys(since_marker, 0)
            markers += 1
            continue
        packet = event.packet
        assert packet is not None
        if packet.is_sync:
            assert packet.flags == MULTIFD_FLAG_SYNC, packet  # no method bits on a SYNC
            assert packet.normal_pages == packet.zero_pages == 0, packet  # I1
            since_marker[event.channel] += 1
        else:
            assert packet.page_count > 0, packet  # I2
    return markers


class Loader:
    """The destination's main-stream loader: one ``wait_sync`` per marker, fed by a queue.

    ``check(round)`` runs right after each ``wait_sync`` returned, before the loader takes
    the next marker: that is where I4 holds.
    """

    def __init__(self, receiver: Receiver, check: Callable[[int], None] | None = None) -> None:
        self._receiver = receiver
        self._check = check
        self._markers: queue.Queue[int | None] = queue.Queue(maxsize=2)  # bounded: backpressure
        self._done: queue.Queue[int | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="test-loader")
        self._thread.start()

    def marker(self, round_: int) -> None:
        """Queue one marker; raises the loader's error if it died."""
        for _ in range(int(TIMEOUT / 0.05)):
            if not self._thread.is_alive():
                self.result()
            try:
                self._markers.put(round_, timeout=0.05)
            except queue.Full:
                continue
            return
        raise TimeoutError("the loader took no marker")

    def result(self) -> int:
        item = self._done.get(timeout=TIMEOUT)
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):  # the loader died with a full queue
                self._markers.put(None, timeout=TIMEOUT)
        self._thread.join(TIMEOUT)

    def _run(self) -> None:
        while True:
            try:
                round_ = self._markers.get(timeout=TIMEOUT)
            except queue.Empty:
                return
            if round_ is None:
                return
            try:
                self._receiver.wait_sync(TIMEOUT)
                if self._check is not None:
                    self._check(round_)
            except BaseException as exc:  # noqa: BLE001 - the test thread raises it
                self._done.put(exc)
                return
            self._done.put(round_)


@contextmanager
def link(
    dst: Ram,
    channels: int,
    transport: Transport = "socketpair",
    *,
    recorder: Recorder | None = None,
    detect_zero_pages: bool = False,
    compression: str = "none",
    before_start: Callable[[Sender], None] | None = None,
    packets_per_job: int = 4,
    backpressure: Callable[[], None] | None = None,
) -> Iterator[tuple[Sender, Receiver, list[tuple[socket.socket, socket.socket]]]]:
    """A started Sender wired to a Receiver (into ``dst``) whose channels are all accepted.

    ``before_start`` may instrument the sender before its threads exist; ``backpressure``
    goes to the receiver.
    """
    pairs = make_pairs(channels, transport)
    sender = Sender(
        [a for a, _ in pairs],
        trace=recorder,
        io_timeout=TIMEOUT,
        compression=compression,
        detect_zero_pages=detect_zero_pages,
        packets_per_job=packets_per_job,
    )
    receiver = Receiver(
        dst, channels=channels, trace=recorder, io_timeout=TIMEOUT, compression=compression,
        backpressure=backpressure,
    )  # fmt: skip
    try:
        if before_start is not None:
            before_start(sender)
        sender.start()
        for _, b in pairs:
            receiver.accept_channel(b, TIMEOUT)
        yield sender, receiver, pairs
    finally:
        sender.close()
        receiver.close()
        for a, b in pairs:
            a.close()
            b.close()


def engine_threads(prefixes: tuple[str, ...] = ("send-", "recv-")) -> list[str]:
    """Names of live engine threads (all of them, or those whose name starts so)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(prefixes)]
