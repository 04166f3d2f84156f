"""Relay, record and replay between our own source and destination, in one process.

Each hop gets its own settings (channel count, compression, sync mode, zero pages); the
destination must end with exactly the source's memory, also when pages change between
passes, data pages turning zero included. Failures on either side must fail the other.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import multifd
from multifd.address import parse_address
from multifd.errors import ConfigError, MigrationFailed
from multifd.migration import relay as relay_module
from multifd.migration.precopy import Hooks, Limits, TimeoutPolicy
from multifd.migration.recording import MANIFEST, RecordingError, record, replay
from multifd.migration.relay import OutSettings, RelayStats, relay
from multifd.migration.source import RamSection, Source
from multifd.migration.stats import MigrationStats, Status
from multifd.wire import stream
from multifd.wire.compat import PROFILES
from multifd.wire.constants import PAGE_SIZE
from multifd.wire.packets import InitPacket, RamPacket
from tests.migration.helpers import ReceiverThread, assert_same, make_ram
from tests.migration.test_precopy import live_block
from tests.relay.helpers import BOUND, DirtyingLog, LateFailingDestination, Listening

LOCAL = "tcp:127.0.0.1:0"
SIZES = {"pc.ram": 4 << 20, "/rom@etc/acpi/tables": 64 << 10}
# Three passes, then switchover whatever remains: every hop sees pages change.
PASSES = Limits(downtime_limit=1e-6, max_passes=3, on_timeout=TimeoutPolicy.FORCE)


def live_send(address: str, ram: multifd.Ram, seed: int, **options: object) -> None:
    multifd.send(address, DirtyingLog(ram, seed), limits=PASSES, **options)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Hop:
    """One side of the relay: the peer profile, channel count and compression."""

    peer: str
    channels: int
    compression: str = "none"


HOPS = [
    pytest.param(Hop("qemu-7.2", 2), Hop("qemu-10.0", 4, "zstd"), id="7.2-2ch_to_10.0-4ch-zstd"),
    pytest.param(Hop("qemu-10.0", 4, "zlib"), Hop("qemu-7.2", 1), id="10.0-4ch-zlib_to_7.2-1ch"),
    pytest.param(Hop("native", 2, "zstd"), Hop("as-source", 3, "zlib"), id="zstd_to_as-source"),
    pytest.param(Hop("qemu-7.2", 0), Hop("native", 2), id="no-multifd_to_native"),
    pytest.param(Hop("qemu-10.0", 2), Hop("qemu-7.2", 0), id="10.0_to_no-multifd"),
]


@pytest.mark.parametrize(("into", "out_of"), HOPS)
def test_live_migration_through_the_relay_arrives_whole(
    into: Hop, out_of: Hop, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every incoming marker waits for the forwarder (no lag allowed), so each pass after
    # the first is forwarded in a round of its own, whatever the scheduling.
    monkeypatch.setattr(relay_module, "_LAG_PAGES", 0)
    source = make_ram(7, SIZES)
    receiver = ReceiverThread({"channels": out_of.channels, "compression": out_of.compression})
    target = receiver.start(LOCAL)
    out = OutSettings(channels=out_of.channels, compression=out_of.compression, peer=out_of.peer)
    relayed = Listening(
        relay, LOCAL, target, channels=into.channels, compression=into.compression, out=out
    )
    address = relayed.start()
    live_send(address, source, 11, channels=into.channels, compression=into.compression,
              peer=into.peer)  # fmt: skip
    stats = relayed.result()
    received = receiver.result()
    try:
        assert_same(source, received.ram)
    finally:
        received.ram.close()
    assert stats.machine == "none"
    assert stats.rounds >= 2  # the passes after the first carried changed pages
    assert stats.pages > sum(size // PAGE_SIZE for size in SIZES.values())
    per_round = into.peer in ("native", "qemu-10.0") and into.channels
    assert stats.sync_mode == ("per-round" if per_round else "per-section")
    # The -M none device state (timer, globalstate, EOF, description) went through as is.
    assert stats.tail_bytes > 100
    assert json.loads(json.dumps(stats.to_json()))["status"] == "completed"


def test_section_ids_configuration_and_tail_go_through_unchanged(tmp_path: Path) -> None:
    # A source with another machine type and ram section id than ours, through the relay
    # into a recorder, which stores what it received.
    ram = make_ram(3, {"mem": 1 << 20})
    config = stream.configuration("pc-q35-7.2")
    recorder = Listening(record, LOCAL, tmp_path / "rec", channels=1)
    relayed = Listening(relay, LOCAL, recorder.start(), channels=2, out=OutSettings(channels=1))
    source = Source(
        ram, PROFILES["qemu-10.0"], channels=2, configuration=config,
        ram_section=RamSection(section_id=7, instance_id=0, version_id=4),
    )  # fmt: skip
    try:
        source.open(parse_address(relayed.start()))
        source.setup()
        source.send_pass({"mem": np.arange(ram["mem"].page_count, dtype=np.int64)})
        source.complete({})
    finally:
        source.close()
    stats: RelayStats = relayed.result()
    _, manifest = recorder.result()
    assert (stats.machine, manifest.machine) == ("pc-q35-7.2", "pc-q35-7.2")
    assert manifest.ram_section == RamSection(7, 0, 4)
    assert (tmp_path / "rec" / "configuration.bin").read_bytes() == config
    tail = (tmp_path / "rec" / "tail.bin").read_bytes()
    assert tail.startswith(stream.timer_section(0) + stream.globalstate_section(4))
    assert stats.tail_bytes == len(tail)
    # as-source: the source's switchover-start went on; the recorder saw it.
    assert manifest.source.switchover_start
    assert manifest.source.sync_mode == "per-round"
    assert (tmp_path / "rec" / "ram" / "mem").read_bytes() == bytes(ram["mem"].view)


def test_outgoing_connection_refused_fails_the_source() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = make_ram(5, {"mem": 8 << 20})
    relayed = Listening(relay, LOCAL, f"tcp:127.0.0.1:{port}", channels=2)
    address = relayed.start()
    with pytest.raises(MigrationFailed):
        multifd.send(address, source, channels=2, peer="qemu-7.2", io_timeout=10)
    outcome = relayed.outcome()
    assert isinstance(outcome, MigrationFailed)
    assert f"outgoing migration to tcp:127.0.0.1:{port}" in str(outcome)


def test_destination_dying_mid_way_fails_the_source_and_sends_no_eof() -> None:
    # A destination that reads the first bytes of every channel, then resets them all.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        source = make_ram(6, {"mem": 48 << 20})  # more than the socket buffers hold
        relayed = Listening(relay, LOCAL, f"tcp:127.0.0.1:{port}", channels=2)
        address = relayed.start()
        sending = Listening(_send_quietly, address, source)
        sending.start()
        server.settimeout(BOUND)
        peers = [server.accept()[0] for _ in range(3)]
        seen = b"".join(peer.recv(64) for peer in peers)
        for peer in peers:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            peer.close()
        assert b"QEVM" in seen
        assert isinstance(sending.outcome(), MigrationFailed)
        assert isinstance(relayed.outcome(), MigrationFailed)


def _send_quietly(address: str, ram: multifd.Ram, *, on_listening: object) -> None:
    if callable(on_listening):
        on_listening(address)
    multifd.send(address, ram, channels=2, peer="qemu-7.2", io_timeout=10)


def test_source_dying_mid_way_leaves_the_destination_without_eof() -> None:
    receiver = ReceiverThread({"channels": 2})
    target = receiver.start(LOCAL)
    relayed = Listening(relay, LOCAL, target, channels=2)
    address = relayed.start()
    # A source that sends the setup section (the relay then connects onward), then dies.
    main = socket.create_connection(_host_port(address), BOUND)
    channels = [socket.create_connection(_host_port(address), BOUND) for _ in range(2)]
    for index, sock in enumerate(channels):
        sock.sendall(InitPacket(index, bytes(16)).pack() + RamPacket.sync(1).pack())
    main.sendall(
        stream.file_header()
        + stream.configuration("none")
        + stream.section_start(2, "ram", 0, 4)
        + stream.ram_mem_size([("mem", 1 << 20)])
        + stream.ram_eos()
        + stream.section_footer(2)
        + stream.section_part(2)
    )
    for sock in (main, *channels):
        sock.close()
    assert isinstance(relayed.outcome(), MigrationFailed)
    with pytest.raises(MigrationFailed, match=r"QEMU_VM_EOF|closed|ended"):
        receiver.result()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    return host, int(port)


# -- record and replay -----------------------------------------------------------------------
def test_record_then_replay_gives_the_last_state(tmp_path: Path) -> None:
    source = make_ram(8, SIZES)
    recording = tmp_path / "rec"
    recorder = Listening(record, LOCAL, recording, channels=2, compression="zlib")
    live_send(recorder.start(), source, 12, channels=2, compression="zlib", peer="qemu-10.0")
    _stats, manifest = recorder.result()
    assert manifest.machine == "none"
    assert manifest.source.sync_mode == "per-round"
    assert manifest.source.zero_pages == "multifd"
    assert manifest.source.switchover_start
    assert [b.name for b in manifest.blocks] == list(SIZES)
    receiver = ReceiverThread({"channels": 4, "compression": "zstd"})
    target = receiver.start(LOCAL)
    replay(recording, target, channels=4, compression="zstd", peer="qemu-7.2")
    received = receiver.result()
    try:
        assert_same(source, received.ram)
    finally:
        received.ram.close()


def _recorded(tmp_path: Path) -> Path:
    recording = tmp_path / "rec"
    recorder = Listening(record, LOCAL, recording, channels=1)
    multifd.send(recorder.start(), make_ram(9, {"mem": 1 << 20}), channels=1, peer="qemu-7.2")
    recorder.result()
    return recording


def _spoil_block(recording: Path) -> str:
    path = recording / "ram" / "mem"
    data = bytearray(path.read_bytes())
    data[12345] ^= 1
    path.write_bytes(data)
    return str(path)


def _cut_tail(recording: Path) -> str:
    path = recording / "tail.bin"
    path.write_bytes(path.read_bytes()[:-1])
    return str(path)


def _drop_manifest(recording: Path) -> str:
    (recording / MANIFEST).unlink()
    return str(recording / MANIFEST)


def _bad_manifest(recording: Path) -> str:
    path = recording / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["blocks"][0]["file"] = "../../etc/passwd"
    path.write_text(json.dumps(manifest))
    return "outside the recording"


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        (_spoil_block, "SHA-256"),
        (_cut_tail, "bytes, the manifest says"),
        (_drop_manifest, "missing"),
        (_bad_manifest, ""),
    ],
)
def test_a_spoilt_recording_is_refused_before_connecting(
    tmp_path: Path, spoil: object, says: str
) -> None:
    recording = _recorded(tmp_path)
    assert callable(spoil)
    named = spoil(recording)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with pytest.raises(RecordingError) as info:
            replay(recording, f"tcp:127.0.0.1:{port}")
        server.settimeout(0)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    assert named in str(info.value)
    assert says in str(info.value)


def test_record_refuses_to_overwrite_a_recording(tmp_path: Path) -> None:
    recording = _recorded(tmp_path)
    with pytest.raises(ConfigError, match="already holds a recording"):
        record(LOCAL, recording)


def test_a_failed_recording_has_no_manifest(tmp_path: Path) -> None:
    recording = tmp_path / "rec"
    recorder = Listening(record, LOCAL, recording, channels=0)
    address = recorder.start()
    with socket.create_connection(_host_port(address), BOUND) as main:
        main.sendall(b"QEVM\0\0\0\3")
    assert isinstance(recorder.outcome(), MigrationFailed)
    assert not (recording / MANIFEST).exists()


def test_replayed_pages_are_all_sent_zero_pages_included(tmp_path: Path) -> None:
    recording = _recorded(tmp_path)
    # The destination's block starts full of 0xff: every page must be overwritten.
    block = multifd.RamBlock.anonymous("mem", 1 << 20)
    block.pages[:] = 0xFF
    receiver = ReceiverThread({"channels": 2, "into": multifd.Ram([block])})
    target = receiver.start(LOCAL)
    replay(recording, target, channels=2)
    receiver.result()
    expected = (recording / "ram" / "mem").read_bytes()
    assert bytes(block.view) == expected
    assert np.count_nonzero(~block.pages.any(axis=1)) > 0  # zero pages were replayed as zero
    block.close()


@pytest.mark.parametrize(
    ("in_peer", "out_peer"), [("qemu-7.2", "qemu-10.0"), ("native", "qemu-7.2")]
)
def test_memory_written_all_along_arrives_as_paused(in_peer: str, out_peer: str) -> None:
    # The forwarder reads pages while the next epoch's writes land in them: whatever it
    # read early must be sent again once the last write of the page is in.
    with live_block(rate=5000) as (block, log, writer):
        receiver = ReceiverThread({"channels": 3, "compression": "zstd"})
        target = receiver.start(LOCAL)
        out = OutSettings(channels=3, compression="zstd", peer=out_peer)
        relayed = Listening(relay, LOCAL, target, channels=2, out=out)
        limits = Limits(downtime_limit=0.005, max_bandwidth=50e6)
        multifd.send(relayed.start(), log, channels=2, peer=in_peer, limits=limits,
                     hooks=Hooks(pause=writer.pause))  # fmt: skip
        stats = relayed.result()
        received = receiver.result()
        try:
            assert np.array_equal(received.ram["mem"].words, block.words)
        finally:
            received.ram.close()
    assert writer.number > 0
    assert stats.rounds >= 2


def test_a_destination_failing_after_the_last_byte_fails_the_source() -> None:
    # The return path, on both hops: the destination's SHUT(1) reaches our source.
    destination = LateFailingDestination(channels=2)
    try:
        relayed = Listening(relay, LOCAL, destination.address, channels=2)
        with pytest.raises(MigrationFailed, match=r"SHUT status 1"):
            multifd.send(relayed.start(), make_ram(4, {"mem": 1 << 20}), channels=2)
        outcome = relayed.outcome()
    finally:
        destination.close()
    assert isinstance(outcome, MigrationFailed)
    assert "outgoing migration" in str(outcome)
    assert "SHUT status 1" in str(outcome)


def test_without_the_return_path_the_relay_cannot_know() -> None:
    destination = LateFailingDestination(channels=2)
    try:
        out = OutSettings(return_path=False)
        relayed = Listening(relay, LOCAL, destination.address, channels=2, out=out)
        multifd.send(relayed.start(), make_ram(4, {"mem": 1 << 20}), channels=2)
        stats = relayed.result()
    finally:
        destination.close()
    assert stats.incoming.status.value == "completed"


def test_replay_hears_a_destination_failing_after_the_last_byte(tmp_path: Path) -> None:
    recording = _recorded(tmp_path)
    destination = LateFailingDestination(channels=2)
    try:
        with pytest.raises(MigrationFailed, match=r"SHUT status 1"):
            replay(recording, destination.address, channels=2)
    finally:
        destination.close()


def test_relay_and_record_report_their_incoming_progress(tmp_path: Path) -> None:
    ram = make_ram(4, {"mem": 1 << 20})
    pages = ram["mem"].page_count
    recorded: list[MigrationStats] = []
    relayed_seen: list[MigrationStats] = []
    recorder = Listening(record, LOCAL, tmp_path / "rec", channels=1,
                         progress=recorded.append, progress_interval=BOUND)  # fmt: skip
    relayed = Listening(relay, LOCAL, recorder.start(), channels=2, out=OutSettings(channels=1),
                        progress=relayed_seen.append, progress_interval=BOUND)  # fmt: skip
    multifd.send(relayed.start(), ram, channels=2)
    relayed.result()
    recorder.result()
    # An interval this long leaves the final report only: the figures at the end.
    for seen in (relayed_seen, recorded):
        assert [s.status for s in seen] == [Status.COMPLETED]
        assert seen[0].normal + seen[0].duplicate >= pages
    assert relayed_seen[0].normal + relayed_seen[0].duplicate == pages  # one pass came in
