"""Sockets for migration channels: listen/connect, channel classification, I/O.

Every ``OSError`` from the socket layer leaves this module as a ``ChannelError`` naming the
channel (``raise ... from exc``); a stream that ends too early is a ``ProtocolError``.
Channels listen and connect at an :class:`~multifd.address.Address` (QEMU's URI syntax).
The main channel and every multifd channel connect to the same listening address; the
destination tells them apart by peeking at their first four bytes (spec section 2).
Sockets handed out are blocking; :func:`shutdown_quietly` wakes a thread blocked on one.
An address may carry a :class:`~multifd.tls.TlsConfig`: :func:`connect` then returns a
:class:`~multifd.tls.TlsSocket` after the handshake, and the destination runs the server
side of it (:class:`~multifd.tls.ServerHandshake`) before it classifies the channel.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final, Literal, TypeAlias

from multifd.address import Address
from multifd.errors import UNCLASSIFIED as _UNCLASSIFIED
from multifd.errors import ChannelError, ConfigError, ProtocolError
from multifd.tls import client_handshake
from multifd.wire.constants import MULTIFD_MAGIC, QEMU_VM_FILE_MAGIC

_Socket: TypeAlias = socket.socket  # Listener.socket hides the module inside the class
_SockAddr: TypeAlias = tuple[Any, ...] | str
ChannelKind = Literal["main", "multifd"]

LISTENER: Final = "listener"  # channel name in errors raised by a Listener
UNCLASSIFIED: Final = _UNCLASSIFIED  # channel name before classify() has seen the magic

_MAIN_MAGIC: Final = QEMU_VM_FILE_MAGIC.to_bytes(4, "big")  # b"QEVM"
_MULTIFD_MAGIC: Final = MULTIFD_MAGIC.to_bytes(4, "big")
# sendmsg() fails with EMSGSIZE beyond this many buffers (IOV_MAX on Linux and BSDs).
_IOV_MAX: Final = 1024
# classify() re-peeks a partial magic after this back-off, doubling up to the cap: poll()
# reports a socket holding 1..3 bytes as readable, so there is no event to wait for.
_PEEK_BACKOFF: Final = 0.0005
_PEEK_BACKOFF_MAX: Final = 0.01
# Said of a write that timed out: it blocks only while the peer's receive window is shut,
# so the peer is stuck, or waits for something this end does not send (more channels, say).
# A QEMU destination that failed (a --peer that does not match it, say) stops reading its
# channels without closing them: a stalled write is all the source sees of it.
WRITE_STALLED: Final = (
    " (the peer is not reading, or too slowly; a destination that failed stops reading, "
    "and its own log says why)"
)
# errno values of a write or read on a connection the peer closed or reset
_DROPPED: Final = frozenset({errno.EPIPE, errno.ECONNRESET})
# What close_after_last_write() reads and drops at most: a peer that keeps sending is not
# waited for.
_DRAIN_LIMIT: Final = 16 << 20


# -- listening -------------------------------------------------------------------------------
class Listener:
    """A listening socket that hands out one connected socket per :meth:`accept`."""

    def __init__(self, sock: _Socket, address: Address, *, owns_path: bool) -> None:
        # Sharing: address, _sock and _path_id are immutable after construction; accept()
        # may run in several threads at once, close() in any thread (it wakes them all).
        self.address: Final = address
        self._sock = sock
        # The (st_dev, st_ino) of the socket file we bound, so close() unlinks our own file
        # and never a socket that another process put at the same path since.
        self._path_id = _file_id(address.path) if owns_path else None
        self._close_lock = threading.Lock()  # makes the test-and-set of _closed atomic
        self._closed = threading.Event()  # set once by close(); accept() checks it on wake-up

    @classmethod
    def listen(cls, address: Address, *, backlog: int = 16) -> Listener:
        """Bind and listen on ``address``; TCP port 0 picks a free port.

        For a Unix address, a stale socket file left at the path (nobody listening) is
        replaced; a live socket or any other kind of file is left alone.

        Raises:
            ConfigError: the Unix path holds something that is not a socket.
            ChannelError: binding or listening failed (address in use, permission, ...).
        """
        if address.kind == "unix":
            _remove_stale_socket(address)
            sock = _bound_socket(socket.AF_UNIX, address.path, address, backlog)
            return cls(sock, address, owns_path=True)
        family, sockaddr = _resolve(address, passive=True, channel=LISTENER)
        sock = _bound_socket(family, sockaddr, address, backlog)
        host, port = sock.getsockname()[:2]
        return cls(sock, Address("tcp", host=host, port=port, tls=address.tls), owns_path=False)

    @property
    def socket(self) -> _Socket:
        """The listening socket itself (non-blocking), for use with ``selectors``."""
        return self._sock

    def accept(self, timeout: float) -> _Socket:
        """Wait up to ``timeout`` seconds for a connection; return it as a blocking socket.

        Raises:
            ChannelError: (channel ``"listener"``) nobody connected in time, the listener
                was closed, or ``accept`` failed.
        """
        deadline = time.monotonic() + timeout
        poller = select.poll()
        try:
            poller.register(self._sock, select.POLLIN)
        except ValueError as exc:  # the fd is -1: closed before we got here
            raise self._closed_error() from exc
        while True:
            remaining = deadline - time.monotonic()
            if self._closed.is_set():
                raise self._closed_error()
            if remaining <= 0:
                raise ChannelError(
                    f"no connection to {self.address} within {timeout:g} s", channel=LISTENER
                )
            events = poller.poll(_poll_ms(remaining))
            if events and not self._closed.is_set():
                conn = self._try_accept(events[0][1])
                if conn is not None:
                    return conn

    def try_accept(self) -> _Socket | None:
        """Like :meth:`accept`, but None at once if no connection is pending."""
        if self._closed.is_set():
            raise self._closed_error()
        return self._try_accept(0)

    def _closed_error(self) -> ChannelError:
        return ChannelError(f"listener on {self.address} is closed", channel=LISTENER)

    def _try_accept(self, revents: int) -> _Socket | None:
        if revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            raise ChannelError(f"listener on {self.address} was shut down", channel=LISTENER)
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None  # another thread took it, or the client gave up before we got it
        except OSError as exc:
            raise ChannelError(
                f"accept on {self.address} failed: {os_reason(exc)}", channel=LISTENER
            ) from exc
        conn.settimeout(None)
        tune(conn)
        return conn

    def close(self) -> None:
        """Stop listening, wake every waiting :meth:`accept`, remove our Unix socket file.

        Idempotent.
        """
        with self._close_lock:
            if self._closed.is_set():
                return
            self._closed.set()
        shutdown_quietly(self._sock)  # makes poll() in accept() return at once
        close_quietly(self._sock)
        if self._path_id is not None and _file_id(self.address.path) == self._path_id:
            with contextlib.suppress(FileNotFoundError):  # already gone: nothing to do
                os.unlink(self.address.path)

    def __enter__(self) -> Listener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else "open"
        return f"Listener({self.address}, {state})"


listen = Listener.listen


def _bound_socket(
    family: socket.AddressFamily, sockaddr: _SockAddr, address: Address, backlog: int
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            # A destination restarted right after a migration must be able to listen on the
            # same port while the old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)  # accept() polls first; see Listener.accept
    except OSError as exc:
        sock.close()
        raise ChannelError(
            f"cannot listen on {address}: {os_reason(exc)}", channel=LISTENER
        ) from exc
    return sock


def _remove_stale_socket(address: Address) -> None:
    try:
        mode = os.lstat(address.path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ChannelError(f"cannot inspect {address}: {os_reason(exc)}", channel=LISTENER) from exc
    if not stat.S_ISSOCK(mode):
        raise ConfigError(
            f"{address}: {address.path!r} exists and is not a socket; not replacing it"
        )
    if _unix_socket_is_live(address.path):
        raise ChannelError(f"cannot listen on {address}: address in use", channel=LISTENER)
    try:
        os.unlink(address.path)
    except FileNotFoundError:
        pass  # removed by someone else meanwhile: just as good
    except OSError as exc:
        raise ChannelError(
            f"cannot remove stale socket {address.path!r}: {os_reason(exc)}", channel=LISTENER
        ) from exc


def _unix_socket_is_live(path: str) -> bool:
    """Whether a process listens on ``path``; only ECONNREFUSED proves the file stale."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full backlog answers EAGAIN instead of blocking: live
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# -- connecting ------------------------------------------------------------------------------
def connect(address: Address, *, timeout: float, channel: str) -> socket.socket:
    """Connect to ``address`` within ``timeout`` seconds; return a blocking socket.

    TCP sockets get ``TCP_NODELAY`` (see :func:`tune`). With ``address.tls`` the TLS
    handshake runs too, within another ``timeout``.

    Raises:
        ChannelError: naming ``channel`` and the address: refused, timed out, unreachable,
            no such socket file, the host name does not resolve, or TLS failed.
        ConfigError: TLS to a ``unix:`` address without ``tls.hostname``.
    """
    family: socket.AddressFamily
    target: _SockAddr
    if address.kind == "unix":
        family, target = socket.AF_UNIX, address.path
    else:
        family, target = _resolve(address, passive=False, channel=channel)
    tls = address.tls
    server_name = tls.server_name(address.host, unix=address.kind == "unix") if tls else ""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _connect_bounded(sock, target, timeout)
        tune(sock)
    except OSError as exc:
        sock.close()
        raise ChannelError(_connect_failure(address, timeout, exc), channel=channel) from exc
    if tls is None:
        return sock
    return client_handshake(sock, tls, server_name, timeout=timeout, channel=channel)


