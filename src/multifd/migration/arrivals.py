"""Connections reaching a destination during setup, until each says which channel it is.

Theory of operation. One selector watches the listening socket and every connection not
yet identified. A plain connection is identified by peeking at its first four bytes once
they are readable (:func:`multifd.transport.classify`). A TLS connection first runs the
server side of its handshake, one non-blocking step per readiness event
(:class:`multifd.tls.ServerHandshake`), then reads its four bytes, which the socket replays
to the engine. So a peer that stalls in its handshake delays nobody.

What the source sends is trusted only once it is authenticated (TLS) and has claimed a
channel. A connection that fails its TLS handshake or does not finish it within
``handshake_timeout``, that is the oldest waiting when more than the expected channels plus
``max_pending`` wait, or that opens a second main channel is refused: closed, logged,
reported to ``on_refused``, and setup goes on. (A source may stay silent on its first
channels until it has opened the others, so the wait for the first bytes themselves is
bounded by setup only.) A channel that identifies itself and then breaks the protocol fails
the migration, as in QEMU: that is a misconfigured source, and it should hear so at once.

The main channel is read while multifd channels are still awaited, up to
:data:`EARLY_LIMIT` bytes, which :meth:`Arrivals.take_main` hands to the loader. A source
with multifd on sends every page on a multifd channel (the main channel carries at most
zero-page records), and one with multifd off sends its pages on the main channel from its
first pass; so a page seen there during setup names a source with multifd off at once,
where waiting for channels that never come would take the whole setup timeout. A throwaway
decoder looks for that page; the loader decodes the same bytes again for real. It also
notes when the ``ram`` setup section ends (its first marker): a source with multifd on has
connected every channel by then (QEMU 7.2 has even sent a SYNC on each; QEMU 10 and ours
connect them before the stream starts), so channels still missing a while later never come.
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from multifd import transport
from multifd.errors import MAIN, ChannelError, ChannelRefused, MultifdError, ProtocolError
from multifd.migration.limits import ReceiveLimits
from multifd.tls import ServerHandshake
from multifd.wire import stream

log = logging.getLogger("multifd.destination")

Identified = tuple[socket.socket, transport.ChannelKind]

# Bytes of the main channel read during setup: a source's setup records and first pages fit
# many times over, and a source with multifd off cannot make a destination buffer more.
EARLY_LIMIT: Final = 1 << 20
# A read that would block: nothing more has arrived yet (TLS may also want to write).
_NOTHING_YET = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


@dataclass
class _Pending:
    """A connection not yet identified."""

    sock: socket.socket  # the TLS socket once a handshake wraps it
    peer: str
    deadline: float  # monotonic time by which its TLS handshake must be done
    handshake: ServerHandshake | None  # None for a plain connection


class Arrivals:
    """The connections of one setup phase (see the module docstring).

    Owned by the setup thread alone. Connections still pending or identified but not yet
    popped, and the main channel until :meth:`take_main`, are closed on exit.

    Args:
        listener: where connections arrive; TLS if its address carries a config.
        expected: the connections the source opens (the main channel and N multifd).
        limits: ``max_pending`` and ``handshake_timeout`` apply here.
        io_timeout: how long a plain connection may take to complete its channel magic
            once its first byte arrived (a partial magic then fails the migration).
        on_refused: told about every refused connection.
    """

    def __init__(
        self,
        listener: transport.Listener,
        *,
        expected: int,
        limits: ReceiveLimits,
        io_timeout: float,
        on_refused: Callable[[ChannelRefused], None],
    ) -> None:
        self._listener = listener
        tls = listener.address.tls
        self._context = tls.server_context if tls is not None else None
        self._limits = limits
        self._expected = expected
        self._max_pending = expected + limits.max_pending
        self._io_timeout = io_timeout
        self._on_refused = on_refused
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener.socket, selectors.EVENT_READ)
        self._pending: dict[socket.socket, _Pending] = {}  # oldest first
        self._identified: collections.deque[Identified] = collections.deque()
        self.main: socket.socket | None = None
        self.multifd = 0
        self._early = bytearray()  # what the main channel sent before setup ended
        self._scout: stream.StreamDecoder | None = None  # looks at it for a page
        self.ram_setup_ended: float | None = None  # monotonic time the scout saw a marker

    def pop(self) -> Identified | None:
        """The next identified connection, now the caller's; None if there is none."""
        return self._identified.popleft() if self._identified else None

    def wait(self, timeout: float) -> None:
        """Accept what is pending and advance handshakes, for up to ``timeout`` seconds.

        Connections identified meanwhile are handed out by :meth:`pop`.

        Raises:
            ProtocolError: an authenticated connection's first bytes are no channel magic.
            ChannelError: a plain connection's magic stopped half-way (see ``io_timeout``),
                or the listener failed.
        """
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._listener.socket:
                self._accept_all()
            elif key.fileobj is self.main:
                pass  # read below: a TLS socket may hold data select() cannot see
            elif (done := self._advance(key.data)) is not None:
                self._identified.append(done)
        if self._scout is not None:
            self._read_main()
        self._expire(time.monotonic())

    def _accept_all(self) -> None:
        while (sock := self._listener.try_accept()) is not None:
            if len(self._pending) >= self._max_pending:
                oldest = next(iter(self._pending.values()))
                self._refuse(oldest, f"more than {self._max_pending} connections wait")
            self._add(sock)

    def _add(self, sock: socket.socket) -> None:
        peer = _peer_name(sock)
        deadline = time.monotonic() + self._limits.handshake_timeout
        handshake = None
        if self._context is not None:
            try:
                handshake = ServerHandshake(sock, self._context, peer=peer)
            except OSError as exc:  # the peer is gone already
                transport.close_quietly(sock)
                self._report(ChannelRefused(f"TLS set-up failed: {exc}", peer=peer))
                return
            sock = handshake.sock
        pending = _Pending(sock, peer, deadline, handshake)
        self._pending[sock] = pending
        self._selector.register(sock, selectors.EVENT_READ, pending)

    def _advance(self, pending: _Pending) -> Identified | None:
        sock = pending.sock
        if pending.handshake is not None:
            try:
                events = pending.handshake.step()
            except ChannelRefused as exc:
                self._refuse(pending, exc)
                return None
            if events:
                self._selector.modify(sock, events, pending)
                return None
        self._forget(pending)
        try:
            if pending.handshake is not None:
                return sock, transport.kind_of(pending.handshake.head)
            return sock, transport.classify(sock, timeout=self._io_timeout)
        except MultifdError:
            transport.close_quietly(sock)
            raise

    def _expire(self, now: float) -> None:
        late = [
            pending
            for pending in self._pending.values()
            if pending.handshake is not None
            and not pending.handshake.handshaken
            and pending.deadline <= now
        ]
        for pending in late:
            self._refuse(pending, f"no TLS handshake within {self._limits.handshake_timeout:g} s")

    def _refuse(self, pending: _Pending, reason: str | ChannelRefused) -> None:
        self._forget(pending)
        transport.close_quietly(pending.sock)
        if isinstance(reason, str):
            reason = ChannelRefused(reason, peer=pending.peer)
        self._report(reason)

    def _report(self, refused: ChannelRefused) -> None:
        log.warning("%s", refused)
        self._on_refused(refused)

    def _forget(self, pending: _Pending) -> None:
        self._selector.unregister(pending.sock)
        del self._pending[pending.sock]

    def set_main(self, sock: socket.socket) -> None:
        """Take ``sock`` as the main channel, or refuse it if there is one already.

        While multifd channels are awaited, :meth:`wait` reads it (see the module docstring).
        """
        if self.main is None:
            self.main = sock
            if self._expected > 1:
                sock.settimeout(0)
                self._selector.register(sock, selectors.EVENT_READ)
                self._scout = stream.StreamDecoder(
                    MAIN,
                    max_blocks=self._limits.max_blocks,
                    max_name_len=self._limits.max_name_len,
                )
            return
        peer = _peer_name(sock)
        transport.close_quietly(sock)
        self._report(ChannelRefused("a second main channel", peer=peer, channel=MAIN))

    def refuse_the_rest(self) -> None:
        """Setup is over: refuse every connection still waiting or not yet popped."""
        for pending in list(self._pending.values()):
            self._refuse(pending, "setup is over: every channel is there")
        while self._identified:
            sock, kind = self._identified.popleft()
            peer = _peer_name(sock)
            transport.close_quietly(sock)
            reason = f"a {kind} channel beyond the {self._expected} expected"
            self._report(ChannelRefused(reason, peer=peer))

    def take_main(self, timeout: float) -> tuple[socket.socket, bytes]:
        """The main channel, now the caller's, with ``timeout`` on each read, and the bytes
        already read from it, which come first in its stream."""
        self._stop_reading_main()
        main, self.main = self.main, None
        assert main is not None
        main.settimeout(timeout)
        early = bytes(self._early)
        self._early.clear()
        return main, early

    def _read_main(self) -> None:
        """Read what the main channel has sent, up to EARLY_LIMIT, and look for a page."""
        assert self.main is not None
        try:
            data = self.main.recv(EARLY_LIMIT - len(self._early))
        except _NOTHING_YET:
            return
        except OSError as exc:
            raise ChannelError(
                f"receive failed during setup: {transport.os_reason(exc)}", channel=MAIN
            ) from exc
        self._early += data
        page = self._first_page(data)
        if page is not None:
            channels = self._expected - 1
            raise ProtocolError(
                "RAM page on the main channel",
                channel=MAIN,
                expected=f"pages on the {channels} multifd channels only",
                received=(
                    f"a page of {page.block!r} (offset {page.offset:#x}) while {self.multifd} "
                    f"of {channels} multifd channels had arrived: is multifd off at the "
                    "source? Then receive with 0 channels"
                ),
            )
        if not data or len(self._early) >= EARLY_LIMIT:
            self._stop_reading_main()  # at its end, or full: the loader takes it from here

    def _first_page(self, data: bytes) -> stream.RamPage | None:
        """The first page record ``data`` completes, decoding on from the earlier bytes
        (and noting the first marker)."""
        assert self._scout is not None
        try:
            self._scout.feed(data)
            while (event := self._scout.next_event()) is not None:
                if isinstance(event, stream.RamPage):
                    return event
                if self.ram_setup_ended is None and isinstance(
                    event, stream.RamEos | stream.RamMultifdFlush
                ):
                    self.ram_setup_ended = time.monotonic()
                if isinstance(event, stream.Eof):
                    # Nothing past the stream's end is read here: over TLS that is the
                    # source's close_notify, and a session that took it in can no longer
                    # send our SHUT (seen: "EOF occurred in violation of protocol").
                    self._stop_reading_main()
                    return None
        except ProtocolError:
            self._stop_reading_main()  # the loader decodes the same bytes and reports it
        return None

    def _stop_reading_main(self) -> None:
        if self._scout is not None:
            assert self.main is not None
            self._scout = None
            self._selector.unregister(self.main)

    def __enter__(self) -> Arrivals:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._selector.close()
        for sock in self._pending:
            transport.close_quietly(sock)
        self._pending.clear()
        for sock, _ in self._identified:
            transport.close_quietly(sock)
        self._identified.clear()
        if self.main is not None:
            transport.close_quietly(self.main)


def _peer_name(sock: socket.socket) -> str:
    """The peer of a connected socket for messages: ``HOST:PORT`` or ``a unix peer``."""
    try:
        peer = sock.getpeername()
    except OSError:
        return "an unknown peer"
    if isinstance(peer, tuple):
        host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
        return f"{host}:{peer[1]}"
    return f"unix:{peer}" if peer else "a unix peer"
