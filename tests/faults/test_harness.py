"""The fault proxy itself: a clean relay changes nothing, and each fault strikes where it is put."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from multifd.wire import stream
from tests.faults.harness import At, Fault, FaultProxy
from tests.faults.live import BOUND, LiveSource

STREAM = stream.file_header() + bytes(range(256)) * 256  # "main" by its magic, then noise


class Sink:
    """The far end: accepts one connection and records what arrives, and how it ended."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(BOUND)
        self.address = f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"
        self.data = bytearray()  # owned by the sink thread until it has been joined
        self.ending: str | None = None  # "eof" or the error that ended the connection
        self.conn: socket.socket | None = None
        self._accepted = threading.Event()  # signals: conn is set
        self.thread = threading.Thread(target=self._run, name="test-sink")
        self.thread.start()

    def _run(self) -> None:
        self.conn, _ = self._listener.accept()
        self._accepted.set()

    def read_until_end(self) -> None:
        """Read until EOF or an error (bounded by BOUND)."""
        assert self._accepted.wait(BOUND)
        assert self.conn is not None
        self.conn.settimeout(BOUND)
        try:
            while chunk := self.conn.recv(1 << 16):
                self.data += chunk
            self.ending = "eof"
        except OSError as exc:
            self.ending = type(exc).__name__

    def read_available(self, quiet: float) -> bool:
        """Read what comes until ``quiet`` seconds pass without data; False at EOF."""
        assert self._accepted.wait(BOUND)
        assert self.conn is not None
        while select.select([self.conn], [], [], quiet)[0]:
            chunk = self.conn.recv(1 << 16)
            if not chunk:
                return False
            self.data += chunk
        return True

    def close(self) -> None:
        self.thread.join(BOUND)
        if self.conn is not None:
            self.conn.close()
        self._listener.close()


@contextmanager
def proxied(*faults: Fault) -> Iterator[tuple[Sink, FaultProxy, socket.socket]]:
    sink = Sink()
    proxy = FaultProxy(sink.address, faults)
    port = int(proxy.address.rsplit(":", 1)[1])
    client = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    try:
        yield sink, proxy, client
    finally:
        client.close()
        proxy.close()
        sink.close()


def write_until_refused(client: socket.socket, data: bytes) -> str | None:
    """Write ``data`` again and again; the error that stopped it (None: never stopped)."""
    for _ in range(64):  # far more than the socket buffers hold
        try:
            client.sendall(data)
        except OSError as exc:
            return type(exc).__name__
    return None


def test_a_clean_relay_delivers_a_live_migration_exactly() -> None:
    source = LiveSource()
    try:
        attempt = source.migrate(None)
        received = attempt.destination.received
        assert received is not None, attempt.destination.error
        try:
            assert np.array_equal(received.ram["mem"].words, source.block.words)
        finally:
            received.ram.close()
    finally:
        source.close()


@pytest.mark.parametrize("offset", [0, 1, 4, 1000, 40000])
def test_close_on_the_destination_leg_cuts_at_the_byte(offset: int) -> None:
    with proxied(Fault("close", At("main", "byte", delta=offset))) as (sink, proxy, client):
        client.sendall(STREAM)
        sink.read_until_end()
        fired = proxy.wait_fired(BOUND)
    assert sink.ending == "eof"
    assert bytes(sink.data) == STREAM[:offset]
    assert fired is not None
    assert (fired.channel, fired.offset) == ("main", offset)


def test_reset_on_the_destination_leg_is_a_reset() -> None:
    with proxied(Fault("reset", At("main", "byte", delta=1000))) as (sink, _, client):
        client.sendall(STREAM)
        sink.read_until_end()
    assert sink.ending == "ConnectionResetError"
    assert bytes(sink.data) == STREAM[: len(sink.data)]
    assert len(sink.data) <= 1000


def test_corrupt_inverts_exactly_the_chosen_bytes() -> None:
    fault = Fault("corrupt", At("main", "byte", delta=5000), length=3)
    with proxied(fault) as (sink, _, client):
        client.sendall(STREAM)
        client.shutdown(socket.SHUT_WR)
        sink.read_until_end()
    expected = bytearray(STREAM)
    for i in range(5000, 5003):
        expected[i] ^= 0xFF
    assert sink.ending == "eof"
    assert sink.data == expected


@pytest.mark.parametrize("kind", ["close", "reset"])
def test_a_fault_on_the_source_leg_stops_the_writer_and_silences_the_far_end(kind: str) -> None:
    fault = Fault(kind, At("main", "byte", delta=2000), side="source")  # type: ignore[arg-type]
    with proxied(fault) as (sink, proxy, client):
        refused = write_until_refused(client, STREAM)
        assert sink.read_available(quiet=0.2), "the destination leg must stay open"
        assert bytes(sink.data) == STREAM[:2000]
        proxy.close()
        assert not sink.read_available(quiet=BOUND), "closing the proxy ends the silent leg"
    assert refused in ("BrokenPipeError", "ConnectionResetError")


def test_a_stall_keeps_both_legs_open_and_silent() -> None:
    with proxied(Fault("stall", At("main", "byte", delta=3000))) as (sink, proxy, client):
        client.settimeout(0.5)
        assert write_until_refused(client, STREAM) == "TimeoutError"  # the proxy reads no more
        assert sink.read_available(quiet=0.2)
        assert bytes(sink.data) == STREAM[:3000]
        proxy.close()
        assert not sink.read_available(quiet=BOUND)


def test_a_unit_trigger_lands_on_its_record() -> None:
    prologue = (
        stream.file_header()
        + stream.configuration("none")
        + stream.section_start(2, "ram", 0, 4)
        + stream.ram_mem_size([("mem", 1 << 20)])
        + stream.ram_eos()
        + stream.section_footer(2)
    )
    record = stream.section_part(2) + stream.ram_eos() + stream.section_footer(2)
    data = prologue + record * 3
    fault = Fault("close", At("main", "SectionPart", nth=2, delta=3))
    with proxied(fault) as (sink, _, client):
        client.sendall(data)
        sink.read_until_end()
    assert bytes(sink.data) == data[: len(prologue) + len(record) + 3]