def _timeval(seconds: float) -> bytes:
    seconds = max(seconds, 1e-6)  # a zero timeval would mean "wait forever"
    return struct.pack("@ll", int(seconds), int(seconds % 1 * 1_000_000))


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking, with kernel timers bounding each read and write.

    A Python-level timeout turns the socket non-blocking: every large ``sendmsg`` or
    ``recv_into`` then returns early with part of the data and goes round the interpreter
    again. With ``SO_SNDTIMEO``/``SO_RCVTIMEO`` one call moves a whole packet, and a stalled
    peer still ends the wait: the call fails with ``EAGAIN`` (``BlockingIOError``), or
    returns short if some bytes had moved. A TLS socket gets a Python-level timeout instead:
    a blocking ``SSLSocket`` whose kernel timer runs out retries the read forever, and
    TLS moves at most a 16 KiB record per call anyway.
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))


def _connect_bounded(sock: socket.socket, target: _SockAddr, timeout: float) -> None:
    """Connect within ``timeout`` and leave ``sock`` blocking.

    A Unix connect to a full backlog fails at once with EAGAIN on a non-blocking socket
    (which a Python timeout makes it); a blocking one waits for the listener to accept,
    bounded by ``SO_SNDTIMEO``, the kernel's timer for that wait.
    """
    if sock.family != socket.AF_UNIX:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.settimeout(None)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
    sock.connect(target)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", 0, 0))


