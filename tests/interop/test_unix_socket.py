"""Migrations over a unix socket with real QEMU 7.2 and 10.0, both directions.

Every channel connects to the same socket path; QEMU 10 tells them apart by peeking at
their first bytes (unix sockets allow it), QEMU 7.2 by their order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.cli import MultifdProcess, receive_args, send_args
from tests.interop.qemu import BLOCK_NAME, QemuVm, ram_mismatch

pytestmark = pytest.mark.interop

SIZE = 32 << 20
TIMEOUT = 30.0
FAST = 10 << 30  # lifts QEMU's 128 MiB/s max-bandwidth default
VERSIONS = ["7.2", "10.0"]

MakeVm = Callable[..., QemuVm]


def _factory(request: pytest.FixtureRequest, version: str) -> MakeVm:
    make: MakeVm = request.getfixturevalue("make_vm" if version == "7.2" else "make_vm10")
    return make


@pytest.mark.parametrize("version", VERSIONS)
def test_qemu_source_into_multifd_receive_over_a_unix_socket(
    request: pytest.FixtureRequest, ram_image: Callable[..., Path], tmp_path: Path, version: str
) -> None:
    source_file = ram_image(SIZE, seed=95)
    output = tmp_path / "received"
    output.mkdir()
    uri = f"unix:{tmp_path / 'migration.sock'}"
    with MultifdProcess(receive_args(uri, channels=2, output=output), timeout=TIMEOUT) as rx:
        assert rx.listening_address(TIMEOUT) == uri
        source = _factory(request, version)(SIZE, ram_file=source_file, name="src")
        source.configure(2, max_bandwidth=FAST)
        source.migrate(uri)
        source.wait_for_status("completed", TIMEOUT)
        result = rx.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert ram_mismatch(source_file, output / BLOCK_NAME) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_multifd_send_into_qemu_over_a_unix_socket(
    request: pytest.FixtureRequest, ram_image: Callable[..., Path], tmp_path: Path, version: str
) -> None:
    source_file = ram_image(SIZE, seed=96)
    destination = _factory(request, version)(SIZE, name="dst", incoming=True)
    destination.configure(2)
    uri = f"unix:{tmp_path / 'migration.sock'}"
    destination.migrate_incoming(uri)  # listening once QMP answers
    args = send_args(uri, {BLOCK_NAME: source_file}, channels=2, peer=f"qemu-{version}")
    with MultifdProcess(args, timeout=TIMEOUT) as sender:
        result = sender.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert destination.wait_for_status("completed", TIMEOUT).status == "completed"
    assert ram_mismatch(source_file, destination.ram_path) is None
    assert destination.log() == ""
