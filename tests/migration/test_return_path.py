"""QEMU's return path between Python peers: the source completes only on the destination's word.

The destination answers ``MIG_CMD_PING`` with a PONG and ends with a SHUT carrying its
outcome; the source waits for it (at most ``io_timeout``) after its last byte. Raw peers
written here check each end alone, byte for byte.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import multifd
from multifd import api, cli
from multifd.address import parse_address
from multifd.engine.recv import Receiver
from multifd.errors import ChannelError, MigrationCancelled, MigrationFailed, ProtocolError
from multifd.migration.precopy import Hooks, Precopy, StaticTracker
from multifd.wire import return_path as rp
from multifd.wire import stream as s
from multifd.wire.compat import profile
from tests.faults.harness import At, Fault, FaultProxy
from tests.faults.live import CHANNELS, IO_TIMEOUT, DestinationRun, LiveSource
from tests.migration.helpers import BOUND, ReceiverThread, assert_same, make_ram

RAM_ID = 2


# -- helpers --------------------------------------------------------------------------------
def whole_stream(*, open_return_path: bool = True, ping: int | None = None) -> bytes:
    """A complete one-block migration without multifd, as our source writes it."""
    return (
        s.file_header()
        + s.configuration("none")
        + (s.open_return_path() if open_return_path else b"")
        + (s.ping(ping) if ping is not None else b"")
        + s.section_start(RAM_ID, "ram", 0, 4)
        + s.ram_mem_size([("mem", 4 * 4096)])
        + s.ram_eos()
        + s.section_footer(RAM_ID)
        + s.section_end(RAM_ID)
        + s.ram_page_header(4096, "mem")
        + bytes([7]) * 4096
        + s.ram_eos()
        + s.section_footer(RAM_ID)
        + s.timer_section(0)
        + s.globalstate_section(4)
        + s.eof()
        + s.vmdescription(b"{}")
    )


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


class FakeDestination:
    """Accepts one main channel, reads the stream to its end, then does ``answer``.

    ``answer`` is bytes to send back and close, ``None`` to close at once, or ``"silent"``
    to keep the connection open and say nothing until :meth:`close`.
    """

    def __init__(self, answer: bytes | str | None) -> None:
        self.answer = answer
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(BOUND)
        self.address = f"tcp:127.0.0.1:{self._server.getsockname()[1]}"
        self.received = bytearray()  # owned by the thread until it is joined
        self._done = threading.Event()  # signals: the test is over, hang up
        self._thread = threading.Thread(target=self._run, name="test-fake-destination")
        self._thread.start()

    def _run(self) -> None:
        conn, _ = self._server.accept()
        with conn:
            conn.settimeout(BOUND)
            while chunk := conn.recv(1 << 16):  # the source half-closes after its last byte
                self.received += chunk
            if self.answer == "silent":
                self._done.wait(BOUND)
            elif isinstance(self.answer, bytes):
                conn.sendall(self.answer)

    def close(self) -> None:
        self._done.set()
        self._thread.join(BOUND)
        self._server.close()
        assert not self._thread.is_alive()


@pytest.fixture
def fake() -> Iterator[list[FakeDestination]]:
    made: list[FakeDestination] = []
    yield made
    for one in made:
        one.close()


def fail_after_the_last_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the destination's last check fail: every byte arrived, the migration fails."""
    finish = Receiver.finish

    def failing(self: Receiver, timeout: float) -> None:
        finish(self, timeout)
        raise ChannelError("a check at completion failed", channel="multifd/0")

    monkeypatch.setattr(Receiver, "finish", failing)


# -- Python to Python -----------------------------------------------------------------------
@pytest.mark.parametrize("return_path", [True, False])
def test_a_migration_completes_with_or_without_it(
    return_path: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="multifd")
    source = make_ram(1, {"mem": 1 << 20})
    receiver = ReceiverThread({"channels": 2})
    stats = multifd.send(receiver.start("tcp:127.0.0.1:0"), source, return_path=return_path)
    received = receiver.result()
    try:
        assert stats.status is received.stats.status is multifd.Status.COMPLETED
        assert_same(source, received.ram)
    finally:
        received.ram.close()
    heard = "the destination completed the migration (SHUT status 0)" in caplog.text
    assert heard is return_path
    assert ("SHUT(0) sent on the return path" in caplog.text) is return_path


