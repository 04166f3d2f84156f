"""Malformed channel input: every case fails the Receiver with an error that names the channel,
what was expected and what was received; nothing hangs and no thread survives."""

from __future__ import annotations

import socket
import struct
import uuid as uuidlib

import pytest

from multifd.engine.recv import Receiver
from multifd.errors import ChannelError, MigrationFailed, ProtocolError
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import (
    MAX_COMPRESSED_PAYLOAD,
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_ZLIB,
    PAGE_SIZE,
)
from multifd.wire.packets import InitPacket, RamPacket
from tests.engine.helpers import TIMEOUT, engine_threads

BLOCK_SIZE = 4 << 20
UUID = bytes(range(16))


def receiver(
    channels: int = 1, *, uuid: bytes | None = None, compression: str = "none"
) -> Receiver:
    ram = Ram([RamBlock.anonymous("mem", BLOCK_SIZE)])
    return Receiver(ram, channels=channels, uuid=uuid, compression=compression, io_timeout=TIMEOUT)


def peer(data: bytes) -> socket.socket:
    """Our end of a channel whose peer wrote ``data`` and closed."""
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.sendall(data)
    return ours


def data_header(
    offsets: tuple[int, ...] = (0,),
    *,
    flags: int = 0,
    ramblock: str = "mem",
    next_packet_size: int | None = None,
) -> bytes:
    return RamPacket(
        flags=flags,
        packet_num=1,
        normal_pages=len(offsets),
        ramblock=ramblock,
        offsets=offsets,
        next_packet_size=len(offsets) * PAGE_SIZE if next_packet_size is None else next_packet_size,
    ).pack()


def check_error(
    error: BaseException, what: str, channel: str, expected: object, received: object
) -> None:
    assert isinstance(error, ProtocolError), repr(error)
    assert (error.what, error.channel) == (what, channel)
    assert str(expected) in str(error.expected), (error.expected, expected)
    assert str(received) in str(error.received), (error.received, received)


# --- init packet --------------------------------------------------------------------------


def bad_magic_init() -> bytes:
    return struct.pack(">I", 0xDEADBEEF) + InitPacket(0).pack()[4:]


def bad_version_init() -> bytes:
    raw = InitPacket(0).pack()
    return raw[:4] + struct.pack(">I", 2) + raw[8:]


@pytest.mark.parametrize(
    ("data", "what", "channel", "expected", "received"),
    [
        (bad_magic_init(), "init packet magic", "multifd/?", "0x11223344", "0xdeadbeef"),
        (bad_version_init(), "init packet version", "multifd/?", 1, 2),
        (
            InitPacket(0, bytes(16)).pack(),
            "init packet uuid",
            "multifd/0",
            str(uuidlib.UUID(bytes=UUID)),
            "00000000-0000-0000-0000-000000000000",
        ),
        (
            InitPacket(2, UUID).pack(),
            "init packet channel id",
            "multifd/2",
            "< 2",
            "2: the source uses more than 2 channels",
        ),
        (InitPacket(0, UUID).pack()[:10], "truncated init packet", "multifd/?", 64, 10),
    ],
    ids=["magic", "version", "uuid", "id-out-of-range", "truncated"],
)
def test_bad_init_packet_is_refused(
    data: bytes, what: str, channel: str, expected: object, received: object
) -> None:
    rx = receiver(channels=2, uuid=UUID)
    try:
        with pytest.raises(ProtocolError) as info:
            rx.accept_channel(peer(data), TIMEOUT)
        check_error(info.value, what, channel, expected, received)
        assert rx.failed
        with pytest.raises(MigrationFailed) as failed:
            rx.wait_sync(TIMEOUT)
        assert failed.value.__cause__ is info.value
    finally:
        rx.close()
    assert not engine_threads()


def test_duplicate_channel_id_is_refused() -> None:
    rx = receiver(channels=2)
    try:
        assert rx.accept_channel(peer(InitPacket(1).pack()), TIMEOUT) == 1
        with pytest.raises(ProtocolError) as info:
            rx.accept_channel(peer(InitPacket(1).pack()), TIMEOUT)
        check_error(info.value, "init packet channel id", "multifd/1", "not used", "1 a second")
    finally:
        rx.close()
    assert not engine_threads()


