"""TLS 1.3 with mutual authentication on every migration channel.

Theory of operation. The destination is the TLS server, the source the client; both present
a certificate signed by the same CA (``TlsConfig.ca``) and refuse a peer without one. The
source checks that the destination's certificate names the host it dialled (or
``TlsConfig.hostname``). Every channel, main and multifd, is its own TLS session, as in
QEMU: one TLS stream is CPU-bound, several channels spread the cost over cores.

:class:`TlsSocket` is the socket the engine gets. It is an :class:`ssl.SSLSocket` that also
offers the calls the engine makes on plain sockets and ``SSLSocket`` lacks: ``sendmsg`` of
a list of buffers, ``recv_into`` with ``MSG_WAITALL`` and ``recvmsg_into``; and it replays
the first bytes the destination read to classify the channel (TLS cannot peek). Plain
TCP never goes through this module.

Server handshakes are driven without blocking (:class:`ServerHandshake`), so a client that
never finishes its handshake holds up nobody.

Nothing but the handshake goes from the destination to the source on a channel (and the
return path's messages on the main one), as between two QEMUs: the server sends no TLS 1.3
session ticket. A QEMU source never reads its multifd channels, and a socket closed with
unread bytes is reset, which drops whatever it still had in flight (measured: QEMU 7.2
into a destination that sent one ticket lost 1287 of 8192 pages, "unexpected EOF in page
data"). So a source cannot wait for a sign that its certificate was accepted (a TLS 1.3
client finishes its handshake before the server checks the certificate); if it was
refused, the server's alert waits in the socket, and the first read or write that fails
on that channel reports it (:class:`TlsRefused`).
"""

from __future__ import annotations

import errno
import functools
import selectors
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from multifd.errors import ChannelError, ChannelRefused, ConfigError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

# Buffers smaller than this are gathered into one TLS record instead of one record (and one
# write) each: the main channel writes many records of a few bytes.
_GATHER: Final = 16 << 10
_LOCK_INIT: Final = threading.Lock()  # makes the creation of a TlsSocket's _io_lock atomic
_CLIENT_ALERTS: Final = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the receiver requires a client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the receiver does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the receiver rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the receiver says our certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the receiver rejected our certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": (
        "the receiver rejected our certificate as unfit for a source (extendedKeyUsage)"
    ),
}


@dataclass(frozen=True)
class TlsConfig:
    """The credentials of one end: its certificate and key, and the CA it trusts.

    Attributes:
        cert: PEM certificate of this end (a chain may follow it in the file).
        key: PEM private key of ``cert``, unencrypted.
        ca: PEM certificate(s) of the CA that signs the peer's certificate.
        hostname: the name the destination's certificate must carry; None means the host
            of the address dialled (required for ``unix:`` addresses). Used by the source.
    """

    cert: Path
    key: Path
    ca: Path
    hostname: str | None = None

    def __post_init__(self) -> None:
        for what in ("cert", "key", "ca"):
            path = Path(getattr(self, what))
            object.__setattr__(self, what, path)
            if not path.is_file():
                raise ConfigError(f"TLS {what} file {str(path)!r} does not exist")
        if self.hostname is not None and not self.hostname:
            raise ConfigError("TLS hostname must not be empty")

    def cli_args(self) -> list[str]:
        """The ``multifd send`` / ``multifd receive`` options that give these credentials
        (``--tls-hostname``, a ``send`` option only, is left to the caller)."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]

    def server_name(self, host: str, *, unix: bool) -> str:
        """The name the source checks in the destination's certificate.

        Raises:
            ConfigError: a ``unix:`` address and no :attr:`hostname`.
        """
        if self.hostname is not None:
            return self.hostname
        if unix:
            raise ConfigError(
                "TLS over a unix: address needs the destination's certificate name "
                "(--tls-hostname / TlsConfig.hostname)"
            )
        return host or "localhost"  # an empty host dials the loopback interface

    @functools.cached_property
    def server_context(self) -> ssl.SSLContext:
        """The destination's context: TLS 1.3, a client certificate signed by :attr:`ca`."""
        context = self._context(server=True)
        context.verify_mode = ssl.CERT_REQUIRED
        context.num_tickets = 0  # the source never reads them (see the module docstring)
        return context

    @functools.cached_property
    def client_context(self) -> ssl.SSLContext:
        """The source's context: TLS 1.3, the destination's name and CA checked."""
        return self._context(server=False)  # PROTOCOL_TLS_CLIENT: check_hostname, CERT_REQUIRED

    def _context(self, *, server: bool) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.sslsocket_class = TlsSocket
        try:
            context.load_verify_locations(cafile=self.ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the TLS CA {str(self.ca)!r}: {exc}") from exc
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"cannot load the TLS certificate {str(self.cert)!r} with key "
                f"{str(self.key)!r}: {exc}"
            ) from exc
        return context


