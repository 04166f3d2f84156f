"""The interop matrix (issue 4): every real QEMU both ways, every channel count and method.

Axes: the peer (QEMU 7.2; QEMU 10.0 with its defaults, ``zero-page-detection=multifd`` and
per-round sync; QEMU 10.0 with the settings it needs to talk to 7.2), the direction (QEMU
source into ``multifd receive``, ``multifd send`` into a QEMU destination) and the mode
(multifd off, or 1, 2 and 4 channels with compression none, zlib and zstd). Multifd off is
one mode, not three: compression only exists inside multifd packets.

Levels vary with the channel count so that QEMU's default (1), zlib 6 and the ends of the
ranges (zlib 9; zstd 0, which libzstd reads as its default 3, and 20, whose 32 MiB window is
the largest our decoder accepts) all go through both implementations, zstd 3 through the
compat settings; the level is set on both sides, although only the sender's one changes
the bytes (inflate and zstd decompression take no level).

Every case migrates a small mixed image (random, zero, one-byte-repeated and copied pages),
compares the far side's RAM with the source byte for byte, and checks where the zero pages
travelled: as ZERO records on the main channel for 7.2 and the compat settings, in the
multifd packets' zero list for QEMU 10's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pytest

from tests.interop.cli import MultifdProcess, as_uri, receive_args, send_args
from tests.interop.qemu import BLOCK_NAME, PAGE_SIZE, QemuVm, ram_mismatch, zero_page_count

pytestmark = pytest.mark.interop

SIZE: Final = 8 << 20
PAGES: Final = SIZE // PAGE_SIZE
# The bound on every wait; a case takes about a second on an idle 2-core machine.
TIMEOUT: Final = 30.0
# Pages in two full multifd packets (128 pages each).
_RUN: Final = 256
# Lifts QEMU's 128 MiB/s max-bandwidth default, which would throttle every source.
FAST: Final = 10 << 30

MakeVm = Callable[..., QemuVm]
MakeImage = Callable[..., Path]


@dataclass(frozen=True, slots=True)
class Peer:
    """One kind of QEMU on the far side.

    Attributes:
        name: the test id.
        fixture: the VM factory fixture (``make_vm`` for 7.2, ``make_vm10`` for 10.0).
        profile: our sender's ``--peer`` for this QEMU.
        extra_args: added to QEMU's command line.
        parameters: set with ``migrate-set-parameters`` on the QEMU.
        multifd_zero_pages: whether multifd sources list zero pages in the packets
            (``zero-page-detection=multifd``) rather than as ZERO records on main.
        counts_wire_bytes: whether a source's ``multifd-bytes`` counts what went on the
            wire; 7.2 adds ``pages * 4096 + header`` when it queues a packet, before
            compression, so its figure never shows compression.
    """

    name: str
    fixture: str
    profile: str
    extra_args: tuple[str, ...] = ()
    parameters: tuple[tuple[str, str], ...] = ()
    multifd_zero_pages: bool = False
    counts_wire_bytes: bool = True


QEMU72: Final = Peer("qemu-7.2", "make_vm", "qemu-7.2", counts_wire_bytes=False)
QEMU10: Final = Peer("qemu-10.0", "make_vm10", "qemu-10.0", multifd_zero_pages=True)
# What QEMU 10 needs to talk to 7.2; our sender talks to it as it would to 7.2.
QEMU10_COMPAT: Final = Peer(
    "qemu-10.0-compat",
    "make_vm10",
    "qemu-7.2",
    extra_args=(
        "-global",
        "migration.multifd-flush-after-each-section=on",
        "-global",
        "migration.send-switchover-start=off",
    ),
    parameters=(("zero-page-detection", "legacy"),),
)


@dataclass(frozen=True, slots=True)
class Mode:
    """Multifd off (``channels == 0``) or a channel count, method and level."""

    channels: int
    compression: str = "none"
    level: int | None = None

    @property
    def id(self) -> str:
        """The test id: ``no-multifd`` or e.g. ``2ch-zlib-l6``."""
        if not self.channels:
            return "no-multifd"
        level = "" if self.level is None else f"-l{self.level}"
        return f"{self.channels}ch-{self.compression}{level}"


# Per channel count, the level of each method (None: QEMU's default, 1).
_LEVELS: Final[dict[int, dict[str, int | None]]] = {
    1: {"zlib": None, "zstd": None},
    2: {"zlib": 6, "zstd": 20},
    4: {"zlib": 9, "zstd": 0},
}
MODES: Final = [Mode(0)] + [
    Mode(channels, method, _LEVELS[channels].get(method))
    for channels in (1, 2, 4)
    for method in ("none", "zlib", "zstd")
]
# The compat settings once per kind of stream: plain, deflate, zstd; and multifd off.
COMPAT_MODES: Final = [Mode(0), Mode(1, "zlib"), Mode(2), Mode(4, "zstd", 3)]

CASES: Final = [
    pytest.param(peer, mode, id=f"{peer.name}-{mode.id}")
    for peer, modes in ((QEMU72, MODES), (QEMU10, MODES), (QEMU10_COMPAT, COMPAT_MODES))
    for mode in modes
]


def _start_vm(request: pytest.FixtureRequest, peer: Peer, **options: Any) -> QemuVm:
    make: MakeVm = request.getfixturevalue(peer.fixture)
    vm = make(SIZE, extra_args=peer.extra_args, **options)
    if peer.parameters:
        vm.set_parameters(**dict(peer.parameters))
    return vm


def _image(ram_image: MakeImage, seed: int) -> Path:
    """A mixed image, checked to hold random, zero and repeated pages.

    Two runs of two packets' worth of pages are added: all zero (a multifd packet with no
    normal page at all, which QEMU 10 still flags with the compression method) and all
    one repeated byte (payloads of a few bytes).
    """
    path = ram_image(SIZE, seed=seed)
    pages = np.fromfile(path, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    pages[_RUN : 2 * _RUN] = 0
    pages[3 * _RUN : 4 * _RUN] = 0x5A
    pages.tofile(path)
    uniform = np.all(pages == pages[:, :1], axis=1)
    zero = uniform & (pages[:, 0] == 0)
    _, first, counts = np.unique(pages, axis=0, return_index=True, return_counts=True)
    unique = np.zeros(len(pages), dtype=bool)
    unique[first[counts == 1]] = True
    kinds = {
        "zero": int(zero.sum()),
        "one repeated byte": int((uniform & ~zero).sum()),
        "copies of another page": int((~uniform & ~unique).sum()),
        "random": int((~uniform & unique).sum()),
    }
    assert min(kinds.values()) > PAGES // 8, kinds
    return path


def _zero_pages_by_channel(stats: dict[str, Any]) -> tuple[int, int]:
    """Zero pages counted on the main channel and on the multifd channels."""
    main = multifd = 0
    for channel in stats["channels"]:
        if channel["channel"] == "main":
            main += channel["zero-pages"]
        else:
            multifd += channel["zero-pages"]
    return main, multifd


def _check_zero_pages(stats: dict[str, Any], zeros: int, *, in_packets: bool) -> None:
    assert stats["ram"]["duplicate"] == zeros
    expected = (0, zeros) if in_packets else (zeros, 0)
    assert _zero_pages_by_channel(stats) == expected


def _check_compressed(ram: dict[str, Any], mode: Mode) -> None:
    """Multifd payloads shrink exactly when a method is on (a third of the pages repeat)."""
    if mode.channels:
        compressed = ram["multifd-bytes"] < ram["normal"] * PAGE_SIZE
        assert compressed == (mode.compression != "none"), ram


@pytest.mark.parametrize(("peer", "mode"), CASES)
def test_qemu_source_into_multifd_receive(
    request: pytest.FixtureRequest, ram_image: MakeImage, tmp_path: Path, peer: Peer, mode: Mode
) -> None:
    source_file = _image(ram_image, seed=100 + mode.channels)
    output = tmp_path / "received"
    output.mkdir()
    args = receive_args(
        "tcp:127.0.0.1:0", channels=mode.channels, output=output, compression=mode.compression
    )
    with MultifdProcess(args, timeout=TIMEOUT) as receiver:
        uri = as_uri(receiver.listening_address(TIMEOUT))
        source = _start_vm(request, peer, ram_file=source_file, name="src")
        source.configure(
            mode.channels, max_bandwidth=FAST, compression=mode.compression, level=mode.level
        )
        source.migrate(uri)
        sent = source.wait_for_status("completed", TIMEOUT).info["ram"]
        result = receiver.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    received = result.json()
    assert received["status"] == "completed"
    assert ram_mismatch(source_file, output / BLOCK_NAME) is None
    zeros = zero_page_count(source_file)
    assert sent["duplicate"] == zeros
    in_packets = peer.multifd_zero_pages and mode.channels > 0
    _check_zero_pages(received, zeros, in_packets=in_packets)
    # QEMU's own account agrees: with zero pages in the packets, main carries no page.
    assert (sent["precopy-bytes"] < PAGE_SIZE) == (mode.channels > 0 and in_packets)
    assert (sent["multifd-bytes"] > 0) == (mode.channels > 0)
    _check_compressed(received["ram"], mode)
    if peer.counts_wire_bytes:
        _check_compressed(sent, mode)


@pytest.mark.parametrize(("peer", "mode"), CASES)
def test_multifd_send_into_qemu_destination(
    request: pytest.FixtureRequest, ram_image: MakeImage, peer: Peer, mode: Mode
) -> None:
    source_file = _image(ram_image, seed=200 + mode.channels)
    destination = _start_vm(request, peer, name="dst", incoming=True)
    destination.configure(mode.channels, compression=mode.compression, level=mode.level)
    args = send_args(
        destination.listen(),
        {BLOCK_NAME: source_file},
        channels=mode.channels,
        peer=peer.profile,
        compression=mode.compression,
        level=mode.level,
    )
    with MultifdProcess(args, timeout=TIMEOUT) as sender:
        result = sender.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    destination.wait_for_status("completed", TIMEOUT)
    assert ram_mismatch(source_file, destination.ram_path) is None
    assert destination.log() == ""
    in_packets = peer.profile != "qemu-7.2" and mode.channels > 0
    _check_zero_pages(result.json(), zero_page_count(source_file), in_packets=in_packets)
    _check_compressed(result.json()["ram"], mode)
