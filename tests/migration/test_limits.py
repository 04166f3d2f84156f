"""What a destination accepts from a hostile source: announced RAM, names, payloads and
connections. Every stream here comes through a real socket into ``multifd.receive``."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import multifd
from multifd import transport
from multifd.address import parse_address
from multifd.demo import read_listening_line
from multifd.engine.trace import TraceEvent
from multifd.errors import ChannelRefused, ConfigError, MigrationFailed, ProtocolError
from multifd.migration.arrivals import Arrivals
from multifd.migration.limits import ReceiveLimits, physical_memory
from multifd.ram import RamBlock
from multifd.wire import stream
from multifd.wire.constants import (
    MAX_COMPRESSED_PAYLOAD,
    MULTIFD_FLAG_ZLIB,
    PAGE_SIZE,
    RAM_SECTION_VERSION,
)
from multifd.wire.packets import InitPacket, RamPacket
from tests.migration.helpers import BOUND, ReceiverThread, assert_same, make_ram

WAIT = 10.0  # bound on each wait for the destination


def _prologue(blocks: list[tuple[str, int]], machine: str = "none") -> bytes:
    """A main stream up to and including MEM_SIZE."""
    return (
        stream.file_header()
        + stream.configuration(machine)
        + stream.section_start(2, "ram", 0, RAM_SECTION_VERSION)
        + stream.ram_mem_size(blocks)
    )


def _target(address: str) -> tuple[str, int]:
    parsed = parse_address(address)
    return parsed.host, parsed.port


@contextlib.contextmanager
def _hostile(address: str, *streams: bytes) -> Iterator[list[socket.socket]]:
    """One connection per stream, each written at once and held open."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for data in streams:
            sock = stack.enter_context(socket.create_connection(_target(address), timeout=WAIT))
            sock.sendall(data)
            sockets.append(sock)
        yield sockets


