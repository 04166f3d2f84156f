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
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from multifd import transport
from multifd.errors import MAIN, ChannelRefused, MultifdError
from multifd.migration.limits import ReceiveLimits
from multifd.tls import ServerHandshake

log = logging.getLogger("multifd.destination")

Identified = tuple[socket.socket, transport.ChannelKind]


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
            elif (done := self._advance(key.data)) is not None:
                self._identified.append(done)
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
        """Take ``sock`` as the main channel, or refuse it if there is one already."""
        if self.main is None:
            self.main = sock
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

    def take_main(self, timeout: float) -> socket.socket:
        """The main channel, now the caller's, with ``timeout`` on each read."""
        main, self.main = self.main, None
        assert main is not None
        main.settimeout(timeout)
        return main

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
