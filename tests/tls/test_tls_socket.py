"""TlsSocket: the plain-socket calls the engine makes, timeouts, shutdown, credentials."""

from __future__ import annotations

import dataclasses
import queue
import selectors
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from multifd import transport
from multifd.address import parse_address
from multifd.engine.pageio import recv_exact, recv_exact_into
from multifd.errors import ConfigError
from multifd.tls import ServerHandshake, TlsConfig, TlsSocket
from multifd.transport import write_buffers
from tests.tls.helpers import WAIT
from tests.tls.pki import Pki

Pair = tuple[TlsSocket, TlsSocket]


def _serve(listener: transport.Listener, context: ssl.SSLContext) -> TlsSocket:
    """Accept one connection and run its handshake to the end (4 head bytes)."""
    with selectors.DefaultSelector() as selector:
        selector.register(listener.socket, selectors.EVENT_READ)
        assert selector.select(WAIT)
        sock = listener.try_accept()
        assert sock is not None
        handshake = ServerHandshake(sock, context, peer="test")
        selector.register(handshake.sock, selectors.EVENT_READ)
        while events := handshake.step():
            selector.modify(handshake.sock, events)
            assert selector.select(WAIT)
        return handshake.sock


@pytest.fixture
def pair(pki: Pki) -> Iterator[Pair]:
    """(client, server): the server's first 4 bytes, ``HEAD``, are waiting to be replayed."""
    with transport.listen(parse_address("tcp:127.0.0.1:0", tls=pki.dest)) as listener:
        served: queue.Queue[TlsSocket | BaseException] = queue.Queue()  # the server end
        thread = threading.Thread(
            target=lambda: served.put(_serve(listener, pki.dest.server_context))
        )
        thread.start()
        client = transport.connect(
            dataclasses.replace(listener.address, tls=pki.source), timeout=WAIT, channel="main"
        )
        assert isinstance(client, TlsSocket)
        client.sendall(b"HEAD")
        server = served.get(timeout=WAIT)
        thread.join(WAIT)
    assert isinstance(server, TlsSocket)
    client.settimeout(WAIT)
    server.settimeout(WAIT)
    yield client, server
    client.close()
    server.close()


def test_replayed_head_then_gathered_writes_arrive_in_order(pair: Pair) -> None:
    client, server = pair
    rng = np.random.default_rng(1)
    run = memoryview(rng.bytes(300_000))
    pages = np.frombuffer(rng.bytes(3 * 4096), dtype=np.uint8).reshape(3, 4096)
    buffers: list[bytes | memoryview] = [
        b"h" * 1344,
        run,
        b"t",
        pages.data,  # 2-D, as numpy page arrays are
        *[bytes([i % 256]) * 7 for i in range(600)],
    ]
    total = sum(memoryview(b).nbytes for b in buffers)
    write_buffers(client, buffers, total)
    received = bytearray(4 + total)
    view = memoryview(received)
    assert recv_exact(server, view[:1000]) == 1000
    assert recv_exact_into(server, [view[1000:5000], view[5000:]]) == 4 + total - 1000
    expected = b"HEAD" + b"".join(bytes(memoryview(b)) for b in buffers)
    assert received == expected


def test_a_read_with_all_flag_returns_what_came_then_times_out(pair: Pair) -> None:
    client, server = pair
    transport.set_io_timeout(server, 0.2)
    assert server.gettimeout() == 0.2  # Python-level: kernel timers hang an SSLSocket
    client.sendall(b"abc")
    buffer = bytearray(16)
    assert server.recv_into(buffer, 4 + 7, socket.MSG_WAITALL) == 7  # HEAD + abc
    assert bytes(buffer[:7]) == b"HEADabc"
    with pytest.raises(TimeoutError):
        server.recv_into(buffer, 10, socket.MSG_WAITALL)


