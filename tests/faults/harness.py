"""Fault injection for migrations between Python peers: a TCP proxy that breaks a channel on cue.

Theory of operation. The source connects to the proxy instead of the destination; for each
connection the proxy connects to the real destination and relays both directions, one
thread each. The source-to-destination relay follows the stream with a
:class:`~tests.faults.streams.StreamWalker`, so a fault can be placed at a record or packet
("the 3rd SYNC packet on multifd/1, 100 bytes in", "the ``SectionEnd`` record on main") or
at a byte offset. Bytes are forwarded only up to the walker's safe offset, so a fault fires
exactly where it was placed, however the kernel chunks the stream.

A fault acts on one leg of one connection: the *source* leg (the socket the source writes)
or the *destination* leg (the socket the destination reads). The other leg of that
connection is left open and silent: its end learns of the fault only through the peer's
reaction on the other channels, or through its own I/O timeout. That is the hard case for
both ends, and the one a real network produces when one side's socket dies first.

* ``close``: the leg is closed (a FIN; later data from the source draws a RST);
* ``reset``: ``SO_LINGER`` 0 then close: a RST;
* ``stall``: the proxy stops reading and writing the connection, both legs stay open;
* ``corrupt``: ``length`` bytes are inverted on their way to the destination, and the
  relay goes on.

Connections without a fault are relayed faithfully: an EOF is passed on as a half-close, a
reset as a reset, a write that fails resets the other end. No production code has a hook.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal

from multifd.address import parse_address
from tests.faults.streams import UNKNOWN, StreamWalker, Unit

Kind = Literal["close", "reset", "stall", "corrupt"]
Side = Literal["source", "destination"]
_Action = Literal["close", "reset", "leave"]

BOUND: Final = 30.0  # longest any proxy wait may take; teardown wakes them all sooner
_CHUNK: Final = 1 << 16
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST


@dataclass(frozen=True, slots=True)
class At:
    """Where a fault fires on a channel.

    Attributes:
        channel: ``main`` or ``multifd/N``.
        unit: a unit kind (see :class:`~tests.faults.streams.Unit`) or ``byte``.
        nth: which unit of that kind (1 = the first); ignored for ``byte``.
        delta: bytes after the unit's first byte (for ``byte``: the stream offset).
    """

    channel: str
    unit: str = "byte"
    nth: int = 1
    delta: int = 0

    def offset(self, unit: Unit) -> int | None:
        """The stream offset where the fault fires, if ``unit`` is the one meant."""
        if (unit.channel, unit.kind, unit.nth) != (self.channel, self.unit, self.nth):
            return None
        return unit.start + self.delta

    def __str__(self) -> str:
        if self.unit == "byte":
            return f"{self.channel} byte {self.delta}"
        return f"{self.channel} {self.unit} #{self.nth} +{self.delta}"


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: what happens, where, and on which leg."""

    kind: Kind
    at: At
    side: Side = "destination"
    length: int = 1  # corrupt: bytes inverted

    def __post_init__(self) -> None:
        if self.kind == "corrupt" and self.side != "destination":
            raise ValueError("only the source-to-destination direction carries data to corrupt")

    def __str__(self) -> str:
        return f"{self.kind} {self.side} leg at {self.at}"


@dataclass(frozen=True, slots=True)
class Fired:
    """A fault that happened: where exactly and when (``time.monotonic()``)."""

    fault: Fault
    channel: str
    offset: int
    time: float


