"""The pieces the relay adds: the decoder's raw records and tail, changed-page tracking."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Final, cast

import numpy as np
import numpy.typing as npt
import pytest

from multifd.errors import ConfigError, MigrationFailed, ProtocolError
from multifd.migration.relay import _Forwarder
from multifd.migration.source import Source
from multifd.ram import Ram, RamBlock
from multifd.wire import stream as s
from multifd.wire.constants import MIG_CMD_SWITCHOVER_START, PAGE_SIZE
from multifd.wire.records import Event

TIMEOUT: Final = 10.0

RAM_ID = 3
BLOCK = "pc.ram"
BLOCKS = ((BLOCK, 8 * PAGE_SIZE),)
# A device section the decoder has no parser for: only the tail mode can carry it.
DEVICE = s.section_full(5, "cpu_common", 0, 1) + bytes(range(40)) + s.section_footer(5)
TAIL = DEVICE + s.timer_section(0) + s.eof() + s.vmdescription(b'{"devices": []}')


def stream_bytes(*, config: str = "pc-q35-7.2", tail: bytes = TAIL) -> bytes:
    return (
        s.file_header()
        + s.configuration(config)
        + s.section_start(RAM_ID, "ram", 0, 4)
        + s.ram_mem_size(BLOCKS)
        + s.ram_eos()
        + s.section_footer(RAM_ID)
        + s.section_part(RAM_ID)
        + s.ram_zero(0, BLOCK)
        + s.ram_page_header(PAGE_SIZE, None)
        + bytes((7,)) * PAGE_SIZE
        + s.ram_eos()
        + s.section_footer(RAM_ID)
        + s.switchover_start()
        + s.section_end(RAM_ID)
        + s.ram_eos()
        + s.section_footer(RAM_ID)
        + tail
    )


def run(
    data: bytes, chunk: int, **options: object
) -> tuple[list[tuple[Event, bytes | None]], bytes, s.StreamDecoder]:
    """Events with the decoder's ``raw`` after each, and the tail, fed ``chunk`` at a time."""
    decoder = s.StreamDecoder(**options)  # type: ignore[arg-type]
    events: list[tuple[Event, bytes | None]] = []
    tail = bytearray()
    for at in range(0, len(data), chunk):
        decoder.feed(data[at : at + chunk])
        while (event := decoder.next_event()) is not None:
            events.append((event, decoder.raw))
        tail += decoder.take_tail()
    decoder.close()
    return events, bytes(tail), decoder


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_tail_mode_hands_over_everything_after_the_ram_end_unchanged(chunk: int) -> None:
    data = stream_bytes()
    events, tail, decoder = run(data, chunk, tail_after_ram=True)
    assert tail == TAIL
    assert decoder.in_tail
    assert isinstance(events[-1][0], s.SectionFooter)
    assert [e for e, _ in events if isinstance(e, s.Command)] == [
        s.Command(MIG_CMD_SWITCHOVER_START, b"")
    ]


def test_without_tail_mode_an_unknown_device_section_still_fails() -> None:
    with pytest.raises(ProtocolError, match="unknown FULL section"):
        run(stream_bytes(), 1 << 20)


def test_tail_mode_keeps_decoding_an_ordinary_end_of_stream() -> None:
    tail = s.timer_section(0) + s.eof()
    events, taken, _ = run(stream_bytes(tail=tail), 1 << 20)
    assert taken == b""
    assert isinstance(events[-1][0], s.Eof)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_raw_holds_the_exact_bytes_of_the_kept_record_types(chunk: int) -> None:
    keep = (s.Configuration, s.Command)
    events, _, _ = run(stream_bytes(), chunk, keep_raw=keep, tail_after_ram=True)
    raws = {type(e): raw for e, raw in events if raw is not None}
    assert raws == {
        s.Configuration: s.configuration("pc-q35-7.2"),
        s.Command: s.switchover_start(),
    }
    assert all(raw is None for e, raw in events if not isinstance(e, keep))


def test_raw_is_none_when_nothing_is_kept() -> None:
    events, _, _ = run(stream_bytes(), 1 << 20, tail_after_ram=True)
    assert all(raw is None for _, raw in events)


def test_take_tail_is_empty_before_the_ram_end() -> None:
    data = stream_bytes()
    decoder = s.StreamDecoder(tail_after_ram=True)
    decoder.feed(data[: len(data) - len(TAIL) - 1])  # up to the END's footer, but one byte
    list(decoder.events())
    assert not decoder.in_tail
    assert decoder.take_tail() == b""