def test_shutdown_from_another_thread_ends_a_blocked_read(pair: Pair) -> None:
    _, server = pair
    assert server.recv(4) == b"HEAD"
    outcome: queue.Queue[int | BaseException] = queue.Queue()  # the reader's result

    def read() -> None:
        try:
            outcome.put(server.recv_into(bytearray(10), 10, socket.MSG_WAITALL))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.put(exc)

    reader = threading.Thread(target=read)
    reader.start()
    server.shutdown(socket.SHUT_RDWR)
    result = outcome.get(timeout=WAIT)
    reader.join(WAIT)
    assert result == 0 or isinstance(result, OSError), repr(result)


@pytest.mark.parametrize("clean", [True, False])
def test_the_source_ends_its_stream_with_close_notify(pair: Pair, clean: bool) -> None:
    client, server = pair
    server.suppress_ragged_eofs = False  # type: ignore[attr-defined]  # an end without close_notify raises
    assert server.recv(4) == b"HEAD"
    if clean:
        client.shutdown(socket.SHUT_RDWR)
        assert server.recv_into(bytearray(8)) == 0
    else:  # what a torn-down source does: the socket goes, no goodbye
        socket.socket.shutdown(client, socket.SHUT_RDWR)
        with pytest.raises(ssl.SSLEOFError):
            server.recv_into(bytearray(8))


def test_calls_a_tls_socket_cannot_honour_are_refused(pair: Pair) -> None:
    client, server = pair
    with pytest.raises(ValueError, match="flags"):
        server.recv_into(bytearray(4), 4, socket.MSG_PEEK)
    with pytest.raises(ValueError, match="buffers only"):
        client.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"")])
    with pytest.raises(ValueError, match="ancillary"):
        server.recvmsg_into([bytearray(4)], 64)


def test_plain_sockets_keep_kernel_timers(pki: Pki) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        transport.set_io_timeout(ours, 0.2)
        assert ours.gettimeout() is None
        assert type(ours) is socket.socket  # no wrapper when TLS is off


def test_credentials_are_checked_before_anything_starts(pki: Pki, tmp_path: Path) -> None:
    folder = pki.folder
    with pytest.raises(ConfigError, match="does not exist"):
        TlsConfig(cert=tmp_path / "nope.pem", key=folder / "dest.key", ca=folder / "ca.pem")
    swapped = TlsConfig(cert=folder / "dest.pem", key=folder / "source.key", ca=folder / "ca.pem")
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        _ = swapped.server_context
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load the TLS CA"):
        _ = dataclasses.replace(pki.source, ca=not_pem).client_context
    with pytest.raises(ConfigError, match="must not be empty"):
        dataclasses.replace(pki.source, hostname="")


def test_the_name_the_source_checks(pki: Pki) -> None:
    assert pki.source.server_name("10.0.0.1", unix=False) == "10.0.0.1"
    assert pki.source.server_name("", unix=False) == "localhost"
    assert pki.config("source", hostname="dest.test").server_name("h", unix=True) == "dest.test"
    with pytest.raises(ConfigError, match="unix"):
        pki.source.server_name("", unix=True)


def test_a_failed_write_keeps_the_bytes_it_looked_past_for_an_alert(pair: Pair) -> None:
    """A write that fails makes the source look for the destination's alert; a byte of
    application data it finds instead (the return path's SHUT) is read again later."""
    client, server = pair
    server.sendall(b"xyz")
    client.sendall(b"unread")  # still unread at the close: the server's kernel resets
    socket.socket.close(server)
    with pytest.raises(ConnectionError):
        _write_until_it_fails(client)
    buffer = bytearray(3)
    assert client.recv_into(buffer, 3, socket.MSG_WAITALL) == 3
    assert bytes(buffer) == b"xyz"


def _write_until_it_fails(sock: TlsSocket) -> None:
    for _ in range(1000):  # a reset arrives within a few writes
        sock.sendmsg([b"more data"])