class TlsSocket(ssl.SSLSocket):
    """An ``SSLSocket`` with the calls the engine makes on plain sockets.

    Made by :class:`TlsConfig`'s contexts. Timeouts are Python-level (``settimeout``): the
    kernel's ``SO_RCVTIMEO`` makes a blocking ``SSLSocket`` retry forever. An SSL object
    must serve one call at a time, so reads and writes hold ``_io_lock``; a migration
    channel is read by one thread or written by one thread, so only :meth:`shutdown`,
    which may come from any thread, ever finds the lock taken, and it does not wait for it.
    """

    _replay = b""  # bytes read before the engine got the socket, returned first
    _io_lock: threading.Lock | None = None  # held during each read or write (see shutdown)
    _said_goodbye = False  # close_notify was tried; set under _io_lock

    def replay(self, data: bytes) -> None:
        """Make the next reads return ``data`` before anything still in the stream."""
        self._replay = data + self._replay

    def _lock(self) -> threading.Lock:
        lock = self._io_lock
        if lock is None:
            with _LOCK_INIT:
                if self._io_lock is None:
                    self._io_lock = threading.Lock()
                lock = self._io_lock
        return lock

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        """Like ``socket.recv``; see :meth:`recv_into` for ``flags``."""
        buffer = bytearray(buflen)
        return bytes(buffer[: self.recv_into(buffer, buflen, flags)])

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None, flags: int = 0) -> int:
        """Like ``socket.recv_into``; ``MSG_WAITALL`` reads until ``nbytes`` or end of stream.

        A timeout after some bytes arrived returns them; the next call raises it.
        """
        if flags & ~socket.MSG_WAITALL:
            raise ValueError(f"flags {flags:#x} are not supported on a TLS socket")
        view = _flat(memoryview(buffer))
        size = view.nbytes if not nbytes else min(nbytes, view.nbytes)
        got = self._take_replay(view, size)
        with self._lock():
            while got < size and (got == 0 or flags):
                try:
                    count = super().recv_into(view[got:size], size - got)
                except (TimeoutError, BlockingIOError):
                    if got:
                        return got
                    raise
                except ValueError as exc:  # the SSL object is gone: the socket was closed
                    raise OSError(errno.EBADF, "TLS socket closed") from exc
                except ssl.SSLError as exc:
                    refused = None if self.server_side else _refusal(exc)
                    if refused is None:
                        raise
                    raise refused from exc
                if count == 0:
                    break
                got += count
        return got

    def _take_replay(self, view: memoryview, size: int) -> int:
        if not self._replay:
            return 0
        count = min(size, len(self._replay))
        view[:count] = self._replay[:count]
        self._replay = self._replay[count:]
        return count

    def recvmsg_into(  # type: ignore[override]
        self, buffers: Iterable[WriteableBuffer], ancbufsize: int = 0, flags: int = 0
    ) -> tuple[int, list[tuple[int, int, bytes]], int, Any]:
        """Fill ``buffers`` in turn (no ancillary data); short only at end of stream."""
        if ancbufsize:
            raise ValueError("no ancillary data on a TLS socket")
        total = 0
        for buffer in buffers:
            view = _flat(memoryview(buffer))
            got = self.recv_into(view, view.nbytes, flags | socket.MSG_WAITALL)
            total += got
            if got < view.nbytes:
                break
        return total, [], 0, None

    def sendmsg(  # type: ignore[override]
        self,
        buffers: Iterable[ReadableBuffer],
        ancdata: Iterable[Any] = (),
        flags: int = 0,
        address: Any = None,
    ) -> int:
        """Write every buffer; returns their total size (a TLS write is all or an error)."""
        if ancdata or flags or address is not None:
            raise ValueError("sendmsg on a TLS socket takes buffers only")
        total = 0
        gathered = bytearray()  # small buffers, sent together as one record
        with self._lock():
            for buffer in buffers:
                view = _flat(memoryview(buffer))
                total += view.nbytes
                if view.nbytes < _GATHER:
                    gathered += view
                    if len(gathered) >= _GATHER:
                        self._write(gathered)
                        gathered = bytearray()
                    continue
                if gathered:  # e.g. a packet header: its record takes the run's first bytes
                    fill = _GATHER - len(gathered)
                    gathered += view[:fill]
                    self._write(gathered)
                    gathered = bytearray()
                    view = view[fill:]
                self._write(view)
            if gathered:
                self._write(gathered)
        return total

    def _write(self, data: bytearray | memoryview) -> None:
        try:
            super().sendall(data)
        except ValueError as exc:  # the SSL object is gone: the socket was closed
            raise OSError(errno.EBADF, "TLS socket closed") from exc
        except (ConnectionError, ssl.SSLError) as exc:
            refused = self._alert()
            if refused is not None:
                raise refused from exc
            if isinstance(exc, ssl.SSLEOFError) and not self.server_side:
                # QEMU checks a client's certificate after the handshake and, if it refuses
                # it, closes the connection without an alert.
                cut = "TLS session cut short (QEMU does so when it refuses our certificate)"
                raise ConnectionResetError(errno.ECONNRESET, cut) from exc
            raise

    def _alert(self) -> TlsRefused | None:
        """The server's refusal of our certificate, if its alert waits unread (a failed
        write does not read it); called under ``_io_lock``."""
        if self.server_side:
            return None
        timeout = self.gettimeout()
        self.settimeout(0.0)
        try:
            data = super().recv(1)
        except ssl.SSLError as exc:
            return _refusal(exc)
        except (OSError, ValueError):
            return None
        finally:
            self.settimeout(timeout)
        self.replay(data)  # a byte of the return path: the next read still gets it
        return None

    def shutdown(self, how: int) -> None:
        """Shut the socket down for every thread; a sender first says goodbye to its peer.

        ``SSLSocket.shutdown`` drops the SSL object under a thread that may be reading it;
        this keeps it, so a blocked read simply sees the end of the stream. A client (the
        source) that is not in the middle of a write sends a TLS ``close_notify`` first,
        as QEMU 10 does (``multifd-clean-tls-termination``); a write in progress means the
        migration is being torn down, and then no clean end is claimed. (Our destination
        does not take a clean end for a complete migration: the stream says when it ends.)
        """
        if not self.server_side and how != socket.SHUT_RD:
            self._close_notify()
        socket.socket.shutdown(self, how)

    def close(self) -> None:
        """Close; a sender that did not shut down first says goodbye (see :meth:`shutdown`)."""
        if not self.server_side and self.fileno() != -1:
            self._close_notify()
        super().close()

    def _close_notify(self) -> None:
        lock = self._lock()
        if self._said_goodbye or not lock.acquire(blocking=False):
            return
        self._said_goodbye = True
        try:
            timeout = self.gettimeout()
            self.settimeout(0.0)  # send close_notify, do not wait for the peer's
            try:
                self.unwrap()
            except (OSError, ValueError):
                pass  # the peer is gone or answers later: nothing more to do
            finally:
                self.settimeout(timeout)
        finally:
            lock.release()