@pytest.mark.parametrize("return_path", [True, False])
def test_a_destination_failing_after_the_last_byte(
    return_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F1: without the return path the source says completed; with it, it fails at once."""
    fail_after_the_last_byte(monkeypatch)
    source = make_ram(2, {"mem": 1 << 20})
    receiver = ReceiverThread({"channels": 2})
    address = receiver.start("tcp:127.0.0.1:0")
    began = time.monotonic()
    if not return_path:
        stats = multifd.send(address, source, return_path=False)
        assert stats.status is multifd.Status.COMPLETED  # the false completion of F1
    else:
        with pytest.raises(MigrationFailed) as info:
            multifd.send(address, source, io_timeout=5.0)
        assert time.monotonic() - began < 2.0  # told at once, not after io_timeout
        assert info.value.channel == "main (return path)"
        assert "the destination failed the migration (SHUT status 1)" in str(info.value)
    with pytest.raises(MigrationFailed, match="a check at completion failed"):
        receiver.result()


@pytest.mark.parametrize("return_path", [True, False])
def test_a_corrupt_last_sync_packet(return_path: bool) -> None:
    """The last SYNC of multifd/1 is corrupted on the wire: the destination fails after the
    source's last byte left."""
    block = multifd.RamBlock.anonymous("mem", 256 * 4096)
    destination = DestinationRun()
    fault = Fault("corrupt", At("multifd/1", "sync", 3, 0))  # setup, pass 1, completion
    try:
        with FaultProxy(destination.start(), [fault]) as proxy:
            error: BaseException | None = None
            try:
                multifd.send(
                    proxy.address, {"mem": block}, channels=CHANNELS, io_timeout=IO_TIMEOUT,
                    return_path=return_path,
                )  # fmt: skip
            except MigrationFailed as exc:
                error = exc
            destination.join()
            assert proxy.wait_fired(0) is not None
        assert isinstance(destination.error, MigrationFailed)
        assert "packet magic" in str(destination.error)
        if return_path:
            assert isinstance(error, MigrationFailed)
            assert error.channel == rp.RETURN_PATH
            assert "SHUT status 1" in str(error)
        else:
            assert error is None  # F1: the source cannot know
    finally:
        block.close()


def test_a_failed_shut_gives_every_page_back_and_resumes_the_writers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Precopy treats a SHUT failure like any failure after switchover."""
    source = LiveSource()
    try:
        with monkeypatch.context() as patch:
            fail_after_the_last_byte(patch)
            attempt = source.migrate(None)
        assert isinstance(attempt.source_error, MigrationFailed)
        assert attempt.source_error.channel == rp.RETURN_PATH
        assert not source.writer.paused, "the writers stay paused after a failure"
        source.undelivered_pages_are_dirty()
        assert np.array_equal(source.block.words, source.writer.expected)
        source.fresh_attempt()
    finally:
        source.close()


@pytest.mark.parametrize("when", ["during the last write", "while waiting for the SHUT"])
def test_a_cancel_after_the_last_byte_left_is_too_late(
    when: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the destination has everything it may run: a cancel must not resume the writers."""
    caplog.set_level(logging.WARNING, logger="multifd.precopy")
    ram = make_ram(3, {"mem": 1 << 20})
    resumed = threading.Event()  # the resume hook ran: both sides would run
    stopped = threading.Event()  # the stopped hook ran: the writers stay paused
    migration = Precopy(
        StaticTracker(ram), profile("native"), channels=CHANNELS, io_timeout=IO_TIMEOUT,
        hooks=Hooks(resume=resumed.set, stopped=stopped.set), return_path=True,
    )  # fmt: skip
    name = "complete" if when == "during the last write" else "await_destination"
    step = getattr(migration._source, name)

    def step_with_cancel(*args: Any) -> None:
        if name == "complete":
            step(*args)
            migration.cancel()  # the sockets are shut down: the SHUT cannot be heard
        else:
            migration.cancel()  # ignored: too late
            step(*args)

    monkeypatch.setattr(migration._source, name, step_with_cancel)
    destination = DestinationRun()
    stats = migration.migrate(parse_address(destination.start()))
    destination.join()
    received = destination.received
    assert received is not None, destination.error
    try:
        assert_same(ram, received.ram)
    finally:
        received.ram.close()
    assert stats.status is multifd.Status.COMPLETED
    assert stopped.is_set()
    assert not resumed.is_set()
    late = "the migration completed" if name == "complete" else "too late"
    assert f"cancel came after the last byte left: {late}" in caplog.text


def test_a_cancel_before_the_end_still_cancels() -> None:
    ram = make_ram(4, {"mem": 1 << 20})
    migration = Precopy(StaticTracker(ram), profile("native"), return_path=True)
    destination = DestinationRun()
    migration._source.setup = migration.cancel  # type: ignore[method-assign]
    with pytest.raises(MigrationCancelled):
        migration.migrate(parse_address(destination.start()))
    destination.join()
    assert destination.error is not None


# -- the source against raw destinations ----------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "what"),
    [
        (None, "closed the connection without a SHUT"),
        (rp.shut(0)[:6], "return path ended inside a message"),
        (bytes.fromhex("0009 0000"), "unknown return-path message type"),
        (bytes.fromhex("0004 000c") + bytes(12), "postcopy message"),
        (rp.shut(7), "the destination failed the migration (SHUT status 7)"),
    ],
    ids=["eof", "cut-shut", "unknown-type", "postcopy", "status-7"],
)
def test_the_source_fails_on_anything_but_shut_0(
    answer: bytes | None, what: str, fake: list[FakeDestination]
) -> None:
    destination = FakeDestination(answer)
    fake.append(destination)
    with pytest.raises(MigrationFailed, match=re.escape(what)) as info:
        multifd.send(destination.address, make_ram(5, {"mem": 1 << 16}), channels=0)
    assert info.value.channel == rp.RETURN_PATH


