"""Python to Python migrations over TCP and unix sockets, both peer profiles."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import multifd
from multifd.engine.trace import TraceEvent
from multifd.errors import ChannelError, ProtocolError
from multifd.migration import destination, setup_watch
from tests.migration.helpers import PAGE, ReceiverThread, assert_same, make_ram, migrate_locally

SIZES = {"mem": 256 * PAGE, "rom": 37 * PAGE}  # 37: a batch that is not a multiple of 128


@pytest.mark.parametrize("peer", ["native", "qemu-7.2"])
@pytest.mark.parametrize("channels", [0, 1, 2, 4, 8])
def test_tcp_migration_is_exact(channels: int, peer: str) -> None:
    source = make_ram(channels, SIZES)
    result = migrate_locally(
        "tcp:127.0.0.1:0",
        source,
        channels=channels,
        send=lambda address: multifd.send(address, source, channels=channels, peer=peer),
    )
    try:
        assert result.stats.status is multifd.Status.COMPLETED
        assert_same(source, result.ram)
        multifd_channels = [c for c in result.stats.channels if c.channel != "main"]
        assert len(multifd_channels) == channels
    finally:
        result.ram.close()


@pytest.mark.parametrize("channels", [0, 2])
def test_unix_migration_into_files(tmp_path: Path, channels: int) -> None:
    source = make_ram(11, SIZES)
    out = tmp_path / "out"
    result = migrate_locally(f"unix:{tmp_path / 'sock'}", source, channels=channels, output=out)
    result.ram.close()
    for block in source:
        assert (out / block.name).read_bytes() == bytes(block.view)


@pytest.mark.parametrize("peer", ["native", "qemu-7.2"])
def test_markers_follow_one_sync_per_channel(peer: str) -> None:
    """I1-I3 on the real stream: every marker follows exactly one SYNC on every channel."""
    events: list[TraceEvent] = []
    source = make_ram(3, SIZES)
    channels = 4
    result = migrate_locally(
        "tcp:127.0.0.1:0",
        source,
        channels=channels,
        send=lambda address: multifd.send(
            address, source, channels=channels, peer=peer, trace=events.append
        ),
    )
    result.ram.close()
    sent = sorted((e for e in events if e.direction == "send"), key=lambda e: e.seq)
    syncs: dict[str, int] = {}
    markers = 0
    for event in sent:
        if event.record is not None:
            assert sorted(syncs) == [f"multifd/{i}" for i in range(channels)]
            assert set(syncs.values()) == {1}, syncs
            syncs.clear()
            markers += 1
            continue
        packet = event.packet
        assert packet is not None
        if packet.is_sync:
            assert packet.normal_pages == packet.zero_pages == 0  # I1
            syncs[event.channel] = syncs.get(event.channel, 0) + 1
        else:
            assert packet.page_count > 0  # I2
    expected = 3  # setup, the pass, completion
    assert markers == expected
    assert not syncs, "SYNC packets after the last marker"


def test_destination_times_the_migration_from_its_source_arriving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A destination may listen long before its source comes; that wait is not part of the
    migration's time (nor of its rate). The wait is an hour of a shifted clock here."""
    shift = [0.0]

    class _Clock:
        @staticmethod
        def monotonic() -> float:
            return time.monotonic() + shift[0]

    monkeypatch.setattr(destination, "time", _Clock)
    source = make_ram(5, SIZES)
    receiver = ReceiverThread({"channels": 2, "setup_timeout": 7200.0})
    address = receiver.start("tcp:127.0.0.1:0")
    shift[0] = 3600.0  # an hour passes before the source connects
    multifd.send(address, source, channels=2)
    result = receiver.result()
    try:
        assert result.stats.status is multifd.Status.COMPLETED
        assert 0 < result.stats.total_time_ms < 600e3  # this run, not the hour before it
        assert result.stats.setup_time_ms <= result.stats.total_time_ms
    finally:
        result.ram.close()


@pytest.mark.parametrize("peer", ["native", "qemu-7.2"])
def test_a_source_with_fewer_channels_fails_once_those_wait_at_a_sync(
    monkeypatch: pytest.MonkeyPatch, peer: str
) -> None:
    """A destination told 4 channels, a source using 2: both fail as soon as the 2 wait at
    their SYNC for the grace period, not after the whole setup timeout (an hour here)."""
    monkeypatch.setattr(setup_watch, "STRAGGLER_GRACE", 0.2)
    source = make_ram(6, SIZES)
    receiver = ReceiverThread({"channels": 4, "setup_timeout": 3600.0})
    address = receiver.start("tcp:127.0.0.1:0")
    with pytest.raises(multifd.MigrationFailed) as sent:
        multifd.send(address, source, channels=2, peer=peer)
    with pytest.raises(multifd.MigrationFailed) as received:
        receiver.result()
    message = str(received.value)
    assert "2 of 4 multifd channels arrived and have waited at a sync point" in message
    assert "without multifd/2, multifd/3" in message
    assert "does the source use multifd with 4 channels?" in message
    assert "closed the connection" in str(sent.value)  # on a channel or the return path


# A source with multifd off into a destination told 2 channels: what fails it during setup.
MULTIFD_OFF = {
    # mixed RAM: its first page on the main channel
    "mixed": "main: RAM page on the main channel: expected pages on the 2 multifd channels "
    "only, received a page of 'mem' (offset 0x0) while 0 of 2 multifd channels had arrived",
    # zero RAM goes as ZERO records there: the end of its RAM setup, with no channel since
    "zero": "main: the source ended its RAM setup 0.2 s ago and none of the 2 multifd channels",
}


@pytest.mark.parametrize("image", list(MULTIFD_OFF))
@pytest.mark.parametrize("peer", ["native", "qemu-7.2"])
def test_a_source_with_multifd_off_fails_both_ends_during_setup(
    monkeypatch: pytest.MonkeyPatch, peer: str, image: str
) -> None:
    """Not after the whole setup timeout (an hour here)."""
    monkeypatch.setattr(setup_watch, "STRAGGLER_GRACE", 0.2)
    if image == "mixed":
        source = make_ram(7, SIZES)
    else:
        source = multifd.Ram([multifd.RamBlock.from_bytes("mem", bytes(64 * PAGE))])
    receiver = ReceiverThread({"channels": 2, "setup_timeout": 3600.0})
    address = receiver.start("tcp:127.0.0.1:0")
    with pytest.raises(multifd.MigrationFailed, match="closed the connection"):
        multifd.send(address, source, channels=0, peer=peer)
    with pytest.raises(multifd.MigrationFailed) as received:
        receiver.result()
    assert isinstance(received.value.__cause__, ProtocolError | ChannelError)
    assert received.value.__cause__.channel == "main"
    message = str(received.value)
    assert MULTIFD_OFF[image] in message
    assert "is multifd off at the source?" in message