def _connect_failure(address: Address, timeout: float, exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {address}"
    # A Unix connect that ran out of SO_SNDTIMEO waiting for backlog room reports EAGAIN.
    if isinstance(exc, TimeoutError | BlockingIOError):
        return f"no connection to {address} within {timeout:g} s"
    if isinstance(exc, FileNotFoundError):
        return f"no socket at {address}"
    return f"cannot connect to {address}: {os_reason(exc)}"


def _resolve(
    address: Address, *, passive: bool, channel: str
) -> tuple[socket.AddressFamily, _SockAddr]:
    """The first socket address for a TCP ``address`` (numeric hosts never hit DNS)."""
    try:
        infos = socket.getaddrinfo(
            address.host or None,
            address.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE if passive else 0,
        )
    except OSError as exc:
        raise ChannelError(
            f"cannot resolve host {address.host!r} of {address}: {os_reason(exc)}", channel=channel
        ) from exc
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def tune(sock: socket.socket) -> None:
    """Set the options a migration socket wants: ``TCP_NODELAY`` on TCP, nothing on Unix.

    Fixed 4 MiB ``SO_SNDBUF``/``SO_RCVBUF`` were measured and left out: copying 1 GiB over
    loopback, kernel auto-tuning vs 4 MiB gave (GB/s, medians of 7) 3.2 vs 3.5 with 1 MiB
    writes, 5.2 vs 4.7 with 512 KiB, 3.0 vs 3.2 with 64 KiB on one stream, and 4.9 vs 4.2,
    4.8 vs 4.1, 3.4 vs 3.0 on four: no consistent gain, and a fixed size disables
    auto-tuning. ``TCP_NODELAY`` keeps a SYNC packet or a short main-stream record from
    waiting for Nagle's timer. Errors are ignored: the next I/O reports a broken socket.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- channel classification ------------------------------------------------------------------
def classify(sock: socket.socket, *, timeout: float) -> ChannelKind:
    """Tell a freshly accepted connection's kind by its first 4 bytes, without consuming them.

    ``b"QEVM"`` (``QEMU_VM_FILE_MAGIC``) is the main channel, ``0x11223344``
    (``MULTIFD_MAGIC``) a multifd channel, as QEMU's ``migration_channel_identify()``
    decides (spec section 2.2).

    Raises:
        ProtocolError: (channel ``"unclassified"``) the first 4 bytes are neither magic.
        ChannelError: (channel ``"unclassified"``) EOF before 4 bytes, no 4 bytes within
            ``timeout`` seconds, or a socket error.
    """
    try:
        head = _peek_exactly(sock, 4, timeout)
    except ValueError as exc:  # poll() refuses fd -1: the socket is already closed
        raise ChannelError("the socket is closed", channel=UNCLASSIFIED) from exc
    return kind_of(head)


def kind_of(head: bytes) -> ChannelKind:
    """The kind of channel whose first 4 bytes are ``head`` (see :func:`classify`).

    Raises:
        ProtocolError: (channel ``"unclassified"``) neither magic.
    """
    if head == _MAIN_MAGIC:
        return "main"
    if head == _MULTIFD_MAGIC:
        return "multifd"
    hint = ""
    if head[:2] == b"\x16\x03":  # a TLS record: content type 22 (handshake), version 3.x
        hint = " (a TLS ClientHello: does the destination need --tls-*?)"
    raise ProtocolError(
        "unknown channel magic",
        channel=UNCLASSIFIED,
        expected="QEVM (main) or 0x11223344 (multifd)",
        received=head.hex() + hint,
    )


def _peek_exactly(sock: socket.socket, size: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    poller = select.poll()
    # POLLRDHUP tells a peer that closed after a partial magic from one still writing it.
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    backoff = _PEEK_BACKOFF
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChannelError(f"no channel magic within {timeout:g} s", channel=UNCLASSIFIED)
        events = poller.poll(_poll_ms(remaining))
        if not events:
            continue
        try:
            head = sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise ChannelError(
                f"cannot read the channel magic: {os_reason(exc)}", channel=UNCLASSIFIED
            ) from exc
        if len(head) == size:
            return head
        if not head or events[0][1] & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            raise ChannelError(
                f"end of stream after {len(head)} of {size} magic bytes", channel=UNCLASSIFIED
            )
        time.sleep(min(backoff, remaining))
        backoff = min(2 * backoff, _PEEK_BACKOFF_MAX)


# -- data transfer ---------------------------------------------------------------------------
def send_all(
    sock: socket.socket,
    buffers: Sequence[bytes | memoryview],
    *,
    channel: str,
    timeout: float | None = None,
) -> int:
    """Send ``buffers`` back to back (see :func:`write_buffers`); empty buffers are skipped.

    Returns:
        The number of bytes sent (the sum of the buffer sizes).

    Raises:
        ChannelError: a socket error or a socket timeout, naming ``channel``.
    """
    pending = [_as_bytes(memoryview(buf)) for buf in buffers]
    pending = [view for view in pending if view.nbytes]
    total = sum(view.nbytes for view in pending)
    try:
        write_buffers(sock, pending, total, timeout=timeout)
    except OSError as exc:
        stalled = WRITE_STALLED if isinstance(exc, (TimeoutError, BlockingIOError)) else ""
        raise ChannelError(
            f"send of {total} bytes failed: {os_reason(exc)}{stalled}", channel=channel
        ) from exc
    return total


def write_buffers(
    sock: socket.socket,
    buffers: Sequence[bytes | memoryview],
    total: int,
    *,
    timeout: float | None = None,
) -> None:
    """Write every buffer (``total`` bytes together), in one ``sendmsg`` where the kernel can.

    A partial write goes on from memoryview slices of the same buffers: no byte is copied.
    A socket write timeout (``SO_SNDTIMEO``) restarts with every partial write, so a peer
    that drains a little now and then could stretch one call far beyond it; ``timeout``
    bounds the whole call instead: once that many seconds have passed, a write still
    incomplete raises :class:`TimeoutError`.

    Raises:
        OSError: the socket failed; TimeoutError when ``timeout`` ran out.
    """
    if not total:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    if len(buffers) <= _IOV_MAX:
        sent = sock.sendmsg(buffers)
        if sent == total:
            return
    else:
        sent = 0
    pending = [memoryview(b) for b in buffers]
    first = _advance(pending, 0, sent)
    while first < len(pending):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(errno.ETIMEDOUT, f"write not done after {timeout:g} s")
        sent = sock.sendmsg(pending[first : first + _IOV_MAX])
        first = _advance(pending, first, sent)


def _advance(pending: list[memoryview], first: int, sent: int) -> int:
    """Drop ``sent`` bytes from the front of ``pending[first:]``; the new ``first``."""
    while sent:
        head = pending[first]
        if sent < head.nbytes:
            pending[first] = head[sent:]
            return first
        sent -= head.nbytes
        first += 1
    return first


def _as_bytes(view: memoryview) -> memoryview:
    """``view`` as a flat view of unsigned bytes (numpy page arrays are 2-D)."""
    if view.ndim == 1 and view.format == "B":
        return view
    return view.cast("B")


# -- teardown --------------------------------------------------------------------------------
def shutdown_quietly(sock: socket.socket) -> None:
    """``shutdown(SHUT_RDWR)``, ignoring errors: wakes any thread blocked on ``sock``."""
    with contextlib.suppress(OSError):  # not connected or already closed: nothing to wake
        sock.shutdown(socket.SHUT_RDWR)


def close_quietly(sock: socket.socket) -> None:
    """Close ``sock``, ignoring errors."""
    with contextlib.suppress(OSError):  # close() only fails for an fd already gone
        sock.close()


def close_after_last_write(sock: socket.socket) -> None:
    """Close ``sock`` so that what was written last still arrives, ignoring errors.

    A socket closed with received bytes unread resets the connection, and the reset can
    overtake, and destroy, our last bytes still queued: a destination's SHUT(1) was lost
    so, under load, where the source read "Connection reset by peer". So the write side is
    ended first (FIN after the last bytes), what has arrived is read and dropped, without
    waiting for more, and only then the socket is closed.
    """
    with contextlib.suppress(OSError, ValueError):  # the peer is gone: nothing to save
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.0)
        dropped = 0
        while dropped < _DRAIN_LIMIT and (data := sock.recv(1 << 16)):
            dropped += len(data)
    close_quietly(sock)


# -- helpers ---------------------------------------------------------------------------------
def _poll_ms(seconds: float) -> int:
    """A poll() timeout in ms that never rounds a positive wait down to a busy 0."""
    return max(1, math.ceil(seconds * 1000))


def os_reason(exc: OSError) -> str:
    """Why a socket call failed, in the system's words, for an error message.

    A peer that dropped the connection is said to have: on its own, "Broken pipe" leaves a
    user looking for the fault on the wrong end.
    """
    if exc.strerror:
        reason = exc.strerror
    elif exc.errno is not None:
        reason = errno.errorcode.get(exc.errno, str(exc.errno))
    else:
        reason = str(exc) or type(exc).__name__
    if exc.errno in _DROPPED:
        reason += " (the peer closed the connection; its own log says why)"
    return reason
