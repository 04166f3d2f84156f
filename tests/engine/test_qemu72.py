"""The Receiver accepts what a real QEMU 7.2 source sent (captures in shared/vectors/qemu-7.2).

Channel id 0 of the nocomp and zstd captures carries the pre-9.0 race artefacts: a SYNC
packet with three pages and right after it an empty flag-0 packet with stale fields (spec
TV4); the zlib capture has its pages in a plain data packet and stale fields in its SYNCs.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from multifd.engine.recv import Receiver
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import MULTIFD_FLAG_SYNC, MULTIFD_FLAG_ZSTD, PAGE_SIZE
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


def assert_pages(mem: RamBlock) -> None:
    for page, fill in ((0, 0x01), (1, 0x02), (5, 0x06)):
        assert bytes(mem.page_view(page * PAGE_SIZE)) == bytes([fill]) * PAGE_SIZE
    untouched = [p for p in range(mem.page_count) if p not in (0, 1, 5)]
    assert not mem.pages[untouched].any()


@pytest.mark.parametrize(
    ("method", "race_flags"),
    [("none", MULTIFD_FLAG_SYNC), ("zlib", None), ("zstd", MULTIFD_FLAG_SYNC | MULTIFD_FLAG_ZSTD)],
)
def test_qemu72_channels_load_into_memory(method: str, race_flags: int | None) -> None:
    mem = RamBlock.anonymous("mem", 4 << 20)
    recorder = Recorder()
    receiver = Receiver(
        Ram([mem]), channels=2, compression=method, trace=recorder, io_timeout=TIMEOUT
    )
    writers = []
    try:
        for conn in ("conn1", "conn2"):  # in the order QEMU's channels were accepted
            data = capture(f"{method}_{conn}.bin")
            sock, writer = feed(data)
            writers.append(writer)
            assert receiver.accept_channel(sock, TIMEOUT) == data[24]  # the init packet's id
        for k in range(CAPTURE_SYNCS):  # the loader at each EOS marker of the main stream
            receiver.wait_sync(TIMEOUT)
            if k == 1:  # I4: the pages came before (or inside) the second SYNC of id 0
                assert_pages(mem)
        receiver.finish(TIMEOUT)
    finally:
        receiver.close()
        for writer in writers:
            writer.join(TIMEOUT)
    assert_pages(mem)
    stats = receiver.stats()
    assert [c.sync_packets for c in stats] == [CAPTURE_SYNCS, CAPTURE_SYNCS]
    assert sum(c.pages for c in stats) == 3
    if race_flags is not None:
        flags_and_pages = [(p.flags, p.normal_pages) for p in recorder.packets("recv", "multifd/0")]
        assert (race_flags, 3) in flags_and_pages  # pages inside a SYNC packet
        assert (0, 0) in flags_and_pages  # the empty flag-0 packet
