"""Interop with QEMU 10.0 (Debian 13's, unpacked by ``scripts/qemu10.sh``).

QEMU 10 defaults differ from 7.2 where it matters on the wire: ``zero-page-detection=multifd``
(zero pages listed in multifd packets, no ZERO records on the main channel), per-round sync
(one ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` per pass over RAM) and ``MIG_CMD_SWITCHOVER_START``
before the completion phase. Every case uses the defaults, migrates a file-backed ``-M none``
guest and compares RAM byte for byte. The QEMU -> QEMU case proves the harness; the capture
case pins down what QEMU 10 puts on each channel, decoded by our own decoders.
"""

from __future__ import annotations

import re
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from multifd.wire.constants import (
    INIT_PACKET_SIZE,
    MIG_CMD_SWITCHOVER_START,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
)
from multifd.wire.packets import InitPacket, RamPacket
from multifd.wire.records import (
    Command,
    Configuration,
    Eof,
    Event,
    FileHeader,
    GlobalState,
    RamEos,
    RamMemSize,
    RamMultifdFlush,
    RamPage,
    RamZero,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    TimerState,
    VmDescription,
)
from multifd.wire.stream_decoder import StreamDecoder
from tests.interop.cli import MultifdProcess, as_uri, receive_args, send_args
from tests.interop.qemu import BLOCK_NAME, QemuVm, ram_mismatch, zero_page_count

pytestmark = pytest.mark.interop

SIZE = 32 << 20
# The bound on every wait; each case needs about a second on an idle machine.
TIMEOUT = 30.0
# Lifts the 128 MiB/s max-bandwidth default, which would throttle every source.
FAST = 10 << 30
CHANNELS = [pytest.param(0, id="no-multifd"), 2]

MakeVm = Callable[..., QemuVm]
MakeImage = Callable[..., Path]


def test_qemu10_to_qemu10_harness_sanity(make_vm10: MakeVm, ram_image: MakeImage) -> None:
    source_file = ram_image(SIZE, seed=60)
    source = make_vm10(SIZE, ram_file=source_file, name="src")
    destination = make_vm10(SIZE, name="dst", incoming=True)
    assert source.execute("query-version")["qemu"]["major"] == 10
    source.configure(2, max_bandwidth=FAST)
    destination.configure(2)
    source.migrate(destination.listen())
    destination.wait_for_status("completed", TIMEOUT)
    sent = source.wait_for_status("completed", TIMEOUT).info["ram"]
    assert ram_mismatch(source_file, destination.ram_path) is None
    assert sent["duplicate"] == zero_page_count(source_file)
    assert sent["normal"] + sent["duplicate"] == SIZE // PAGE_SIZE
    # Zero-page detection in the multifd threads: the main channel carries no page at all.
    assert sent["precopy-bytes"] < PAGE_SIZE < sent["multifd-bytes"]
    assert destination.log() == ""


@pytest.mark.parametrize("channels", CHANNELS)
def test_qemu10_source_into_multifd_receive(
    make_vm10: MakeVm, ram_image: MakeImage, tmp_path: Path, channels: int
) -> None:
    source_file = ram_image(SIZE, seed=61 + channels)
    output = tmp_path / "received"
    output.mkdir()
    args = receive_args("tcp:127.0.0.1:0", channels=channels, output=output)
    with MultifdProcess(args, timeout=TIMEOUT) as receiver:
        uri = as_uri(receiver.listening_address(TIMEOUT))
        source = make_vm10(SIZE, ram_file=source_file, name="src")
        source.configure(channels, max_bandwidth=FAST)
        source.migrate(uri)
        source.wait_for_status("completed", TIMEOUT)
        result = receiver.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.json()["status"] == "completed"
    assert ram_mismatch(source_file, output / BLOCK_NAME) is None


@pytest.mark.parametrize("channels", CHANNELS)
def test_multifd_send_peer_qemu10_into_qemu10(
    make_vm10: MakeVm, ram_image: MakeImage, channels: int
) -> None:
    source_file = ram_image(SIZE, seed=71 + channels)
    destination = make_vm10(SIZE, name="dst", incoming=True)
    destination.configure(channels)
    args = send_args(
        destination.listen(), {BLOCK_NAME: source_file}, channels=channels, peer="qemu-10.0"
    )
    with MultifdProcess(args, timeout=TIMEOUT) as sender:
        result = sender.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    destination.wait_for_status("completed", TIMEOUT)
    assert ram_mismatch(source_file, destination.ram_path) is None
    assert destination.log() == ""


# -- what QEMU 10 sends ----------------------------------------------------------------------


