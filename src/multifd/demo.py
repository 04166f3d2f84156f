"""``multifd demo``: a whole migration on this machine, checked byte for byte.

The receiver runs as a separate process (``multifd receive``), as it would on another
host; this process generates the block, sends it and compares the two sides.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Final

import numpy as np
from rich.console import Console
from rich.table import Table

from multifd import api
from multifd.errors import ChannelError
from multifd.migration.stats import MigrationStats
from multifd.ram import RamBlock
from multifd.wire.constants import PAGE_SIZE

BLOCK_NAME: Final = "mem"
_LISTEN_TIMEOUT: Final = 30.0


def generate_block(size: int, zero_fraction: float, *, seed: int = 7) -> RamBlock:
    """A block of random pages with ``zero_fraction`` of them all zero."""
    block = RamBlock.anonymous(BLOCK_NAME, size)
    rng = np.random.default_rng(seed)
    step = 64 << 20
    for start in range(0, size, step):
        chunk = min(step, size - start)
        block.view[start : start + chunk] = rng.bytes(chunk)
    zero = rng.random(block.page_count) < zero_fraction
    block.pages[zero] = 0
    return block


def read_listening_line(stream: IO[bytes], timeout: float) -> str:
    """The address from a receiver's first stderr line ``listening on ADDRESS``."""
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise ChannelError("receiver did not start listening in time", channel="main")
            byte = os.read(stream.fileno(), 1)
            if not byte:
                raise ChannelError(f"receiver exited before listening: {line!r}", channel="main")
            line += byte
    text = line.decode().strip()
    prefix = "listening on "
    if not text.startswith(prefix):
        raise ChannelError(f"unexpected receiver output: {text!r}", channel="main")
    return text.removeprefix(prefix)


def run_demo(*, size: int, zero_fraction: float, channels: int, console: Console) -> bool:
    """Run the demo; True when the destination equals the source."""
    size -= size % PAGE_SIZE
    shm = Path("/dev/shm")  # noqa: S108  (a private temporary folder made inside it)
    with tempfile.TemporaryDirectory(
        prefix="multifd-demo-", dir=shm if shm.is_dir() else None
    ) as tmp:
        console.print(
            f"generating a {size / 2**20:.0f} MiB block ({zero_fraction:.0%} zero pages)..."
        )
        block = generate_block(size, zero_fraction)
        out = Path(tmp) / "received"
        receiver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "multifd",
                "receive",
                "tcp:127.0.0.1:0",
                "--channels",
                str(channels),
                "--output",
                str(out),
                "--prealloc",  # the destination's RAM exists before the migration starts
                f"{BLOCK_NAME}={size}",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert receiver.stderr is not None
            address = read_listening_line(receiver.stderr, _LISTEN_TIMEOUT)
            console.print(f"receiver listening on {address}; sending over {channels} channels")
            stats = api.send(address, {BLOCK_NAME: block}, channels=channels)
            stdout, stderr = receiver.communicate(timeout=120)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        if receiver.returncode != 0:
            console.print(f"receiver failed: {stderr.decode().strip()}", markup=False)
            return False
        remote = json.loads(stdout)
        _summary(console, stats, remote)
        equal = _compare(block, out / BLOCK_NAME)
        console.print(
            f"destination {'equals' if equal else 'DIFFERS FROM'} the source byte for byte "
            f"({block.page_count} pages compared)"
        )
        block.close()
        return equal


def _compare(block: RamBlock, path: Path) -> bool:
    received = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return received.shape[0] == block.size and bool(
            np.array_equal(received, np.frombuffer(block.view, dtype=np.uint8))
        )
    finally:
        del received


def _summary(console: Console, stats: MigrationStats, remote: dict[str, object]) -> None:
    seconds = stats.total_time_ms / 1e3
    console.print(
        f"completed in {seconds:.2f} s: {stats.transferred / 2**20:.0f} MiB sent, "
        f"{stats.transferred / 1e6 / seconds:.0f} MB/s, {stats.normal} pages, "
        f"{stats.duplicate} zero pages; receiver status: {remote.get('status')}"
    )
    table = Table(title="per channel (sender side)")
    for column in ("channel", "packets", "pages", "zero pages", "MiB"):
        table.add_column(column, justify="right")
    for ch in stats.channels:
        table.add_row(
            ch.channel,
            str(ch.packets),
            str(ch.pages),
            str(ch.zero_pages),
            f"{ch.bytes / 2**20:.1f}",
        )
    console.print(table)