def test_silent_peer_times_out_at_accept() -> None:
    rx = receiver()
    ours, theirs = socket.socketpair()
    try:
        with pytest.raises(ChannelError, match="timed out"):
            rx.accept_channel(ours, 0.05)
    finally:
        rx.close()
        theirs.close()


# --- RAM packets --------------------------------------------------------------------------


def bad_magic_packet() -> bytes:
    return struct.pack(">I", 0xDEADBEEF) + data_header()[4:]


PAGE = bytes([1]) * PAGE_SIZE


@pytest.mark.parametrize(
    ("stream", "what", "expected", "received"),
    [
        (bad_magic_packet() + PAGE, "packet magic", "0x11223344", "0xdeadbeef"),
        (data_header(ramblock="nope") + PAGE, "unknown ramblock", "mem", "'nope'"),
        (data_header((BLOCK_SIZE,)) + PAGE, "offset in block 'mem'", "<= 0x3ff000", "0x400000"),
        (data_header((100,)) + PAGE, "offset in block 'mem'", "multiple of 4096", "0x64"),
        (data_header()[:100], "unexpected EOF in packet header", "1344 bytes", "100 bytes"),
        (
            data_header((0, PAGE_SIZE, 3 * PAGE_SIZE)) + PAGE + PAGE[:2048],
            "unexpected EOF in page data",
            "12288 bytes",
            "6144 bytes",
        ),
        (
            data_header(flags=MULTIFD_FLAG_ZLIB) + PAGE,
            "packet compression method",
            "0x0 (none)",
            "0x2 (zlib): the method is not negotiated, both ends must be given the same",
        ),
        (
            data_header(flags=MULTIFD_FLAG_SYNC | MULTIFD_FLAG_ZLIB) + PAGE,
            "packet compression method",
            "0x0 (none)",
            "0x2 (zlib)",
        ),
    ],
    ids=[
        "magic",
        "unknown-block",
        "offset-range",
        "offset-unaligned",
        "eof-in-header",
        "eof-in-pages",
        "method",
        "method-in-sync",
    ],
)
def test_bad_packet_fails_the_receiver(
    stream: bytes, what: str, expected: object, received: object
) -> None:
    rx = receiver()
    try:
        rx.accept_channel(peer(InitPacket(0).pack() + stream), TIMEOUT)
        with pytest.raises(MigrationFailed) as info:
            rx.wait_sync(TIMEOUT)
        assert info.value.channel == "multifd/0"
        assert info.value.__cause__ is not None
        check_error(info.value.__cause__, what, "multifd/0", expected, received)
    finally:
        rx.close()
    assert not engine_threads()


def test_compressed_payload_larger_than_the_limit_is_refused() -> None:
    rx = receiver(compression="zlib")
    header = data_header(flags=MULTIFD_FLAG_ZLIB, next_packet_size=MAX_COMPRESSED_PAYLOAD + 1)
    try:
        rx.accept_channel(peer(InitPacket(0).pack() + header), TIMEOUT)
        with pytest.raises(MigrationFailed) as info:
            rx.wait_sync(TIMEOUT)
        assert info.value.__cause__ is not None
        check_error(
            info.value.__cause__,
            "next_packet_size",
            "multifd/0",
            MAX_COMPRESSED_PAYLOAD,
            MAX_COMPRESSED_PAYLOAD + 1,
        )
    finally:
        rx.close()
    assert not engine_threads()


def test_corrupt_compressed_payload_is_refused() -> None:
    rx = receiver(compression="zlib")
    payload = b"not a deflate stream"
    header = data_header(flags=MULTIFD_FLAG_ZLIB, next_packet_size=len(payload))
    try:
        rx.accept_channel(peer(InitPacket(0).pack() + header + payload), TIMEOUT)
        with pytest.raises(MigrationFailed) as info:
            rx.wait_sync(TIMEOUT)
        cause = info.value.__cause__
        assert isinstance(cause, ProtocolError)
        assert cause.channel == "multifd/0"
    finally:
        rx.close()
    assert not engine_threads()