def _capture(listener: socket.socket, connections: int, deadline: float) -> list[bytes]:
    """Accept ``connections`` connections and read each to EOF, in arrival order.

    One thread serves them all through a selector, so no channel stalls the others (QEMU's
    main channel waits for every multifd channel at each sync).
    """
    streams: list[bytearray] = []
    peers: list[socket.socket] = []
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        try:
            while len(streams) < connections or len(selector.get_map()) > 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"capture: {len(streams)} of {connections} connections")
                for key, _ in selector.select(min(left, 1.0)):
                    _serve(selector, key, listener, streams, peers)
        finally:
            for peer in peers:
                peer.close()
    return [bytes(stream) for stream in streams]


def _serve(
    selector: selectors.BaseSelector,
    key: selectors.SelectorKey,
    listener: socket.socket,
    streams: list[bytearray],
    peers: list[socket.socket],
) -> None:
    if key.fileobj is listener:
        peer, _ = listener.accept()
        peers.append(peer)
        selector.register(peer, selectors.EVENT_READ, len(streams))
        streams.append(bytearray())
        return
    peer = peers[key.data]
    data = peer.recv(1 << 20)
    streams[key.data] += data
    if not data:
        selector.unregister(peer)


def _main_events(stream: bytes) -> list[Event]:
    decoder = StreamDecoder()
    decoder.feed(stream)
    events = list(decoder.events())
    decoder.close()
    return events


def _multifd_packets(stream: bytes) -> tuple[InitPacket, list[RamPacket]]:
    """Split one uncompressed multifd channel into its init packet and packet headers."""
    init = InitPacket.unpack(stream[:INIT_PACKET_SIZE], channel="capture")
    packets, at = [], INIT_PACKET_SIZE
    while at < len(stream):
        packet = RamPacket.unpack(stream[at : at + PACKET_HEADER_SIZE], channel="capture")
        packets.append(packet)
        at += PACKET_HEADER_SIZE + packet.normal_pages * PAGE_SIZE
    assert at == len(stream)
    return init, packets


# One letter per record, to compare a stream's structure with a pattern.
_LETTERS: dict[type[Event], str] = {
    FileHeader: "H",
    Configuration: "C",
    SectionStart: "S",
    SectionPart: "P",
    SectionEnd: "E",
    SectionFull: "F",
    SectionFooter: "/",
    RamMemSize: "M",
    RamMultifdFlush: "f",
    RamEos: "e",
    Command: "!",
    TimerState: "t",
    GlobalState: "g",
    Eof: "0",
    VmDescription: "v",
    RamPage: "p",
    RamZero: "z",
}


def _shape(events: list[Event]) -> str:
    return "".join(_LETTERS[type(event)] for event in events)


def test_qemu10_streams_for_machine_none(make_vm10: MakeVm, ram_image: MakeImage) -> None:
    source_file = ram_image(SIZE, seed=80)
    source = make_vm10(SIZE, ram_file=source_file, name="src")
    source.configure(2, max_bandwidth=FAST)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        source.migrate(f"tcp:127.0.0.1:{listener.getsockname()[1]}")
        main, *channels = _capture(listener, 3, time.monotonic() + TIMEOUT)
    source.wait_for_status("completed", TIMEOUT)

    events = _main_events(main)
    shape = _shape(events)
    # Setup: blocks, flush (the setup SYNC), EOS; passes; switchover-start; completion;
    # timer and globalstate; EOF; vmdesc. No configuration subsection, no page record.
    assert events[1] == Configuration("none")
    assert events[3] == RamMemSize(SIZE, ((BLOCK_NAME, SIZE),))
    assert re.fullmatch(r"HCSMfe/(Pf*e/)*!Ef*e/Ft/Fg/0v", shape), shape
    assert Command(MIG_CMD_SWITCHOVER_START, b"") in events

    # Per-round sync: exactly one SYNC per channel for each MULTIFD_FLUSH (so none for
    # the completion phase alone), and SYNC packets carry no page (9.0+).
    flushes = shape.count("f")
    assert flushes >= 2  # setup + at least one full pass
    zero_pages = normal_pages = 0
    ids: set[int] = set()
    for stream in channels:
        init, packets = _multifd_packets(stream)
        ids.add(init.channel_id)
        syncs = [p for p in packets if p.is_sync]
        assert len(syncs) == flushes
        assert all(p.page_count == 0 for p in syncs)
        zero_pages += sum(p.zero_pages for p in packets)
        normal_pages += sum(p.normal_pages for p in packets)
    assert ids == {0, 1}
    assert zero_pages == zero_page_count(source_file)
    assert zero_pages + normal_pages == SIZE // PAGE_SIZE