def test_close_inside_the_ram_section_fails_in_tail_mode_too() -> None:
    data = stream_bytes()
    decoder = s.StreamDecoder(tail_after_ram=True)
    decoder.feed(data[:200])
    list(decoder.events())
    with pytest.raises(ProtocolError, match="stream ended early"):
        decoder.close()


def test_close_with_tail_bytes_not_taken_fails() -> None:
    decoder = s.StreamDecoder(tail_after_ram=True)
    decoder.feed(stream_bytes())
    list(decoder.events())
    with pytest.raises(ProtocolError, match="stream ended early"):
        decoder.close()


def test_an_earlier_error_comes_back_from_take_tail() -> None:
    decoder = s.StreamDecoder(tail_after_ram=True)
    decoder.feed(b"QEVX" + bytes(20))
    with pytest.raises(ProtocolError):
        decoder.next_event()
    with pytest.raises(ProtocolError, match="stream magic"):
        decoder.take_tail()


def test_unknown_iterative_section_is_refused_by_name() -> None:
    data = s.file_header() + s.configuration("none") + s.section_start(1, "block", 0, 1)
    decoder = s.StreamDecoder(tail_after_ram=True)
    decoder.feed(data)
    with pytest.raises(ProtocolError, match="unknown iterative section") as info:
        list(decoder.events())
    assert info.value.received == "'block'"


class TestEndsWithEof:
    def test_eof_alone_and_eof_with_a_description(self) -> None:
        assert s.ends_with_eof(TAIL)
        assert s.ends_with_eof(DEVICE + s.eof())
        assert s.ends_with_eof(s.eof() + s.vmdescription(b"{}"))

    def test_a_cut_stream_is_refused(self) -> None:
        assert not s.ends_with_eof(TAIL[:-1])
        assert not s.ends_with_eof(DEVICE)
        assert not s.ends_with_eof(b"")

    def test_a_stream_still_open_ends_only_with_a_whole_description(self) -> None:
        assert s.ends_with_eof(TAIL, description=True)
        assert not s.ends_with_eof(DEVICE + s.eof(), description=True)
        assert not s.ends_with_eof(TAIL[:-1], description=True)
        assert not s.ends_with_eof(TAIL + b"}", description=True)

    def test_a_length_holding_the_marker_bytes_is_found(self) -> None:
        body = b"{" + b" " * (0x0600 - 2) + b"}"  # length field 00 00 06 00
        assert s.ends_with_eof(DEVICE + s.eof() + s.vmdescription(body))
        assert not s.ends_with_eof(DEVICE + s.eof() + s.vmdescription(body)[:-1])


class TestChanges:
    def block(self) -> RamBlock:
        block = RamBlock.anonymous("b", 16 * PAGE_SIZE)
        block.assume_zeroed()
        block.track_changes()
        return block

    def test_every_kind_of_write_is_taken_once(self) -> None:
        block = self.block()
        block.written(np.array([3, 9], dtype=np.int64))  # announced, not landed yet
        assert block.take_changes().tolist() == []
        block.landed(np.array([3, 9], dtype=np.int64))
        block.landed(slice(10, 12))
        block.written_page(1)
        block.write_zero_page(5)  # already zero: still a change the peer must see
        block.write_zero(np.array([14], dtype=np.int64))
        assert block.take_changes().tolist() == [1, 3, 5, 9, 10, 11, 14]
        assert block.take_changes().tolist() == []
        block.write_zero(slice(0, 2))
        assert block.take_changes().tolist() == [0, 1]

    def test_known_zero_keeps_its_meaning(self) -> None:
        block = self.block()
        block.pages[2] = 9
        block.written_page(2)
        assert block.known_zero is not None
        assert not block.known_zero[2]
        block.write_zero_page(2)
        assert not block.pages[2].any()
        assert block.known_zero[2]

    def test_untracked_block_refuses_take(self) -> None:
        block = RamBlock.anonymous("b", PAGE_SIZE)
        block.written_page(0)
        with pytest.raises(ConfigError, match="not tracked"):
            block.take_changes()

    def test_track_changes_twice_keeps_what_was_noted(self) -> None:
        block = self.block()
        block.written_page(4)
        block.track_changes()
        assert block.take_changes().tolist() == [4]


