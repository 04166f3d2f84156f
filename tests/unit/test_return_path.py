"""QEMU's return path: the message codec, and its two commands on the main stream.

Byte layouts from QEMU: ``migrate_send_rp_message`` writes be16 type, be16 length, payload
(``migration/migration.c``); ``qemu_savevm_command_send`` writes 0x08, be16 command, be16
length, argument (``migration/savevm.c``).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multifd.errors import ProtocolError
from multifd.wire import return_path as rp
from multifd.wire import stream as s
from multifd.wire.records import Command, Configuration, FileHeader


def decode_all(data: bytes, chunk: int) -> list[rp.Message]:
    decoder = rp.ReturnPathDecoder()
    out: list[rp.Message] = []
    for at in range(0, len(data), chunk):
        decoder.feed(data[at : at + chunk])
        out += decoder.messages()
    decoder.close()
    return out


# -- encoder ----------------------------------------------------------------------------------
def test_message_bytes_match_qemu_layout() -> None:
    assert rp.shut(0) == bytes.fromhex("0001 0004 00000000")
    assert rp.shut(1) == bytes.fromhex("0001 0004 00000001")
    assert rp.pong(0x01020304) == bytes.fromhex("0002 0004 01020304")
    assert rp.switchover_ack() == bytes.fromhex("0007 0000")


def test_stream_commands_match_qemu_layout() -> None:
    assert s.open_return_path() == bytes.fromhex("08 0001 0000")
    assert s.ping(1) == bytes.fromhex("08 0002 0004 00000001")


def test_stream_decoder_passes_both_commands_on() -> None:
    decoder = s.StreamDecoder()
    decoder.feed(s.file_header() + s.configuration("none") + s.open_return_path() + s.ping(7))
    events = list(decoder.events())
    assert events == [
        FileHeader(3),
        Configuration("none"),
        Command(rp.MIG_CMD_OPEN_RETURN_PATH, b""),
        Command(rp.MIG_CMD_PING, bytes.fromhex("00000007")),
    ]
    last = events[-1]
    assert isinstance(last, Command)
    assert rp.ping_value(last.data) == 7


@pytest.mark.parametrize(
    ("command", "expected"),
    [(s.command(rp.MIG_CMD_OPEN_RETURN_PATH, b"\0"), 0), (s.command(rp.MIG_CMD_PING, b"\0"), 4)],
    ids=["open-return-path", "ping"],
)
def test_stream_decoder_checks_command_lengths(command: bytes, expected: int) -> None:
    decoder = s.StreamDecoder()
    decoder.feed(s.file_header() + s.configuration("none") + command)
    with pytest.raises(ProtocolError) as info:
        list(decoder.events())
    assert info.value.expected == expected


# -- decoder, good input ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_messages_decode_whatever_the_chunking(chunk: int) -> None:
    data = rp.pong(1) + rp.switchover_ack() + rp.pong(2) + rp.shut(5)
    assert decode_all(data, chunk) == [rp.Pong(1), rp.SwitchoverAck(), rp.Pong(2), rp.Shut(5)]


def test_a_partial_message_waits_for_more() -> None:
    decoder = rp.ReturnPathDecoder()
    decoder.feed(rp.shut(0)[:5])
    assert decoder.next_message() is None
    before = decoder.shut_seen
    decoder.feed(rp.shut(0)[5:])
    assert decoder.next_message() == rp.Shut(0)
    assert (before, decoder.shut_seen) == (False, True)
    assert decoder.next_message() is None
    decoder.close()


# -- decoder, bad input -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "what", "received"),
    [
        (bytes.fromhex("0000 0000"), "unknown return-path message type", "0x0000"),
        (bytes.fromhex("0008 0000"), "unknown return-path message type", "0x0008"),
        (bytes.fromhex("ffff 0004 00000000"), "unknown return-path message type", "0xffff"),
        (bytes.fromhex("0004 000c"), "postcopy message", "REQ_PAGES (4)"),
        (bytes.fromhex("0003 0010"), "postcopy message", "REQ_PAGES_ID (3)"),
        (bytes.fromhex("0005 0004"), "postcopy message", "RECV_BITMAP (5)"),
        (bytes.fromhex("0006 0004"), "postcopy message", "RESUME_ACK (6)"),
        (bytes.fromhex("0001 0008"), "length of return-path message 1", 8),
        (bytes.fromhex("0002 0000"), "length of return-path message 2", 0),
        (bytes.fromhex("0007 0001 00"), "length of return-path message 7", 1),
    ],
)
def test_bad_messages_are_refused_from_the_header(data: bytes, what: str, received: object) -> None:
    decoder = rp.ReturnPathDecoder()
    decoder.feed(data[:4])  # the header alone is enough to refuse: no payload is awaited
    with pytest.raises(ProtocolError) as info:
        decoder.next_message()
    error = info.value
    assert error.channel == rp.RETURN_PATH == "main (return path)"
    assert what in error.what
    assert error.received == received
    with pytest.raises(ProtocolError) as again:  # sticky
        decoder.next_message()
    assert again.value is error


def test_a_huge_announced_length_is_refused_before_buffering() -> None:
    decoder = rp.ReturnPathDecoder()
    decoder.feed(bytes.fromhex("0001 ffff"))
    with pytest.raises(ProtocolError, match="expected 4, received 65535"):
        decoder.next_message()


def test_data_after_shut_is_refused() -> None:
    decoder = rp.ReturnPathDecoder()
    decoder.feed(rp.shut(0) + rp.pong(1))
    assert decoder.next_message() == rp.Shut(0)
    with pytest.raises(ProtocolError, match="data after SHUT") as info:
        decoder.next_message()
    assert "offset 8" in str(info.value)


def test_an_end_inside_a_message_is_refused() -> None:
    decoder = rp.ReturnPathDecoder()
    decoder.feed(rp.shut(1)[:6])
    assert decoder.next_message() is None
    with pytest.raises(ProtocolError, match="ended inside a message") as info:
        decoder.close()
    assert info.value.channel == rp.RETURN_PATH


def encode(message: rp.Message) -> bytes:
    match message:
        case rp.Shut(status=status):
            return rp.shut(status)
        case rp.Pong(value=value):
            return rp.pong(value)
        case _:
            return rp.switchover_ack()


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=9))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes, chunk: int) -> None:
    error: ProtocolError | None = None
    messages: list[rp.Message] = []
    try:
        messages = decode_all(data, chunk)
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.channel == rp.RETURN_PATH
    else:  # whatever decoded re-encodes to the same bytes
        assert b"".join(map(encode, messages)) == data
