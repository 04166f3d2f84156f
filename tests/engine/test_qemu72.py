"""The Receiver accepts what a real QEMU 7.2 source sent (captures in shared/vectors/qemu-7.2).

Channel id 0 (``none_conn2.bin``) carries the pre-9.0 race artefacts: a SYNC packet with
three pages and right after it an empty flag-0 packet with stale fields (spec TV4).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from multifd.engine.recv import Receiver
from multifd.errors import multifd_channel
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import MULTIFD_FLAG_SYNC, PAGE_SIZE
from tests.engine.helpers import TIMEOUT, VECTORS, Recorder

CAPTURE_SYNCS = 3  # SYNC packets per channel in the captures: setup, iterate, complete


def capture(name: str) -> bytes:
    path: Path = VECTORS / name
    assert path.is_file(), f"QEMU 7.2 capture missing: {path} (shared/ must sit beside the repo)"
    return path.read_bytes()


def feed(data: bytes) -> tuple[socket.socket, threading.Thread]:
    """A socket whose peer writes ``data`` and then closes, as the source did."""
    ours, theirs = socket.socketpair()

    def write() -> None:
        with theirs:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=write, name="test-feed")
    writer.start()
    return ours, writer


def test_qemu72_nocomp_channels_load_into_memory() -> None:
    mem = RamBlock.anonymous("mem", 4 << 20)
    recorder = Recorder()
    receiver = Receiver(Ram([mem]), channels=2, trace=recorder, io_timeout=TIMEOUT)
    writers = []
    try:
        for name in ("none_conn1.bin", "none_conn2.bin"):  # accept order: id 1, then id 0
            sock, writer = feed(capture(name))
            writers.append(writer)
            assert receiver.accept_channel(sock, TIMEOUT) == (1 if name == "none_conn1.bin" else 0)
        for _ in range(CAPTURE_SYNCS):  # the loader at each EOS marker of the main stream
            receiver.wait_sync(TIMEOUT)
        receiver.finish(TIMEOUT)
    finally:
        receiver.close()
        for writer in writers:
            writer.join(TIMEOUT)
    for page, fill in ((0, 0x01), (1, 0x02), (5, 0x06)):
        assert bytes(mem.page_view(page * PAGE_SIZE)) == bytes([fill]) * PAGE_SIZE
    untouched = [p for p in range(mem.page_count) if p not in (0, 1, 5)]
    assert not mem.pages[untouched].any()
    received = recorder.packets("recv", multifd_channel(0))
    flags_and_pages = [(p.flags, p.normal_pages) for p in received]
    assert (MULTIFD_FLAG_SYNC, 3) in flags_and_pages  # pages inside a SYNC packet
    assert (0, 0) in flags_and_pages  # the empty flag-0 packet
    stats = receiver.stats()
    assert [c.sync_packets for c in stats] == [CAPTURE_SYNCS, CAPTURE_SYNCS]
    assert sum(c.pages for c in stats) == 3
