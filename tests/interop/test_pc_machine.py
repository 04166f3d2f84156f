"""A ``pc`` machine, with its devices and firmware, into ``multifd receive`` (QEMU 7.2, 10.0).

A real machine's stream carries device state after the RAM (``cpu_common``, ``apic``, ...),
whose sections only the machine's own QEMU can decode. ``multifd receive`` keeps every RAM
block, checks that what follows ends the stream whole, and drops it (it used to fail there,
"unknown FULL section", after it had received all the RAM). The guest's RAM is our
``memory-backend-file`` (block ``mem``), so it is compared with its image; the firmware's
block is compared with the BIOS file QEMU loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.cli import MultifdProcess, as_uri, receive_args
from tests.interop.qemu import BLOCK_NAME, QemuVm, ram_mismatch

pytestmark = pytest.mark.interop

SIZE = 64 << 20
TIMEOUT = 30.0
FAST = 10 << 30  # lifts QEMU's 128 MiB/s max-bandwidth default
BIOS = "usr/share/seabios/bios-256k.bin"  # below / for 7.2, below the prefix for 10.0


@pytest.mark.parametrize("return_path", [False, True], ids=["plain", "return-path"])
@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_a_pc_machine_into_multifd_receive_keeps_every_ram_block(
    request: pytest.FixtureRequest,
    ram_image: Callable[..., Path],
    tmp_path: Path,
    version: str,
    return_path: bool,
) -> None:
    """With QEMU's return path the source waits for our SHUT: the receiver must tell the
    end of the stream from the undecoded tail (a whole VM description after EOF)."""
    make: Callable[..., QemuVm] = request.getfixturevalue(
        "make_vm" if version == "7.2" else "make_vm10"
    )
    binary = Path(request.getfixturevalue("qemu_binary" if version == "7.2" else "qemu10_binary"))
    root = Path("/") if version == "7.2" else binary.parent.parent  # the prefix of 10.0
    source_file = ram_image(SIZE, seed=97)
    output = tmp_path / "received"
    output.mkdir()
    args = receive_args("tcp:127.0.0.1:0", channels=2, output=output)
    with MultifdProcess(args, timeout=TIMEOUT) as receiver:
        uri = as_uri(receiver.listening_address(TIMEOUT))
        source = make(SIZE, ram_file=source_file, name="src", paused=True, extra_args=["-M", "pc"])
        source.configure(2, max_bandwidth=FAST)
        source.set_capabilities(multifd=True, return_path=return_path)
        source.migrate(uri)
        source.wait_for_status("completed", TIMEOUT)
        result = receiver.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    received = {path.name for path in output.iterdir()}
    assert {BLOCK_NAME, "pc.bios", "pc.rom"} <= received, received
    assert ram_mismatch(source_file, output / BLOCK_NAME) is None
    assert (output / "pc.bios").read_bytes() == (root / BIOS).read_bytes()