class FaultProxy:
    """Relays migrations to ``target`` and injects ``faults`` on the way.

    Use as a context manager: leaving it stops every relay thread and closes every socket.

    Args:
        target: the destination's address (``tcp:HOST:PORT``).
        faults: what to break; each fires at most once.
        compressed: the multifd channels carry zlib or zstd payloads.
    """

    def __init__(
        self, target: str, faults: Sequence[Fault] = (), *, compressed: bool = False
    ) -> None:
        address = parse_address(target)
        # Immutable after construction.
        self.target: Final = (address.host or "127.0.0.1", address.port)
        self.compressed = compressed
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: Final = f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"
        self._wake_r, self._wake_w = os.pipe()  # readable once teardown began
        self._lock = threading.Lock()  # guards _pending, _links, fired, units
        self._fired_event = threading.Event()  # signals: a fault fired
        self._pending: list[Fault] = list(faults)
        self._links: list[_Link] = []
        self.fired: list[Fired] = []
        self.units: list[Unit] = []  # every unit every relay saw, in arrival order
        self.problems: list[str] = []  # relay crashes: harness bugs
        self._acceptor = threading.Thread(target=self._accept, name="fault-proxy-accept")
        self._acceptor.start()

    # -- public ------------------------------------------------------------------------------
    def wait_fired(self, timeout: float) -> Fired | None:
        """The first fault that fired, waiting up to ``timeout`` seconds for it."""
        self._fired_event.wait(timeout)
        with self._lock:
            return self.fired[0] if self.fired else None

    def bytes_from_source(self) -> dict[str, int]:
        """Bytes the source wrote so far, per channel."""
        with self._lock:
            links = list(self._links)
        return {link.walker.channel: link.walker.received for link in links}

    def close(self) -> None:
        """Wake and join every thread, then close every socket (idempotent)."""
        with contextlib.suppress(OSError):  # already closed by an earlier close()
            os.write(self._wake_w, b"x")
        self._acceptor.join(BOUND)
        with self._lock:
            links = list(self._links)
        for link in links:
            link.stop()
        for link in links:
            link.join()
        alive = [link.name for link in links if link.alive()]
        for link in links:
            link.close()
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):  # closed by an earlier close()
                os.close(fd)
        assert not self._acceptor.is_alive(), "the proxy's accept thread did not stop"
        assert not alive, f"proxy relays did not stop: {alive}"
        assert not self.problems, f"proxy relays failed: {self.problems}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- for the relays ----------------------------------------------------------------------
    def arm(self, channel: str, units: list[Unit]) -> list[tuple[Fault, int]]:
        """Record ``units``; take the pending faults they place, with their offsets."""
        armed = []
        with self._lock:
            self.units.extend(units)
            for fault in list(self._pending):
                if fault.at.channel != channel:
                    continue
                if fault.at.unit == "byte":
                    offset: int | None = fault.at.delta
                else:
                    offset = next((o for u in units if (o := fault.at.offset(u)) is not None), None)
                if offset is not None:
                    self._pending.remove(fault)
                    armed.append((fault, offset))
        return armed

    def waiting_for(self, channel: str) -> bool:
        """Whether a fault may still be placed on ``channel`` (unknown: maybe)."""
        with self._lock:
            return any(channel in (UNKNOWN, f.at.channel) for f in self._pending)

    def report(self, problem: str) -> None:
        with self._lock:
            self.problems.append(problem)

    def record(self, fired: Fired) -> None:
        with self._lock:
            self.fired.append(fired)
        self._fired_event.set()

    def wake_fd(self) -> int:
        return self._wake_r

    # -- accepting ---------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            ready, _, _ = select.select([self._listener.fileno(), self._wake_r], [], [], BOUND)
            if self._wake_r in ready or not ready:
                return
            try:
                src, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed: nothing to relay
            try:
                dst = socket.create_connection(self.target, timeout=BOUND)
            except OSError:
                src.close()  # the destination is gone (it may fail during setup)
                return
            link = _Link(self, src, dst, len(self._links))
            with self._lock:
                self._links.append(link)
            link.start()


