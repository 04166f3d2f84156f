"""The console reader and the guest's line protocol, without QEMU (a socketpair stands in)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.vm.console import Beat, Line, SerialConsole, Transcript, expected_md5, gaps, parse
from tests.vm.guest import continuity_problems, transcripts

TIMEOUT = 5.0


@pytest.fixture
def console() -> Iterator[tuple[SerialConsole, socket.socket]]:
    ours, qemu = socket.socketpair()
    reader = SerialConsole(ours, "test")
    reader.start()
    try:
        yield reader, qemu
    finally:
        qemu.close()
        reader.close(TIMEOUT)


def test_expected_md5_matches_the_guest() -> None:
    # Printed by the real guest as "CK 10 ..." and "CK 20 ...".
    assert expected_md5(10) == "3b0332e02daabf31651a5a0d81ba830a"
    assert expected_md5(20) == "69d61ec73a9426dba64bf17888794b6e"


def test_parse_sorts_beats_checksums_and_garbled_lines() -> None:
    lines = [
        Line("[    2.18] Run /init as init process", 0.0),
        Line("HB 9", 1.0),
        Line("HB 10", 2.0),
        Line(f"CK 10 {expected_md5(10)}", 2.1),
        Line(f"CK 11 {expected_md5(10)}", 2.2),
        Line("HB 1[  3.0] clocksource: unstable", 3.0),
    ]
    transcript = parse(lines)
    assert transcript.beats == (Beat(9, 1.0), Beat(10, 2.0))
    assert [(c.n, c.correct) for c in transcript.checksums] == [(10, True), (11, False)]
    assert transcript.garbled == ("HB 1[  3.0] clocksource: unstable",)


def test_gaps_reports_missing_and_repeated_beats() -> None:
    beats = [Beat(n, 0.0) for n in (1, 2, 4, 4, 5)]
    assert gaps(beats) == ["2 -> 4", "4 -> 4"]
    assert gaps(beats[:2]) == []


def test_reader_stamps_lines_and_keeps_the_unfinished_one(
    console: tuple[SerialConsole, socket.socket],
) -> None:
    reader, qemu = console
    qemu.sendall(b"HB 1\r\nHB 2\r\nHB")
    assert reader.wait(lambda t: t.beats[-1] if len(t.beats) == 2 else None, TIMEOUT)
    assert reader.partial() == "HB"
    first, second = reader.transcript().beats
    assert first.at <= second.at
    qemu.sendall(b" 3\r\n")
    third = reader.wait(lambda t: next((b for b in t.beats if b.n == 3), None), TIMEOUT)
    assert third is not None
    assert third.at >= second.at
    assert reader.partial() == ""


def test_wait_gives_up_at_eof_and_on_timeout(
    console: tuple[SerialConsole, socket.socket],
) -> None:
    reader, qemu = console
    assert reader.wait(lambda t: t.beats[0] if t.beats else None, 0.05) is None
    qemu.sendall(b"HB 1\n")
    qemu.close()
    assert reader.join(TIMEOUT)
    assert reader.wait(lambda t: t.beats[1] if len(t.beats) > 1 else None, TIMEOUT) is None
    assert [b.n for b in reader.transcript().beats] == [1]


def test_a_line_cut_by_the_stop_counts_on_the_destination() -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    readers = [SerialConsole(ours, name) for (ours, _), name in zip(pairs, ["s", "d"], strict=True)]
    try:
        for reader in readers:
            reader.start()
        (_, src_qemu), (_, dst_qemu) = pairs
        src_qemu.sendall(b"HB 7\r\nHB 8\r\nHB ")
        dst_qemu.sendall(b"9\r\nHB 10\r\n")
        src_qemu.close()
        dst_qemu.close()
        assert all(reader.join(TIMEOUT) for reader in readers)
        source, dest = transcripts(*readers)
    finally:
        for reader in readers:
            reader.close(TIMEOUT)
    assert [b.n for b in source.beats] == [7, 8]
    assert [b.n for b in dest.beats] == [9, 10]
    assert not source.garbled
    assert not dest.garbled


def _transcript(*texts: str) -> Transcript:
    return parse([Line(text, float(i)) for i, text in enumerate(texts)])


def test_continuity_accepts_a_guest_that_went_on() -> None:
    source = _transcript("HB 9", "HB 10", f"CK 10 {expected_md5(10)}")
    dest = _transcript("HB 11", "HB 12")
    assert continuity_problems(source, dest) == []


@pytest.mark.parametrize(
    ("source", "dest", "problem"),
    [
        (("HB 9", "HB 10"), ("HB 12",), "destination resumed at 12"),
        (("HB 9", "HB 10"), ("HB 10",), "destination resumed at 10"),
        (("HB 9", "HB 11"), ("HB 12",), "source: beats skip ['9 -> 11']"),
        (("HB 10",), ("HB 11", f"CK 11 {expected_md5(10)}"), "wrong checksums at beats [11]"),
        (("HB 10",), (), "destination: no heartbeat"),
        (("HB 10", "HB 1x"), ("HB 11",), "source: garbled lines ['HB 1x']"),
    ],
)
def test_continuity_names_what_broke(
    source: tuple[str, ...], dest: tuple[str, ...], problem: str
) -> None:
    problems = continuity_problems(_transcript(*source), _transcript(*dest))
    assert any(problem in found for found in problems), problems