class TlsRefused(ConnectionRefusedError):
    """The destination refused this source's certificate: its TLS alert, read by a call
    that failed after the handshake (see the module docstring)."""


def _refusal(exc: ssl.SSLError) -> TlsRefused | None:
    """The refusal an alert from the server means; None for another error."""
    reason = exc.reason or ""
    if "ALERT" not in reason:
        return None
    meaning = _CLIENT_ALERTS.get(reason, "the receiver refused this source")
    return TlsRefused(errno.ECONNREFUSED, f"TLS: {meaning} ({reason})")


def _flat(view: memoryview) -> memoryview:
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


# -- the source's side -----------------------------------------------------------------------
def client_handshake(
    sock: socket.socket, config: TlsConfig, server_name: str, *, timeout: float, channel: str
) -> TlsSocket:
    """Run the TLS handshake on a connected socket; returns a blocking :class:`TlsSocket`.

    Raises:
        ChannelError: naming ``channel``: the handshake failed or timed out, the
            destination's certificate is not trusted or not for ``server_name``, or the
            destination refused our certificate. ``sock`` is closed then.
    """
    tls = config.client_context.wrap_socket(
        sock, server_hostname=server_name, do_handshake_on_connect=False
    )
    assert isinstance(tls, TlsSocket)
    try:
        tls.settimeout(timeout)
        tls.do_handshake()
        tls.settimeout(None)
    except (OSError, ValueError) as exc:
        tls.close()
        raise ChannelError(_client_failure(exc, server_name, timeout), channel=channel) from exc
    return tls


