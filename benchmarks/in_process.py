"""Measured in one process, beside mixed.py's migrations: memcpy, the zero-page scan, zstd.

Run by ``mixed.py`` as a child process (``--scan-worker IMAGE``), so its buffers do not
raise the benchmark's own peak RSS, on the same image in the same run:

- ``numpy.copyto`` of a hot 1 GiB buffer: memcpy bandwidth, best of 3;
- :func:`multifd.ram.zero_pages` over the image's ``RamBlock.words``, and over an
  all-zero block of the same size (the worst case: every page read in full);
- zstd compression of the pages with data of the image's first 512 MiB, on 1 and on 2
  threads, the way send threads compress but without sockets: does the GIL serialize it?
"""

from __future__ import annotations

import argparse
import json
import mmap
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import numpy as np

# Run as a script, this directory is on sys.path (for harness); the tests' helpers need the
# repository root too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import MIB, Setup, verdict
from tests.interop.qemu import BLOCK_NAME, PAGE_SIZE

from multifd.compression import compressor
from multifd.engine.batch import Batch, PacketPlan, data_in_one_buffer
from multifd.ram import RamBlock, zero_pages
from multifd.wire.constants import PAGES_PER_PACKET

ZSTD_LEVEL: Final = 1  # QEMU's multifd-zstd-level default
# A source plans its pages in chunks of this many (migration/source.py), a packet's worth
# of pages 64 times over.
CHUNK_PAGES: Final = 64 * PAGES_PER_PACKET
MEMCPY_SIZE: Final = 1 << 30
COMPRESS_SIZE: Final = 512 * MIB  # of the image, compressed by 1 and by 2 threads
BEST_OF: Final = 3
SCAN_TARGET: Final = 0.5  # scan bandwidth over memcpy bandwidth


def scan_worker(image: Path) -> None:
    """``--scan-worker``: print memcpy, zero-scan and compression figures as JSON.

    A separate process, so its buffers do not raise the benchmark's own peak RSS.
    """
    memcpy = _memcpy_seconds()
    block = RamBlock.from_file(BLOCK_NAME, image)
    found = int(np.count_nonzero(zero_pages(block.words)))  # also faults the mapping in
    mixed = _best(lambda: zero_pages(block.words))
    compressed, one, two = _compress_scaling(block)
    block.close()
    empty = mmap.mmap(-1, image.stat().st_size)
    zero_block = RamBlock("zeros", empty)
    zero_block.pages[:] = 0  # real zero-filled pages, not the kernel's shared zero page
    worst = _best(lambda: zero_pages(zero_block.words))
    zero_block.close()
    size = image.stat().st_size
    print(json.dumps({
        "memcpy_bytes_per_s": MEMCPY_SIZE / memcpy,
        "scan_mixed_bytes_per_s": size / mixed,
        "scan_all_zero_bytes_per_s": size / worst,
        "zero_pages_found": found,
        "compressed_bytes": compressed,
        "compress_1_thread_s": one,
        "compress_2_threads_s": two,
    }))  # fmt: skip


def _compress_scaling(block: RamBlock) -> tuple[int, float, float]:
    """Bytes compressed, and the best seconds on 1 and on 2 threads."""
    packets = _packets(block, min(COMPRESS_SIZE, block.size) // PAGE_SIZE)
    one = _best(lambda: _compress_all(packets, 1))
    two = _best(lambda: _compress_all(packets, 2))
    return sum(batch.normal for batch in packets) * PAGE_SIZE, one, two


def _packets(block: RamBlock, pages: int) -> list[Batch]:
    """The packets a sender makes of the block's first ``pages`` pages (zero pages found)."""
    packets = []
    for first in range(0, pages, CHUNK_PAGES):
        offsets = np.arange(first, min(first + CHUNK_PAGES, pages)) * PAGE_SIZE
        plan = PacketPlan(block, offsets, detect_zero_pages=True)
        for index in range(len(plan)):
            batch = Batch()
            plan.fill(batch, index)
            if batch.normal:
                packets.append(batch)
    return packets


def _compress_all(packets: Sequence[Batch], threads: int) -> None:
    """zstd-compress the packets' pages on ``threads`` threads, each with its own stream
    and its share of the packets, the way send threads do: scattered pages gathered, one
    library call per packet."""

    def work(share: Sequence[Batch]) -> None:
        stream = compressor("zstd", ZSTD_LEVEL)
        assert stream is not None
        scratch = np.empty((PAGES_PER_PACKET, PAGE_SIZE), dtype=np.uint8)
        for batch in share:
            stream.compress_parts(data_in_one_buffer(batch, scratch))

    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(work, packets[k::threads]) for k in range(threads)]:
            done.result()


