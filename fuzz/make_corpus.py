"""Write the fuzzer's seed corpus: our own migrations, recorded, and the QEMU 7.2 captures.

Usage: ``python fuzz/make_corpus.py [FOLDER]`` (default ``fuzz/corpus``); writes one
``seed-*`` file per stream in the format of :mod:`fuzz.stream_case`.

Our traffic is recorded by a sink that accepts the source's connections and reads each to
its end: a source never reads, so it runs exactly as against a real destination. Each
migration uses one multifd channel (the harness feeds one) and small blocks, so a seed
stays within the fuzzer's ``-max_len``.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np

import multifd
from fuzz.stream_case import MULTIFD_OFF, Case
from multifd.dirty import DirtyLog
from multifd.migration.precopy import Limits, TimeoutPolicy
from multifd.migration.stats import MigrationStats
from multifd.wire.constants import INIT_PACKET_SIZE, PAGE_SIZE

VECTORS: Final = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "qemu-7.2"
BOUND: Final = 30.0


class Sink:
    """Accepts ``count`` connections and keeps every byte each one carried."""

    def __init__(self, count: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(BOUND)
        self.address = f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"
        self.streams: list[bytes] = []  # owned by the sink thread until join()
        self._thread = threading.Thread(target=self._run, args=(count,), name="sink")
        self._thread.start()

    def _run(self, count: int) -> None:
        conns = [self._listener.accept()[0] for _ in range(count)]
        for conn in conns:
            conn.settimeout(BOUND)
            chunks = []
            while data := conn.recv(1 << 16):
                chunks.append(data)
            self.streams.append(b"".join(chunks))
            conn.close()

    def join(self) -> list[bytes]:
        self._thread.join(BOUND)
        self._listener.close()
        return self.streams


def record(send: Callable[[str], object], channels: int) -> tuple[bytes, bytes]:
    """Run ``send(address)`` against a sink: (main stream, multifd stream) without magic/init."""
    sink = Sink(1 + channels)
    send(sink.address)
    streams = sink.join()
    main = next(s for s in streams if s.startswith(b"QEVM"))
    multifd_stream = next((s for s in streams if not s.startswith(b"QEVM")), b"")
    return main[4:], multifd_stream[INIT_PACKET_SIZE:]


def ram(sizes: dict[str, int], seed: int = 1) -> multifd.Ram:
    """Blocks of ``sizes`` pages: data pages, zero pages and a repeated page."""
    rng = np.random.default_rng(seed)
    blocks = []
    for name, pages in sizes.items():
        block = multifd.RamBlock.anonymous(name, pages * PAGE_SIZE)
        block.words[:, 0] = np.arange(1, pages + 1, dtype=np.uint64)  # compressible pages
        block.pages[:, 64:96] = np.frombuffer(rng.bytes(pages * 32), np.uint8).reshape(-1, 32)
        block.pages[rng.random(pages) < 0.3] = 0
        block.pages[-1] = block.pages[0]
        blocks.append(block)
    return multifd.Ram(blocks)


def live(address: str) -> MigrationStats:
    """Three passes of a block a writer dirties between chunks."""
    memory = ram({"mem": 8})
    log = DirtyLog(memory)
    block = memory["mem"]
    count = [0]

    def write(_stats: MigrationStats) -> None:
        count[0] += 1
        block.words[count[0] % block.page_count, 1] = count[0]
        log.mark_dirty(block, (count[0] % block.page_count) * PAGE_SIZE, 8)

    limits = Limits(downtime_limit=1e-9, max_passes=3, on_timeout=TimeoutPolicy.FORCE)
    return multifd.send(address, log, channels=1, limits=limits, progress=write)


def ours() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for compression in ("none", "zlib", "zstd"):
        for peer in ("native", "qemu-7.2", "qemu-10.0"):
            main, channel = record(
                lambda a, c=compression, p=peer: multifd.send(  # type: ignore[misc]
                    a, ram({"mem": 6}), channels=1, compression=c, peer=p
                ),
                channels=1,
            )
            cases[f"{peer}-{compression}"] = Case(compression, True, False, main, channel)
    main, channel = record(lambda a: multifd.send(a, ram({"a": 3, "b": 5}), channels=1), 1)
    cases["two-blocks"] = Case("none", True, True, main, channel)
    main, channel = record(live, 1)
    cases["live-three-passes"] = Case("none", True, True, main, channel)
    for peer in ("native", "qemu-7.2"):
        main, _ = record(lambda a, p=peer: multifd.send(a, ram({"mem": 6}), channels=0, peer=p), 0)  # type: ignore[misc]
        cases[f"no-multifd-{peer}"] = Case("none", False, True, main, b"")
    return cases


def qemu() -> dict[str, Case]:
    """The QEMU 7.2 captures: each main stream with each of its multifd channels."""
    cases: dict[str, Case] = {}
    for name in ("plain_ram", "plain_backend"):
        main = (VECTORS / f"{name}.bin").read_bytes()[4:]
        cases[f"qemu72-{name}"] = Case("none", False, False, main, b"")
    for compression in ("none", "zlib", "zstd"):
        main = (VECTORS / f"{compression}_conn0.bin").read_bytes()[4:]
        for conn in (1, 2):
            channel = (VECTORS / f"{compression}_conn{conn}.bin").read_bytes()
            cases[f"qemu72-{compression}-conn{conn}"] = Case(
                compression, True, conn == 1, main, channel[INIT_PACKET_SIZE:]
            )
    return cases


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    for name, case in {**ours(), **qemu()}.items():
        data = case.encode()
        (folder / f"seed-{name}").write_bytes(data)
        print(f"seed-{name}: {len(data)} bytes", file=sys.stderr)
    assert MULTIFD_OFF  # the format's flags live in stream_case


if __name__ == "__main__":
    main()