def _client_failure(exc: BaseException, server_name: str, timeout: float) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the receiver's certificate is not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        return "the receiver closed the connection during the TLS handshake (does it use TLS?)"
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake with {server_name!r} within {timeout:g} s (does it use TLS?)"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.strerror or str(exc)
        return f"TLS: {_CLIENT_ALERTS.get(reason, 'handshake failed')} ({reason})"
    return f"TLS handshake failed: {exc}"


# -- the destination's side ------------------------------------------------------------------
class ServerHandshake:
    """One accepted connection: its TLS handshake, then its first bytes, never blocking.

    Owned by the destination's setup thread. Call :meth:`step` whenever the socket is ready
    for what the previous call asked; once it returns 0, :attr:`sock` is blocking and will
    replay :attr:`head` before the rest of the stream.

    Args:
        sock: a freshly accepted connection (this object takes it over).
        context: :attr:`TlsConfig.server_context`.
        peer: the peer's address, for errors.
        head: how many bytes to read after the handshake (the channel magic).
    """

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, *, peer: str, head: int = 4
    ) -> None:
        sock.setblocking(False)
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        assert isinstance(tls, TlsSocket)
        self.sock: Final = tls
        self.peer: Final = peer
        self.head = b""
        self._head_size = head
        self.handshaken = False  # the peer is authenticated

    def step(self) -> int:
        """Advance; the ``selectors`` events to wait for, or 0 once :attr:`head` is in.

        Raises:
            ChannelRefused: the handshake failed (no or untrusted client certificate, not
                TLS, a socket error) or the peer closed before its first bytes.
        """
        try:
            if not self.handshaken:
                self.sock.do_handshake()
                self.handshaken = True
            while len(self.head) < self._head_size:
                data = self.sock.recv(self._head_size - len(self.head))
                if not data:
                    raise ChannelRefused("closed before its first bytes", peer=self.peer)
                self.head += data
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        except ssl.SSLError as exc:
            raise ChannelRefused(_server_failure(exc), peer=self.peer) from exc
        except OSError as exc:
            reason = f"TLS handshake failed: {exc.strerror or exc}"
            raise ChannelRefused(reason, peer=self.peer) from exc
        self.sock.replay(self.head)
        self.sock.settimeout(None)
        return 0


def _server_failure(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return "closed during the TLS handshake"
    reason = exc.reason or str(exc)
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "the client sent no certificate"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD"):
        return f"not a TLS client ({reason}): does the source use TLS?"
    return f"TLS handshake failed ({reason})"