def test_pongs_and_switchover_acks_before_the_shut_are_skipped(
    fake: list[FakeDestination],
) -> None:
    answer = rp.switchover_ack() + rp.pong(1) + rp.shut(0)
    destination = FakeDestination(answer)
    fake.append(destination)
    stats = multifd.send(destination.address, make_ram(6, {"mem": 1 << 16}), channels=0)
    assert stats.status is multifd.Status.COMPLETED


def test_a_silent_destination_fails_the_source_after_io_timeout(
    fake: list[FakeDestination],
) -> None:
    destination = FakeDestination("silent")
    fake.append(destination)
    began = time.monotonic()
    with pytest.raises(MigrationFailed, match=r"no SHUT from the destination within 0.5 s") as info:
        multifd.send(destination.address, make_ram(7, {"mem": 1 << 16}), channels=0, io_timeout=0.5)
    took = time.monotonic() - began
    assert info.value.channel == rp.RETURN_PATH
    assert 0.5 <= took < 2.0


def test_the_command_comes_right_after_the_configuration(fake: list[FakeDestination]) -> None:
    """Where QEMU's migration thread sends it: after qemu_savevm_state_header."""
    destination = FakeDestination(rp.shut(0))
    fake.append(destination)
    multifd.send(destination.address, make_ram(8, {"mem": 1 << 16}), channels=0)
    destination.close()
    head = s.file_header() + s.configuration("none") + s.open_return_path()
    assert bytes(destination.received).startswith(head + s.section_start(RAM_ID, "ram", 0, 4))


# -- the destination against a raw source ---------------------------------------------------
def raw_source(data: bytes) -> tuple[socket.socket, ReceiverThread]:
    receiver = ReceiverThread({"channels": 0, "io_timeout": 2.0})
    address = parse_address(receiver.start("tcp:127.0.0.1:0"))
    sock = socket.create_connection((address.host, address.port), timeout=BOUND)
    sock.sendall(data)
    return sock, receiver


def test_the_destination_answers_ping_then_shut_without_waiting_for_eof() -> None:
    """Like a QEMU source, this one keeps its socket open until it hears the SHUT."""
    sock, receiver = raw_source(whole_stream(ping=0xCAFE))
    with sock:
        assert read_exactly(sock, 16) == rp.pong(0xCAFE) + rp.shut(0)
        assert sock.recv(16) == b""  # then it hangs up
    received = receiver.result()
    try:
        assert received.stats.status is multifd.Status.COMPLETED
        assert bytes(received.ram["mem"].pages[1]) == bytes([7]) * 4096
    finally:
        received.ram.close()


def test_a_failing_destination_says_shut_1() -> None:
    data = whole_stream()
    cut = data.index(s.eof() + s.vmdescription(b"{}"))
    sock, receiver = raw_source(data[:cut] + b"\x42")  # a record type that does not exist
    with sock:
        assert read_exactly(sock, 8) == rp.shut(1)
    with pytest.raises(MigrationFailed) as info:
        receiver.result()
    assert isinstance(info.value.__cause__, ProtocolError)


def test_without_the_command_nothing_comes_back() -> None:
    sock, receiver = raw_source(whole_stream(open_return_path=False))
    with sock:
        sock.shutdown(socket.SHUT_WR)  # without a return path the stream ends with EOF
        assert sock.recv(16) == b""
    received = receiver.result()
    received.ram.close()


def test_a_ping_without_a_return_path_is_refused() -> None:
    sock, receiver = raw_source(whole_stream(open_return_path=False, ping=1))
    with sock, pytest.raises(MigrationFailed, match="MIG_CMD_PING") as info:
        receiver.result()
    assert info.value.channel == "main"


# -- options --------------------------------------------------------------------------------
@pytest.mark.parametrize(("flag", "expected"), [((), True), (("--no-return-path",), False)])
def test_the_cli_passes_the_option_on(
    flag: tuple[str, ...], expected: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_send(*_args: Any, **options: Any) -> None:
        seen.update(options)
        raise MigrationCancelled("stop here")

    monkeypatch.setattr(api, "send", fake_send)
    image = tmp_path / "ram.img"
    image.write_bytes(bytes(4096))
    args = ["send", "tcp:127.0.0.1:9", "--block", f"mem={image}", *flag]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 130, result.output
    assert seen["return_path"] is expected
