"""Transport: listen/connect over TCP and Unix sockets, classification, I/O."""

from __future__ import annotations

import os
import queue
import random
import socket
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import numpy as np
import pytest

from multifd import transport
from multifd.address import Address, parse_address
from multifd.errors import ChannelError, ConfigError, ProtocolError
from multifd.wire.packets import InitPacket

T = TypeVar("T")
WAIT = 10.0  # bound on every wait for another thread; never reached when the code works


class Background(Generic[T]):
    """Runs ``fn`` in a thread; :meth:`result` joins it and returns or re-raises."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._out: queue.Queue[tuple[bool, Any]] = queue.Queue()  # the one outcome of fn
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._out.put((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self._out.put((False, exc))

    def result(self, timeout: float = WAIT) -> T:
        ok, value = self._out.get(timeout=timeout)
        self._thread.join(timeout)
        if not ok:
            raise value
        return cast(T, value)


@pytest.fixture
def tcp_listener() -> Iterator[transport.Listener]:
    with transport.listen(parse_address("tcp:127.0.0.1:0")) as listener:
        yield listener


@pytest.fixture
def tcp_pair(tcp_listener: transport.Listener) -> Iterator[tuple[socket.socket, socket.socket]]:
    client = transport.connect(tcp_listener.address, timeout=WAIT, channel="main")
    server = tcp_listener.accept(WAIT)
    yield client, server
    client.close()
    server.close()


@pytest.fixture(params=["tcp", "unix"])
def pair(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, server) pair made by this module, over TCP or a Unix socket."""
    text = "tcp:127.0.0.1:0" if request.param == "tcp" else f"unix:{tmp_path}/s"
    with transport.listen(parse_address(text)) as listener:
        client = transport.connect(listener.address, timeout=WAIT, channel="main")
        server = listener.accept(WAIT)
    yield client, server
    client.close()
    server.close()


def _free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- listen / connect / accept ---------------------------------------------------------------
def test_listen_on_port_zero_reports_the_bound_port_and_accepts(
    tcp_pair: tuple[socket.socket, socket.socket], tcp_listener: transport.Listener
) -> None:
    client, server = tcp_pair
    assert tcp_listener.address.host == "127.0.0.1"
    assert tcp_listener.address.port == client.getpeername()[1] != 0
    for sock in (client, server):
        assert sock.gettimeout() is None  # blocking
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    client.sendall(b"ping")
    server.sendall(b"pong")
    assert server.recv(4) == b"ping"
    assert client.recv(4) == b"pong"


def test_listen_by_host_name_reports_a_numeric_address() -> None:
    with transport.listen(parse_address("tcp:localhost:0")) as listener:
        assert listener.address.host in ("127.0.0.1", "::1")
        assert listener.address.port != 0
        with transport.connect(listener.address, timeout=WAIT, channel="main"):
            listener.accept(WAIT).close()


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listen_and_connect() -> None:
    with transport.listen(parse_address("tcp:[::1]:0")) as listener:
        assert str(listener.address).startswith("tcp:[::1]:")
        with (
            transport.connect(listener.address, timeout=WAIT, channel="main") as client,
            listener.accept(WAIT) as server,
        ):
            client.sendall(b"v6")
            assert server.recv(2) == b"v6"


