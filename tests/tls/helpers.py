"""Clients that should be refused, and a relay that records what travels on the wire."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

from multifd.address import parse_address
from multifd.wire import stream
from multifd.wire.packets import InitPacket
from tests.migration.helpers import BOUND

WAIT = 10.0  # bound on each wait for the destination's answer


def first_bytes(kind: str, index: int = 0, uuid: bytes = bytes(16)) -> bytes:
    """What a source writes first on a channel: the stream header or an init packet."""
    return stream.file_header() if kind == "main" else InitPacket(index, uuid).pack()


def tcp_target(address: str) -> tuple[str, int]:
    parsed = parse_address(address)
    return parsed.host, parsed.port


def bad_tls_context(pki_folder: Path, cert: str | None) -> ssl.SSLContext:
    """A client context trusting our CA, presenting ``cert`` (None: no certificate)."""
    context = ssl.create_default_context(cafile=pki_folder / "ca.pem")
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        context.load_cert_chain(pki_folder / f"{cert}.pem", pki_folder / f"{cert}.key")
    return context


def attempt(address: str, context: ssl.SSLContext | None, first: bytes) -> str:
    """Connect as a channel and return how the peer ended the connection.

    Over TLS (``context``), ``first`` follows the handshake only if the destination does
    not answer it (a refusal alert arrives at once: writing first could make the
    destination's close a reset that overtakes the alert). Returns the TLS alert's reason,
    ``"closed"`` or ``"reset"``; never waits more than :data:`WAIT` seconds.
    """
    sock = socket.create_connection(tcp_target(address), timeout=WAIT)
    try:
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="localhost")
            sock.recv(4096)  # the refusal (a destination sends nothing else)
        sock.sendall(first)
        while sock.recv(4096):
            pass
    except ssl.SSLError as exc:
        return str(exc.reason)
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    finally:
        sock.close()
    return "closed"


class Relay:
    """Forwards ``count`` TCP connections to ``target`` and keeps what each client sent.

    One thread accepts, two threads per connection copy bytes (one per direction); all
    end when both ends close. :meth:`close` joins them and closes the sockets.
    """

    def __init__(self, target: tuple[str, int], count: int) -> None:
        self._target = target
        self._count = count
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"
        self.sent: list[bytearray] = []  # client to destination, one per connection
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="relay-accept")]
        self._threads[0].start()

    def _accept(self) -> None:
        with self._listener:
            for _ in range(self._count):
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._target, timeout=BOUND)
                self._sockets += (client, upstream)
                record = bytearray()
                self.sent.append(record)
                for src, dst, keep in ((client, upstream, record), (upstream, client, None)):
                    thread = threading.Thread(target=_pump, args=(src, dst, keep), name="relay")
                    self._threads.append(thread)
                    thread.start()

    def close(self) -> None:
        for thread in self._threads:
            thread.join(BOUND)
        for sock in self._sockets:
            sock.close()
        assert not any(thread.is_alive() for thread in self._threads)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _pump(src: socket.socket, dst: socket.socket, keep: bytearray | None) -> None:
    src.settimeout(BOUND)
    with contextlib.suppress(OSError):  # either end reset: the copy is over
        while data := src.recv(1 << 16):
            dst.sendall(data)
            if keep is not None:
                keep += data
    with contextlib.suppress(OSError):  # the other end is gone already
        dst.shutdown(socket.SHUT_WR)