class TestCatchUp:
    """The loader's wait at an incoming marker (:meth:`_Forwarder.catch_up`)."""

    class FakeSource:
        """Records the rounds a forwarder sends; each waits for ``gate``."""

        def __init__(self) -> None:
            self.rounds: list[list[int]] = []
            self.gate = threading.Event()  # set: send_pass may return
            self.failure: OSError | None = None  # raised by send_pass once the gate opens

        def send_pass(self, pages: dict[str, npt.NDArray[np.int64]]) -> None:
            assert self.gate.wait(TIMEOUT), "the test never opened the gate"
            if self.failure is not None:
                raise self.failure
            self.rounds.append(pages["b"].tolist())

        def forward(self, *chunks: bytes) -> None:
            raise AssertionError("no records in these tests")

        def abort(self, exc: BaseException) -> None:
            self.gate.set()

    @contextlib.contextmanager
    def forwarder(self) -> Iterator[tuple[_Forwarder, FakeSource, RamBlock]]:
        block = RamBlock.anonymous("b", 64 * PAGE_SIZE)
        block.track_changes()
        source = self.FakeSource()
        failures: list[BaseException] = []
        forwarder = _Forwarder(cast(Source, source), Ram([block]), failures.append)
        forwarder.start()
        try:
            yield forwarder, source, block
        finally:
            source.gate.set()
            forwarder.stop()
            block.close()
        assert failures == []

    def test_pending_changes_count_what_the_next_take_returns(self) -> None:
        block = RamBlock.anonymous("b", 16 * PAGE_SIZE)
        block.written_page(1)
        assert block.pending_changes() == 0  # untracked
        block.track_changes()
        block.landed(slice(2, 5))
        block.write_zero_page(9)
        assert block.pending_changes() == 4
        assert block.take_changes().tolist() == [2, 3, 4, 9]
        assert block.pending_changes() == 0

    def test_pending_changes_count_each_page_once(self) -> None:
        block = RamBlock.anonymous("b", 16 * PAGE_SIZE)
        block.track_changes()
        block.landed(np.array([3, 3, 5], dtype=np.int64))  # a page listed twice
        block.landed(slice(4, 7))  # 5 again, 4 and 6 new
        block.write_zero(np.array([6, 7], dtype=np.int64))
        block.written_page(8)
        block.write_zero_page(8)
        assert block.pending_changes() == 6
        assert block.take_changes().tolist() == [3, 4, 5, 6, 7, 8]
        assert block.pending_changes() == 0
        block.landed(slice(0, 2))
        assert block.pending_changes() == 2

    def test_a_backlog_within_the_lag_does_not_wait(self) -> None:
        with self.forwarder() as (forwarder, source, block):
            block.landed(slice(0, 10))
            opener = threading.Timer(TIMEOUT, source.gate.set)  # only if the wait is wrong
            opener.start()
            forwarder.catch_up(lag=10)  # the forwarder is stuck in its round: no wait
            opener.cancel()
            opener.join()
            assert not source.gate.is_set()
            assert source.rounds == []

    def test_a_larger_backlog_waits_until_it_was_sent(self) -> None:
        with self.forwarder() as (forwarder, source, block):
            block.landed(slice(0, 10))
            source.gate.set()
            forwarder.catch_up(lag=9)
            assert sorted(p for r in source.rounds for p in r) == list(range(10))

    def test_a_channel_within_the_backlog_goes_on(self) -> None:
        with self.forwarder() as (forwarder, source, block):
            block.landed(slice(0, 10))
            opener = threading.Timer(TIMEOUT, source.gate.set)  # only if the wait is wrong
            opener.start()
            forwarder.hold_back(10)  # the forwarder is stuck in its round: no wait
            opener.cancel()
            opener.join()
            assert not source.gate.is_set()

    def test_a_channel_beyond_the_backlog_waits_until_half_is_left(self) -> None:
        with self.forwarder() as (forwarder, source, block):
            block.landed(slice(0, 10))
            held = threading.Thread(target=forwarder.hold_back, args=(8,))
            held.start()
            held.join(0.2)  # a bounded look: the forwarder is stuck, so it must wait on
            assert held.is_alive()
            source.gate.set()  # the round goes: nothing is left to send
            held.join(TIMEOUT)
            assert not held.is_alive()
            assert sorted(p for r in source.rounds for p in r) == list(range(10))

    def test_a_held_channel_hears_that_the_forwarder_failed(self) -> None:
        block = RamBlock.anonymous("b", 64 * PAGE_SIZE)
        block.track_changes()
        source = self.FakeSource()
        source.failure = OSError("destination gone")
        failures: list[BaseException] = []
        forwarder = _Forwarder(cast(Source, source), Ram([block]), failures.append)
        block.landed(slice(0, 10))
        forwarder.start()
        try:
            source.gate.set()  # the round fails
            with pytest.raises(MigrationFailed, match="destination gone"):
                forwarder.hold_back(4)
        finally:
            forwarder.abort(RuntimeError("test over"))
            block.close()
        assert [str(exc) for exc in failures] == ["destination gone"]