class _Link:
    """One proxied connection: the source leg, the destination leg, a relay thread each."""

    def __init__(self, proxy: FaultProxy, src: socket.socket, dst: socket.socket, n: int) -> None:
        # Immutable after construction.
        self.proxy = proxy
        self.src = src
        self.dst = dst
        self.name = f"link{n}"
        for sock in (src, dst):
            sock.settimeout(BOUND)  # a last resort: every wait is woken sooner
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._wake_r, self._wake_w = os.pipe()  # readable once the link ends
        self._lock = threading.Lock()  # guards _finished
        self._finished = False
        self._started = threading.Event()  # signals: both relays exist, either may join the other
        self.up = threading.Thread(
            target=self._guarded, args=(self._upstream,), name=f"fault-proxy-{self.name}-up"
        )
        self.down = threading.Thread(
            target=self._guarded, args=(self._downstream,), name=f"fault-proxy-{self.name}-down"
        )
        # Owned by the upstream thread; others read them only after joining it.
        self.walker = StreamWalker(compressed=proxy.compressed)
        self._pending = bytearray()  # received from the source, not yet forwarded
        self._forwarded = 0  # stream offset of _pending[0]

    def start(self) -> None:
        self.up.start()
        self.down.start()
        self._started.set()

    # -- relays ------------------------------------------------------------------------------
    def _guarded(self, relay: Callable[[], None]) -> None:
        self._started.wait(BOUND)
        try:
            relay()
        except Exception as exc:  # noqa: BLE001 - a harness bug: close() reports it
            self.proxy.report(f"{threading.current_thread().name}: {exc!r}")
            self._finish(src="reset", dst="reset")

    def _recv(self, sock: socket.socket) -> bytes | None:
        """The next bytes from ``sock``: empty at EOF, None once the link or proxy ends."""
        wake = [self._wake_r, self.proxy.wake_fd()]
        ready, _, _ = select.select([sock.fileno(), *wake], [], [], BOUND)
        if not ready or any(fd in ready for fd in wake):
            return None
        return sock.recv(_CHUNK)

    def _upstream(self) -> None:
        armed: list[tuple[Fault, int]] = []  # faults placed on this stream, by offset
        while (data := self._next_chunk()) is not None:
            self._pending += data
            units = self.walker.feed(data)  # first: it may tell the channel's name
            armed += self.proxy.arm(self.walker.channel, units)
            armed.sort(key=lambda item: item[1])
            if not self._relay(armed):
                return

    def _next_chunk(self) -> bytes | None:
        """The source's next bytes; None once the relay ends (its end passed on)."""
        try:
            data = self._recv(self.src)
        except OSError:
            self._finish(src="close", dst="reset")  # the source reset: pass it on
            return None
        if data == b"":
            self._forward_to(self.walker.received)
            with contextlib.suppress(OSError):  # the destination is gone already
                self.dst.shutdown(socket.SHUT_WR)
            return None
        return data

    def _relay(self, armed: list[tuple[Fault, int]]) -> bool:
        """Forward what is decided, firing the faults on the way; False: relay no more."""
        limit = self._limit()
        while armed and armed[0][1] + _needs(armed[0][0]) <= limit:
            fault, offset = armed.pop(0)
            if not (self._forward_to(offset) and self._inject(fault, offset)):
                return False
        return self._forward_to(limit)

    def _forward_to(self, offset: int) -> bool:
        count = offset - self._forwarded
        if not self._send_up(self._pending[:count]):
            return False
        del self._pending[:count]
        self._forwarded = offset
        return True

    def _limit(self) -> int:
        if self.proxy.waiting_for(self.walker.channel):
            return self.walker.safe
        return self.walker.received  # nothing left to place here: forward at once

    def _send_up(self, data: bytes | bytearray) -> bool:
        try:
            self.dst.sendall(data)
        except OSError:
            self._finish(src="reset", dst="close")  # the destination is gone: tell the source
            return False
        return True

    def _inject(self, fault: Fault, offset: int) -> bool:
        """Apply ``fault`` at ``offset`` (where the pending bytes start); False: relay no more."""
        self.proxy.record(Fired(fault, self.walker.channel, offset, time.monotonic()))
        if fault.kind == "corrupt":
            for i in range(fault.length):
                self._pending[i] ^= 0xFF
            return True
        if fault.kind == "stall":
            self._finish(src="leave", dst="leave")
        elif fault.side == "source":
            self._finish(src=fault.kind, dst="leave")
        else:
            self._finish(src="leave", dst=fault.kind)
        return False

    def _downstream(self) -> None:
        # Destination to source: the return path (PONG, SHUT) on main, and any EOF or reset.
        while True:
            try:
                data = self._recv(self.dst)
            except OSError:
                self._finish(src="reset", dst="close")
                return
            if data is None:
                return
            if not data:
                with contextlib.suppress(OSError):  # the source is gone already
                    self.src.shutdown(socket.SHUT_WR)
                return
            try:
                self.src.sendall(data)
            except OSError:
                self._finish(src="close", dst="reset")
                return

    # -- ending ------------------------------------------------------------------------------
    def _finish(self, *, src: _Action, dst: _Action) -> None:
        """End the link once: stop the other relay, then act on each leg."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        os.write(self._wake_w, b"x")
        other = self.down if threading.current_thread() is self.up else self.up
        other.join(BOUND)
        if other.is_alive():
            return  # left to close(), which reports the stuck relay
        _act(self.src, src)
        _act(self.dst, dst)

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # the link ended and closed it already
            os.write(self._wake_w, b"x")
        for sock in (self.src, self.dst):
            with contextlib.suppress(OSError):  # not connected any more: nothing to wake
                sock.shutdown(socket.SHUT_RDWR)

    def join(self) -> None:
        for thread in (self.up, self.down):
            thread.join(BOUND)

    def alive(self) -> bool:
        return self.up.is_alive() or self.down.is_alive()

    def close(self) -> None:
        self.src.close()
        self.dst.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):  # closed by an earlier close()
                os.close(fd)


def _needs(fault: Fault) -> int:
    """Bytes past the offset that must be in hand before ``fault`` can fire."""
    return fault.length if fault.kind == "corrupt" else 0


def _act(sock: socket.socket, action: _Action) -> None:
    if action == "leave":
        return
    if action == "reset":
        with contextlib.suppress(OSError):  # already reset by the peer: nothing to add
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.close()
        return
    # A clean close: take what had arrived, so the kernel sends a FIN and not a RST (what
    # arrives later draws a RST, as it does from any closed socket).
    sock.setblocking(False)
    with contextlib.suppress(OSError):  # BlockingIOError: less was there than announced
        queued = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, bytes(4)))[0]
        while queued > 0 and (chunk := sock.recv(min(queued, _CHUNK))):
            queued -= len(chunk)
    sock.close()