def test_unix_listen_connect_and_close_removes_the_path(tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    listener = transport.listen(parse_address(f"unix:{path}"))
    assert listener.address == Address("unix", path=str(path))
    assert path.is_socket()
    with (
        transport.connect(listener.address, timeout=WAIT, channel="main") as client,
        listener.accept(WAIT) as server,
    ):
        assert server.gettimeout() is None
        client.sendall(b"unix")
        assert server.recv(4) == b"unix"
    listener.close()
    assert not path.exists()
    listener.close()  # idempotent
    assert "closed" in repr(listener)


def test_unix_close_leaves_a_socket_someone_else_put_at_the_path(tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    listener = transport.listen(parse_address(f"unix:{path}"))
    path.unlink()
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        listener.close()
        assert path.is_socket()


def test_unix_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # closed without unlink: a stale socket file stays behind
    assert path.is_socket()
    with (
        transport.listen(parse_address(f"unix:{path}")) as listener,
        transport.connect(listener.address, timeout=WAIT, channel="main"),
    ):
        listener.accept(WAIT).close()


def test_unix_live_socket_is_not_replaced(tmp_path: Path) -> None:
    address = parse_address(f"unix:{tmp_path}/mig.sock")
    with transport.listen(address) as first:
        with pytest.raises(ChannelError, match="in use") as info:
            transport.listen(address)
        assert info.value.channel == "listener"
        with transport.connect(address, timeout=WAIT, channel="main"):
            first.accept(WAIT).close()  # the first listener still owns the path


def test_unix_non_socket_file_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_bytes(b"data")
    with pytest.raises(ConfigError, match="not a socket"):
        transport.listen(parse_address(f"unix:{path}"))
    assert path.read_bytes() == b"data"


def test_listen_on_a_busy_tcp_port_raises_channel_error(
    tcp_listener: transport.Listener,
) -> None:
    with pytest.raises(ChannelError, match="cannot listen on") as info:
        transport.listen(tcp_listener.address)
    assert isinstance(info.value.__cause__, OSError)


def test_accept_timeout_is_bounded(tcp_listener: transport.Listener) -> None:
    start = time.monotonic()
    with pytest.raises(ChannelError, match="no connection") as info:
        tcp_listener.accept(0.05)
    assert info.value.channel == "listener"
    assert 0.04 <= time.monotonic() - start < WAIT


def test_close_wakes_a_waiting_accept(tcp_listener: transport.Listener) -> None:
    waiter = Background(lambda: tcp_listener.accept(60.0))
    start = time.monotonic()
    tcp_listener.close()
    with pytest.raises(ChannelError, match=r"closed|shut down") as info:
        waiter.result()
    assert info.value.channel == "listener"
    assert time.monotonic() - start < WAIT


def test_accept_on_closed_listener_raises(tcp_listener: transport.Listener) -> None:
    tcp_listener.close()
    with pytest.raises(ChannelError, match="closed"):
        tcp_listener.accept(WAIT)


def test_connect_refused_names_channel_and_address() -> None:
    address = Address("tcp", host="127.0.0.1", port=_free_tcp_port())
    with pytest.raises(ChannelError) as info:
        transport.connect(address, timeout=WAIT, channel="multifd/3")
    assert info.value.channel == "multifd/3"
    assert f"connection refused by {address}" in str(info.value)
    assert str(info.value).startswith("multifd/3: ")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_connect_to_missing_unix_socket(tmp_path: Path) -> None:
    with pytest.raises(ChannelError, match=r"main: no socket at unix:.*nowhere"):
        transport.connect(parse_address(f"unix:{tmp_path}/nowhere"), timeout=WAIT, channel="main")


def test_connect_to_unresolvable_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no real DNS: no network needed
    address = Address("tcp", host="no-such-host.invalid", port=1)
    with pytest.raises(ChannelError, match=r"cannot resolve host 'no-such-host\.invalid'") as info:
        transport.connect(address, timeout=WAIT, channel="main")
    assert isinstance(info.value.__cause__, socket.gaierror)


def _fill_unix_backlog(listener: transport.Listener) -> list[socket.socket]:
    """Connect until the backlog is full (a blocking connect would now wait)."""
    queued: list[socket.socket] = []
    while True:
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        try:
            sock.connect(listener.address.path)
        except BlockingIOError:
            sock.close()
            return queued
        queued.append(sock)


def test_unix_connect_to_full_backlog_times_out(tmp_path: Path) -> None:
    with transport.listen(parse_address(f"unix:{tmp_path}/s"), backlog=1) as listener:
        queued = _fill_unix_backlog(listener)
        start = time.monotonic()
        with pytest.raises(ChannelError, match=r"no connection to unix:.* within 0.1 s"):
            transport.connect(listener.address, timeout=0.1, channel="multifd/0")
        assert 0.05 <= time.monotonic() - start < WAIT
        for sock in queued:
            sock.close()


def test_unix_connect_waits_for_backlog_room(tmp_path: Path) -> None:
    with transport.listen(parse_address(f"unix:{tmp_path}/s"), backlog=1) as listener:
        queued = _fill_unix_backlog(listener)
        late = Background(lambda: transport.connect(listener.address, timeout=WAIT, channel="m"))
        accepted = [listener.accept(WAIT) for _ in queued]  # makes room for the late one
        accepted.append(listener.accept(WAIT))
        client = late.result()
        client.sendall(b"late")
        assert accepted[-1].recv(4) == b"late"
        assert client.gettimeout() is None
        for sock in [*queued, *accepted, client]:
            sock.close()


# -- classify --------------------------------------------------------------------------------
def test_classify_main_without_consuming(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(b"QEVM\x00\x00\x00\x03")
    assert transport.classify(server, timeout=WAIT) == "main"
    assert server.recv(8) == b"QEVM\x00\x00\x00\x03"


def test_classify_multifd(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    init = InitPacket(channel_id=2).pack()
    client.sendall(init)
    assert transport.classify(server, timeout=WAIT) == "multifd"
    assert server.recv(len(init), socket.MSG_WAITALL) == init  # classify() consumed nothing


def test_classify_magic_arriving_in_pieces(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(b"\x11\x22")
    waiter = Background(lambda: transport.classify(server, timeout=WAIT))
    client.sendall(b"\x33\x44")
    assert waiter.result() == "multifd"


def test_classify_garbage_is_a_protocol_error(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError) as info:
        transport.classify(server, timeout=WAIT)
    assert info.value.channel == "unclassified"
    assert info.value.expected == "QEVM (main) or 0x11223344 (multifd)"
    assert info.value.received == "47455420"


@pytest.mark.parametrize("sent", [b"", b"QE"])
def test_classify_eof_before_four_bytes(
    pair: tuple[socket.socket, socket.socket], sent: bytes
) -> None:
    client, server = pair
    client.sendall(sent)
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelError, match=f"after {len(sent)} of 4") as info:
        transport.classify(server, timeout=WAIT)
    assert info.value.channel == "unclassified"


@pytest.mark.parametrize("sent", [b"", b"QEV"])
def test_classify_timeout_is_bounded(
    pair: tuple[socket.socket, socket.socket], sent: bytes
) -> None:
    client, server = pair
    client.sendall(sent)
    start = time.monotonic()
    with pytest.raises(ChannelError, match="no channel magic within") as info:
        transport.classify(server, timeout=0.05)
    assert info.value.channel == "unclassified"
    assert 0.04 <= time.monotonic() - start < WAIT


# -- teardown --------------------------------------------------------------------------------
def test_shutdown_quietly_wakes_a_blocked_receiver(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    _, server = pair
    view = memoryview(bytearray(16))
    waiter = Background(lambda: server.recv_into(view))
    transport.shutdown_quietly(server)
    assert waiter.result() == 0  # woken: end of stream
    transport.shutdown_quietly(server)  # twice, and on a closed socket: no error
    transport.close_quietly(server)
    transport.shutdown_quietly(server)
    transport.close_quietly(server)


# -- send_all --------------------------------------------------------------------------------
class TrickleSocket:
    """Stands in for a socket whose sendmsg takes at most ``limit`` bytes per call."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = bytearray()
        self.calls: list[list[memoryview]] = []

    def sendmsg(self, buffers: Sequence[memoryview]) -> int:
        self.calls.append(list(buffers))
        taken = 0
        for buf in buffers:
            part = bytes(buf[: self.limit - taken])
            self.received += part
            taken += len(part)
            if taken == self.limit:
                break
        return taken


def test_a_trickling_peer_cannot_stretch_a_write_past_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each partial write restarts the kernel's SO_SNDTIMEO; the call's own bound does not.
    clock = iter(range(100))  # one "second" passes per sendmsg
    fake_time = types.SimpleNamespace(monotonic=lambda: float(next(clock)))
    monkeypatch.setattr("multifd.transport.time", fake_time)
    fake = TrickleSocket(limit=1)
    with pytest.raises(TimeoutError):
        transport.write_buffers(cast(socket.socket, fake), [b"x" * 50], 50, timeout=3.0)
    assert 3 <= len(fake.calls) <= 5
    with pytest.raises(ChannelError, match="main: send of 50 bytes failed") as info:
        transport.send_all(cast(socket.socket, fake), [b"x" * 50], channel="main", timeout=3.0)
    assert "(the peer is not reading, or too slowly; a destination that failed" in str(info.value)


def test_send_all_loops_on_partial_sends_without_copying() -> None:
    header = b"H" * 10
    page = bytearray(os.urandom(4096))
    pages = np.frombuffer(os.urandom(2 * 4096), dtype=np.uint8).reshape(2, 4096)
    buffers: list[bytes | memoryview] = [header, memoryview(page), b"", pages.data]
    fake = TrickleSocket(limit=1000)
    total = transport.send_all(cast(socket.socket, fake), buffers, channel="multifd/2")
    expected = header + page + pages.tobytes()
    assert total == len(expected)
    assert fake.received == expected
    assert len(fake.calls) == -(-len(expected) // 1000)
    assert len(fake.calls[0]) == 3  # one sendmsg for everything, the empty buffer dropped
    resumed = fake.calls[1][0]  # the rest of `page` after the first 1000 bytes
    assert resumed.obj is page
    assert resumed.nbytes == 4096 + 10 - 1000


def test_send_all_more_buffers_than_iov_max() -> None:
    buffers: list[bytes | memoryview] = [bytes([i % 256]) * 3 for i in range(3000)]
    fake = TrickleSocket(limit=1 << 30)
    assert transport.send_all(cast(socket.socket, fake), buffers, channel="main") == 9000
    assert fake.received == b"".join(cast(list[bytes], buffers))
    assert [len(call) for call in fake.calls] == [1024, 1024, 952]


def test_send_to_a_closed_peer_says_the_peer_closed_it() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with ours, pytest.raises(ChannelError) as info:
        transport.send_all(ours, [b"x" * 4096], channel="main")
    assert info.value.channel == "main"
    assert "Broken pipe (the peer closed the connection" in str(info.value)


def test_send_all_nothing_sends_nothing() -> None:
    fake = TrickleSocket(limit=1)
    assert transport.send_all(cast(socket.socket, fake), [b"", b""], channel="main") == 0
    assert fake.calls == []


class CountingSocket(socket.socket):
    """A real socket that records what each sendmsg call took."""

    taken: list[int]

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        count = super().sendmsg(buffers, *args)
        self.taken.append(count)
        return count


def test_send_all_partial_sends_on_a_real_socket() -> None:
    left, right = socket.socketpair()
    sender = CountingSocket(left.family, left.type, fileno=left.detach())
    sender.taken = []
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    # A Python timeout makes the fd non-blocking, so the kernel takes what fits each time.
    sender.settimeout(WAIT)
    rng = random.Random(3)
    buffers: list[bytes | memoryview] = [rng.randbytes(rng.randrange(1, 70000)) for _ in range(40)]
    expected = b"".join(cast(list[bytes], buffers))

    def read_all() -> bytes:
        chunks = []
        while chunk := right.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)

    reader = Background(read_all)
    try:
        assert transport.send_all(sender, buffers, channel="main") == len(expected)
    finally:
        sender.close()
    assert reader.result() == expected
    right.close()
    assert len(sender.taken) > 1
    assert min(sender.taken) < len(expected)


def test_send_all_to_a_closed_peer_is_a_channel_error() -> None:
    left, right = socket.socketpair()
    right.close()
    with pytest.raises(ChannelError, match="send of 3 bytes failed") as info:
        transport.send_all(left, [b"abc"], channel="multifd/4")
    assert info.value.channel == "multifd/4"
    assert isinstance(info.value.__cause__, OSError)
    left.close()