def _refusal(receiver: ReceiverThread) -> ProtocolError:
    with pytest.raises(MigrationFailed) as info:
        receiver.result()
    cause = info.value.__cause__
    assert isinstance(cause, ProtocolError), repr(cause)
    assert cause.channel == "main" or cause.channel.startswith("multifd/")
    return cause


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every anonymous block the destination creates, by name and size."""
    made: list[tuple[str, int]] = []
    original = RamBlock.anonymous

    def spy(cls: type[RamBlock], name: str, size: int) -> RamBlock:
        made.append((name, size))
        return original(name, size)

    monkeypatch.setattr(RamBlock, "anonymous", classmethod(spy))
    return made


@pytest.mark.parametrize(
    ("limits", "blocks", "error"),
    [
        (ReceiveLimits(max_ram=1 << 20), [("mem", 2 << 20)],
         ("total ram size", "<= 1048576 (max_ram)", 2 << 20)),
        (ReceiveLimits(max_block_size=1 << 20), [("a", 64 << 10), ("big", 2 << 20)],
         ("size of block 'big'", "<= 1048576 (max_block_size)", 2 << 20)),
        (ReceiveLimits(max_blocks=4), [(f"b{i}", PAGE_SIZE) for i in range(5)],
         ("number of ram blocks", "<= 4", "more")),
        (ReceiveLimits(max_name_len=16), [("a", PAGE_SIZE), ("x" * 17, PAGE_SIZE)],
         ("ram block name length", "<= 16 bytes", "17 bytes ('xxxxxxxxxxxxxxxxx'...)")),
    ],
    ids=["max_ram", "max_block_size", "max_blocks", "max_name_len"],
)  # fmt: skip
def test_announced_ram_beyond_a_limit_is_refused_before_anything_is_allocated(
    allocations: list[tuple[str, int]],
    limits: ReceiveLimits,
    blocks: list[tuple[str, int]],
    error: tuple[str, str, object],
) -> None:
    receiver = ReceiverThread({"channels": 0, "limits": limits})
    address = receiver.start("tcp:127.0.0.1:0")
    with _hostile(address, _prologue(blocks)):
        refusal = _refusal(receiver)
    what, expected, received = error
    assert refusal.what.startswith(what)
    assert (refusal.channel, refusal.expected, refusal.received) == ("main", expected, received)
    assert allocations == []


def test_a_long_machine_type_is_refused() -> None:
    receiver = ReceiverThread({"channels": 0, "limits": ReceiveLimits(max_name_len=8)})
    address = receiver.start("tcp:127.0.0.1:0")
    with _hostile(address, _prologue([("mem", PAGE_SIZE)], machine="m" * 9)):
        error = _refusal(receiver)
    assert error.what.startswith("machine type name length")
    assert (error.expected, error.received) == ("<= 8", 9)


def test_a_payload_size_beyond_the_cap_is_refused_before_it_is_read() -> None:
    """``next_packet_size`` is QEMU's to trust, not ours: a header announcing more than
    ``MAX_COMPRESSED_PAYLOAD`` fails at once, though none of the payload follows."""
    receiver = ReceiverThread({"channels": 1, "compression": "zlib", "io_timeout": BOUND})
    address = receiver.start("tcp:127.0.0.1:0")
    main = (
        _prologue([("mem", 64 * PAGE_SIZE)])
        + stream.ram_multifd_flush()
        + stream.ram_eos()
        + stream.section_footer(2)
    )
    bad = RamPacket(
        flags=MULTIFD_FLAG_ZLIB,
        packet_num=2,
        normal_pages=1,
        ramblock="mem",
        offsets=(0,),
        next_packet_size=MAX_COMPRESSED_PAYLOAD + 1,
    )
    multifd_channel = InitPacket(0).pack() + RamPacket.sync(1).pack() + bad.pack()
    with _hostile(address, main, multifd_channel):
        error = _refusal(receiver)
    assert (error.what, error.channel) == ("next_packet_size", "multifd/0")
    assert (error.expected, error.received) == (
        f"<= {MAX_COMPRESSED_PAYLOAD}",
        MAX_COMPRESSED_PAYLOAD + 1,
    )


def test_connections_after_setup_are_refused_and_the_migration_goes_on() -> None:
    attempts: list[BaseException | None] = []  # what a late connection met, once
    address = ""

    def late_connection(event: TraceEvent) -> None:
        # A marker on the main channel: the loader runs, so setup is over.
        if event.channel == "main" and event.record is not None and not attempts:
            try:
                socket.create_connection(_target(address), timeout=WAIT).close()
                attempts.append(None)
            except OSError as exc:
                attempts.append(exc)

    source = make_ram(1, {"mem": 1 << 20})
    receiver = ReceiverThread({"channels": 2, "trace": late_connection})
    address = receiver.start("tcp:127.0.0.1:0")
    multifd.send(address, source, channels=2)
    got = receiver.result()
    assert_same(source, got.ram)
    got.ram.close()
    assert len(attempts) == 1
    assert isinstance(attempts[0], ConnectionRefusedError)


def test_strangers_beyond_max_pending_are_refused_and_the_source_migrates() -> None:
    source = make_ram(2, {"mem": 1 << 20})
    limits = ReceiveLimits(max_pending=1)  # 4 may wait: the source's 3 channels and one more
    receiver = ReceiverThread({"channels": 2, "limits": limits})
    address = receiver.start("tcp:127.0.0.1:0")
    with _hostile(address, *[b""] * 5) as strangers:  # silent, older than the source's
        multifd.send(address, source, channels=2)
        got = receiver.result()
        assert all(stranger.recv(1) == b"" for stranger in strangers)
    assert_same(source, got.ram)
    got.ram.close()
    reasons = [exc.reason for exc in got.refused]
    assert len(reasons) == 5  # each stranger once, never the source
    assert reasons[0] == "more than 4 connections wait"  # the 5th stranger pushed out the 1st
    assert set(reasons) == {"more than 4 connections wait", "setup is over: every channel is there"}


def test_a_second_main_channel_is_refused_and_the_first_stays() -> None:
    refused: list[ChannelRefused] = []
    listen_at = parse_address("tcp:127.0.0.1:0")
    with (
        transport.listen(listen_at) as listener,
        Arrivals(
            listener, expected=1, limits=ReceiveLimits(), io_timeout=WAIT, on_refused=refused.append
        ) as arrivals,
        _hostile(str(listener.address), stream.file_header(), stream.file_header()) as (one, two),
    ):
        identified: list[tuple[socket.socket, str]] = []
        while len(identified) < 2:
            arrivals.wait(WAIT)
            while (item := arrivals.pop()) is not None:
                identified.append(item)
        assert [kind for _, kind in identified] == ["main", "main"]
        for sock, _ in identified:
            arrivals.set_main(sock)
        assert arrivals.main is identified[0][0]
        (exc,) = refused
        assert (exc.channel, exc.reason) == ("main", "a second main channel")
        with contextlib.suppress(ConnectionResetError):
            assert two.recv(1) == b""
        one.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            one.recv(1)  # still open


def test_limits_are_checked_when_made() -> None:
    assert ReceiveLimits().max_ram == physical_memory()
    for bad in ({"max_ram": 0}, {"max_blocks": -1}, {"max_pending": True}, {"max_name_len": 256},
                {"handshake_timeout": 0.0}):  # fmt: skip
        with pytest.raises(ConfigError):
            ReceiveLimits(**bad)


def test_receive_max_ram_flag(tmp_path: Path) -> None:
    image = tmp_path / "ram.img"
    image.write_bytes(bytes(2 << 20))
    cli = [sys.executable, "-m", "multifd"]
    receiver = subprocess.Popen(
        [*cli, "receive", "tcp:127.0.0.1:0", "--channels", "1", "--max-ram", "1M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert receiver.stderr is not None
    try:
        address = read_listening_line(receiver.stderr, BOUND)
        subprocess.run(
            [*cli, "send", address, "--channels", "1", "--block", f"mem={image}"],
            capture_output=True, timeout=BOUND, check=False,
        )  # fmt: skip
        _, errors = receiver.communicate(timeout=BOUND)
    finally:
        receiver.kill()
        receiver.communicate(timeout=BOUND)
    assert receiver.returncode == 1
    assert "total ram size: expected <= 1048576 (max_ram), received 2097152" in errors.decode()
