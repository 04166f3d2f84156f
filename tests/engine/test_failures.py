"""Failures: dead, stalled and vanishing peers, aborts, closes; I6 (no thread outlives them)."""

from __future__ import annotations

import socket
import threading

import numpy as np
import numpy.typing as npt
import pytest

from multifd.engine.recv import Receiver
from multifd.engine.send import Sender
from multifd.errors import ChannelError, ConfigError, MigrationFailed, ProtocolError
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import PAGE_SIZE
from multifd.wire.packets import InitPacket, RamPacket
from tests.engine.helpers import (
    TIMEOUT,
    TRANSPORTS,
    Recorder,
    Transport,
    engine_threads,
    link,
    make_pairs,
)

BIG = 16 << 20  # larger than any socket buffer: a peer that does not read stalls the writer


def filled_block(size: int = BIG) -> RamBlock:
    block = RamBlock.anonymous("mem", size)
    block.pages[:, :16] = 0xAB
    return block


def all_pages(block: RamBlock) -> npt.NDArray[np.int64]:
    return np.arange(block.page_count, dtype=np.int64) * PAGE_SIZE


class Drain:
    """Reads a socket to its end in a thread, like a peer that keeps up."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.thread = threading.Thread(target=self._run, name="test-drain")
        self.thread.start()

    def _run(self) -> None:
        buffer = bytearray(1 << 16)
        try:
            while self.sock.recv_into(buffer):
                pass
        except OSError:
            pass  # reset by the dying sender: the end we wait for

    def join(self) -> None:
        self.thread.join(TIMEOUT)
        self.sock.close()


class Background:
    """Runs a call in a thread and keeps what it raised."""

    def __init__(self, call: object) -> None:
        self.error: BaseException | None = None
        self._call = call
        self.thread = threading.Thread(target=self._run, name="test-requester")
        self.thread.start()

    def _run(self) -> None:
        try:
            self._call()  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc

    def join(self) -> BaseException | None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the call did not return after the shutdown"
        return self.error


# --- sender side --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_peer_closing_one_channel_fails_the_sender(transport: Transport) -> None:
    block = filled_block(1 << 20)
    pairs = make_pairs(2, transport)
    sender = Sender([a for a, _ in pairs], io_timeout=TIMEOUT)
    drain = Drain(pairs[0][1])
    pairs[1][1].close()  # the peer of channel 1 dies

    def migrate() -> None:
        for _ in range(100):  # TCP may buffer a few writes before the reset shows
            sender.send_pages(block, all_pages(block))
            sender.sync()

    try:
        sender.start()
        with pytest.raises(MigrationFailed) as info:
            migrate()
    finally:
        sender.close()
        drain.join()
    assert info.value.channel == "multifd/1"
    cause = info.value.__cause__
    assert isinstance(cause, ChannelError)
    assert cause.channel == "multifd/1"
    assert isinstance(cause.__cause__, OSError)
    assert "the peer closed the connection" in str(cause)  # not just "Broken pipe"
    assert sender.failed
    assert sender.error is cause
    assert not engine_threads()


def test_stalled_peer_fails_the_sender_after_io_timeout() -> None:
    block = filled_block()
    ((ours, theirs),) = make_pairs(1, "socketpair")
    sender = Sender([ours], io_timeout=0.1)

    def migrate() -> None:
        sender.send_pages(block, all_pages(block))
        sender.sync()

    try:
        sender.start()
        with pytest.raises(MigrationFailed) as info:
            migrate()
    finally:
        sender.close()
        theirs.close()
    cause = info.value.__cause__
    assert isinstance(cause, ChannelError)
    assert "write timed out after 0.1 s (the peer is not reading, or too slowly;" in str(cause)
    assert cause.channel == "multifd/0"
    # The kernel timer (SO_SNDTIMEO) ends the stalled write with EAGAIN.
    assert isinstance(cause.__cause__, TimeoutError | BlockingIOError)
    assert not engine_threads()


@pytest.mark.parametrize("stop", ["abort", "close"])
def test_abort_or_close_wakes_a_requester_blocked_on_a_stalled_peer(stop: str) -> None:
    block = filled_block()
    ((ours, theirs),) = make_pairs(1, "socketpair")
    sender = Sender([ours], io_timeout=TIMEOUT)
    reason = RuntimeError("operator cancelled")
    sender.start()

    def migrate() -> None:
        sender.send_pages(block, all_pages(block))
        sender.sync()

    requester = Background(migrate)
    try:
        if stop == "abort":
            sender.abort(reason)
        else:
            sender.close()
        error = requester.join()
    finally:
        sender.close()
        theirs.close()
    assert isinstance(error, MigrationFailed)
    if stop == "abort":
        assert error.__cause__ is reason
    assert not engine_threads()


def test_bad_sender_configuration_is_refused_before_anything_starts() -> None:
    ((ours, theirs),) = make_pairs(1, "socketpair")
    with ours, theirs:
        with pytest.raises(ConfigError, match="uuid"):
            Sender([ours], uuid=b"short")
        with pytest.raises(ConfigError, match="compression"):
            Sender([ours], compression="lz4")
        with pytest.raises(ConfigError, match="level"):
            Sender([ours], compression="zlib", level=99)
    with pytest.raises(ConfigError):
        Sender([])


def test_close_is_idempotent_and_a_closed_sender_refuses_work() -> None:
    ((ours, theirs),) = make_pairs(1, "socketpair")
    sender = Sender([ours])
    sender.close()  # never started
    sender.close()
    with pytest.raises(MigrationFailed, match="closed"):
        sender.send_pages(filled_block(1 << 20), [0])
    assert not sender.failed
    theirs.close()


# --- receiver side ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_receiver_fails_fast_when_a_peer_vanishes(transport: Transport) -> None:
    block = filled_block(1 << 20)
    dst = Ram([RamBlock.anonymous("mem", block.size)])
    with link(dst, 2, transport) as (sender, receiver, pairs):
        sender.send_pages(block, all_pages(block))
        sender.sync()
        receiver.wait_sync(TIMEOUT)
        pairs[1][0].shutdown(socket.SHUT_RDWR)  # the source side of channel 1 goes away
        with pytest.raises(MigrationFailed) as info:
            receiver.wait_sync(60.0)  # a timeout here would be a failure to notice
        assert info.value.channel == "multifd/1"
        assert "peer closed multifd/1 before the SYNC" in str(info.value)
    assert not engine_threads()


def sync_packet() -> bytes:
    return RamPacket.sync(1).pack()


def test_wait_sync_timeout_names_the_channels_that_did_not_arrive() -> None:
    ram = Ram([RamBlock.anonymous("mem", 1 << 20)])
    receiver = Receiver(ram, channels=3, io_timeout=TIMEOUT)
    pairs = make_pairs(3, "socketpair")
    try:
        for i, (ours, theirs) in enumerate(pairs):
            theirs.sendall(InitPacket(i).pack() + (sync_packet() if i != 2 else b""))
            receiver.accept_channel(ours, TIMEOUT)
        with pytest.raises(MigrationFailed) as info:
            receiver.wait_sync(0.05)
    finally:
        receiver.close()
        for _, theirs in pairs:
            theirs.close()
    assert "no SYNC within" in str(info.value)
    assert "multifd/2" in str(info.value)
    assert "multifd/0" not in str(info.value)
    assert not engine_threads()


def test_finish_frees_trailing_syncs_sent_without_a_marker() -> None:
    block = filled_block(1 << 20)
    dst = Ram([RamBlock.anonymous("mem", block.size)])
    recorder = Recorder()
    with link(dst, 2, recorder=recorder) as (sender, receiver, _):
        sender.send_pages(block, all_pages(block))
        sender.sync()
        receiver.wait_sync(TIMEOUT)
        sender.sync()  # QEMU 9.1/9.2 ram_save_complete(): SYNCs, no marker
        sender.close()
        receiver.finish(TIMEOUT)
        assert [c.sync_packets for c in receiver.stats()] == [2, 2]
    assert bytes(dst["mem"].view) == bytes(block.view)
    assert not engine_threads()


def test_finish_fails_when_a_channel_never_connected() -> None:
    receiver = Receiver(Ram(), channels=2, io_timeout=TIMEOUT)
    ((ours, theirs),) = make_pairs(1, "socketpair")
    try:
        with theirs:
            theirs.sendall(InitPacket(0).pack())
        receiver.accept_channel(ours, TIMEOUT)
        with pytest.raises(MigrationFailed, match="multifd/1 never connected"):
            receiver.finish(TIMEOUT)
    finally:
        receiver.close()
    assert not engine_threads()


def test_finish_fails_when_a_peer_never_ends_its_stream() -> None:
    receiver = Receiver(Ram(), channels=1, io_timeout=TIMEOUT)
    ((ours, theirs),) = make_pairs(1, "socketpair")
    try:
        theirs.sendall(InitPacket(0).pack())
        receiver.accept_channel(ours, TIMEOUT)
        with pytest.raises(MigrationFailed, match="no end of stream") as info:
            receiver.finish(0.05)
        assert info.value.channel == "multifd/0"
    finally:
        receiver.close()
        theirs.close()
    assert not engine_threads()


def test_close_frees_threads_parked_at_a_sync() -> None:
    dst = Ram([RamBlock.anonymous("mem", 1 << 20)])
    with link(dst, 2) as (sender, receiver, _):
        sender.sync()
        receiver.close()  # both receive threads are parked (or about to park) at the SYNC
        receiver.close()
        assert not receiver.failed
    assert not engine_threads()


def test_a_receiver_failure_stops_every_channel() -> None:
    dst = Ram([RamBlock.anonymous("mem", 1 << 20)])
    with link(dst, 4) as (_, receiver, pairs):
        bad = RamPacket(flags=0, packet_num=1, normal_pages=1, ramblock="nope", offsets=(0,))
        pairs[2][0].sendall(bad.pack())  # behind the sender's back, on channel 2
        with pytest.raises(MigrationFailed) as info:
            receiver.wait_sync(TIMEOUT)
        assert info.value.channel == "multifd/2"
        assert isinstance(info.value.__cause__, ProtocolError)
        assert not engine_threads(("recv-",))  # joined before the error surfaced