def _memcpy_seconds() -> float:
    source = np.empty(MEMCPY_SIZE, dtype=np.uint8)
    target = np.empty_like(source)
    source.fill(1)  # touch every page of both buffers before timing: a hot copy
    target.fill(0)
    return _best(lambda: np.copyto(target, source))


def _best(func: Callable[[], object]) -> float:
    times = []
    for _ in range(BEST_OF):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_scan(setup: Setup) -> dict[str, Any]:
    """Run :func:`scan_worker` in a child process; ``{"error": ...}`` if it fails."""
    done = subprocess.run(
        [sys.executable, __file__, "--scan-worker", str(setup.image)],
        capture_output=True, text=True, timeout=setup.timeout, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no stderr"])[-1][:300]}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def scan_lines(scan: dict[str, Any], zeros: int) -> tuple[list[str], list[str]]:
    """The scan section's lines and its target lines."""
    if "error" in scan:
        return [f"- scan worker failed: {scan['error']}"], [
            f"| zero-page scan / memcpy >= {SCAN_TARGET}x | | error |"
        ]
    memcpy = scan["memcpy_bytes_per_s"]
    mixed, worst = scan["scan_mixed_bytes_per_s"], scan["scan_all_zero_bytes_per_s"]
    found = scan["zero_pages_found"]
    lines = [
        (
            f"- memcpy (`numpy.copyto`, hot {MEMCPY_SIZE / MIB:.0f} MiB, best of {BEST_OF}): "
            f"{memcpy / 1e6:.0f} MB/s"
        ),
        (
            f"- zero-page scan (`zero_pages(RamBlock.words)`, best of {BEST_OF}), 50 % zero: "
            f"{mixed / 1e6:.0f} MB/s = {mixed / memcpy:.2f}x memcpy "
            f"({found} zero pages found, {zeros} written"
            f"{'' if found == zeros else ': MISMATCH'})"
        ),
        (
            f"- zero-page scan, all zero (worst case, every word read): {worst / 1e6:.0f} MB/s "
            f"= {worst / memcpy:.2f}x memcpy"
        ),
    ]
    one, two = scan["compress_1_thread_s"], scan["compress_2_threads_s"]
    rate = scan["compressed_bytes"] / 1e6
    lines.append(
        f"- zstd level {ZSTD_LEVEL} compression alone, as send threads do it (scattered pages "
        f"gathered, one libzstd call per packet), the pages with data of the image's first "
        f"{COMPRESS_SIZE / MIB:.0f} MiB, no sockets, best of {BEST_OF}: 1 thread "
        f"{rate / one:.0f} MB/s, 2 threads {rate / two:.0f} MB/s = {one / two:.2f}x"
    )
    targets = [
        (
            f"| for reference, zstd compression alone, 2 threads / 1 thread (no sockets: "
            f"does the GIL serialize it?) | {one / two:.2f}x | |"
        ),
        (
            f"| zero-page scan (50 % zero) / memcpy >= {SCAN_TARGET}x | {mixed / memcpy:.2f}x | "
            f"{verdict(mixed / memcpy, SCAN_TARGET)} |"
        ),
        (
            f"| zero-page scan (all zero, worst case) / memcpy >= {SCAN_TARGET}x | "
            f"{worst / memcpy:.2f}x | {verdict(worst / memcpy, SCAN_TARGET)} |"
        ),
    ]
    return lines, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scan-worker", type=Path, required=True, help="the image")
    scan_worker(parser.parse_args().scan_worker)


if __name__ == "__main__":
    main()
