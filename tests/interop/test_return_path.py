"""QEMU's return path against real QEMU 7.2 and 10.0, both directions.

* ``multifd send`` opens the return path (on by default): a QEMU destination answers it
  with SHUT(0) when its incoming migration completed; when it fails, QEMU 7.2 exits without
  a word and QEMU 10.0 sends SHUT(1) first. Either way our source fails instead of
  reporting ``completed`` (F1 in docs/reliability.md).
* A QEMU source with the ``return-path`` capability into ``multifd receive``: we answer its
  PING and send SHUT(0) when every block is written; a failure on our side (a corrupted
  EOF byte, injected by the fault proxy) sends SHUT(1) and QEMU's migration fails. Without
  the capability QEMU reports ``completed`` in the same case.

The failures strike after the source's last byte left: the fault proxy of
``tests/faults/harness.py`` inverts the ``QEMU_VM_EOF`` byte of the main stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

import multifd
from multifd.errors import MigrationFailed
from tests.faults.harness import At, Fault, FaultProxy
from tests.interop.cli import MultifdProcess, as_uri, receive_args, send_args
from tests.interop.qemu import BLOCK_NAME, QemuError, QemuVm, ram_mismatch

pytestmark = pytest.mark.interop

SIZE = 32 << 20
TIMEOUT = 30.0
FAST = 10 << 30  # lifts QEMU's 128 MiB/s max-bandwidth default
CHANNELS = 2
VERSIONS = [
    pytest.param(("make_vm", "qemu-7.2"), id="7.2"),
    pytest.param(("make_vm10", "qemu-10.0"), id="10.0"),
]
EOF_BYTE = Fault("corrupt", At("main", "Eof", 1, 0))

MakeVm = Callable[..., QemuVm]
MakeImage = Callable[..., Path]


def _vm_factory(request: pytest.FixtureRequest, version: tuple[str, str]) -> MakeVm:
    factory: MakeVm = request.getfixturevalue(version[0])
    return factory


# -- multifd send -> QEMU ---------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_qemu_destinations_answer_the_return_path(
    request: pytest.FixtureRequest, ram_image: MakeImage, version: tuple[str, str]
) -> None:
    make_vm = _vm_factory(request, version)
    source_file = ram_image(SIZE, seed=70)
    destination = make_vm(SIZE, name="dst", incoming=True)
    destination.configure(CHANNELS)
    args = send_args(destination.listen(), {BLOCK_NAME: source_file}, channels=CHANNELS,
                     peer=version[1])  # fmt: skip
    with MultifdProcess(["-v", *args], timeout=TIMEOUT) as sender:
        result = sender.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "the destination completed the migration (SHUT status 0)" in result.stderr
    destination.wait_for_status("completed", TIMEOUT)
    assert ram_mismatch(source_file, destination.ram_path) is None
    assert destination.log() == ""


@pytest.mark.parametrize("return_path", [True, False], ids=["return-path", "none"])
@pytest.mark.parametrize("version", VERSIONS)
def test_a_qemu_destination_failing_after_the_last_byte(
    request: pytest.FixtureRequest,
    ram_image: MakeImage,
    version: tuple[str, str],
    return_path: bool,
) -> None:
    make_vm = _vm_factory(request, version)
    source_file = ram_image(SIZE, seed=71)
    destination = make_vm(SIZE, name="dst", incoming=True)
    destination.configure(CHANNELS)
    error: MigrationFailed | None = None
    with FaultProxy(destination.listen(), [EOF_BYTE]) as proxy:
        try:
            multifd.send(
                proxy.address, {BLOCK_NAME: source_file}, channels=CHANNELS, peer=version[1],
                io_timeout=TIMEOUT, return_path=return_path,
            )  # fmt: skip
        except MigrationFailed as exc:
            error = exc
        ended = time.monotonic()
        fired = proxy.wait_fired(TIMEOUT)
        assert fired is not None
        with pytest.raises(QemuError, match=r"migration failed|exited"):
            destination.wait_for_status("completed", TIMEOUT)
    if not return_path:
        assert error is None  # F1: the source cannot know
        return
    assert error is not None, "the source completed while QEMU failed"
    assert error.channel == "main (return path)"
    # QEMU 7.2 exits on a failed load without a word; QEMU 10.0 says SHUT(1) first.
    said = "without a SHUT" if version[1] == "qemu-7.2" else "(SHUT status 1)"
    assert said in str(error)
    assert ended - fired.time < 2.0  # QEMU exits at once: no wait for io_timeout


# -- QEMU -> multifd receive ------------------------------------------------------------------
def _qemu_source(make_vm: MakeVm, source_file: Path, *, return_path: bool) -> QemuVm:
    source = make_vm(SIZE, ram_file=source_file, name="src")
    source.configure(CHANNELS, max_bandwidth=FAST)
    source.set_capabilities(multifd=True, return_path=return_path)
    return source


@pytest.mark.parametrize("version", VERSIONS)
def test_multifd_receive_answers_a_qemu_source(
    request: pytest.FixtureRequest, ram_image: MakeImage, tmp_path: Path, version: tuple[str, str]
) -> None:
    make_vm = _vm_factory(request, version)
    source_file = ram_image(SIZE, seed=72)
    output = tmp_path / "received"
    args = receive_args("tcp:127.0.0.1:0", channels=CHANNELS, output=output)
    with MultifdProcess(args, timeout=TIMEOUT) as receiver:
        source = _qemu_source(make_vm, source_file, return_path=True)
        source.migrate(as_uri(receiver.listening_address(TIMEOUT)))
        state = source.wait_for_status("completed", TIMEOUT)
        result = receiver.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert state.info["status"] == "completed"
    assert ram_mismatch(source_file, output / BLOCK_NAME) is None


@pytest.mark.parametrize("version", VERSIONS)
def test_multifd_receive_logs_the_return_path(
    request: pytest.FixtureRequest, ram_image: MakeImage, tmp_path: Path, version: tuple[str, str]
) -> None:
    """The verbose log shows the PING answered and the SHUT sent, in that order."""
    make_vm = _vm_factory(request, version)
    source_file = ram_image(SIZE, seed=73)
    args = receive_args("tcp:127.0.0.1:0", channels=CHANNELS, output=tmp_path / "received")
    with MultifdProcess(["-v", *args], timeout=TIMEOUT) as receiver:
        source = _qemu_source(make_vm, source_file, return_path=True)
        source.migrate(as_uri(receiver.listening_address(TIMEOUT)))
        source.wait_for_status("completed", TIMEOUT)
        result = receiver.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    opened = result.stderr.index("return path opened")
    assert result.stderr.index("SHUT(0) sent on the return path") > opened


@pytest.mark.parametrize("return_path", [True, False], ids=["return-path", "none"])
@pytest.mark.parametrize("version", VERSIONS)
def test_a_qemu_source_hears_multifd_receive_fail(
    request: pytest.FixtureRequest,
    ram_image: MakeImage,
    tmp_path: Path,
    version: tuple[str, str],
    return_path: bool,
) -> None:
    make_vm = _vm_factory(request, version)
    source_file = ram_image(SIZE, seed=74)
    args = receive_args("tcp:127.0.0.1:0", channels=CHANNELS, output=tmp_path / "received")
    with MultifdProcess(args, timeout=TIMEOUT) as receiver:
        target = as_uri(receiver.listening_address(TIMEOUT))
        with FaultProxy(target, [EOF_BYTE]) as proxy:
            source = _qemu_source(make_vm, source_file, return_path=return_path)
            source.migrate(proxy.address)
            result = receiver.wait(TIMEOUT)
            assert proxy.wait_fired(TIMEOUT) is not None
            if not return_path:
                # F1 on QEMU's side: its last byte left, nothing tells it otherwise.
                source.wait_for_status("completed", TIMEOUT)
            else:
                with pytest.raises(QemuError, match="migration failed") as info:
                    source.wait_for_status("completed", TIMEOUT)
                assert "Sibling indicated error 1" in str(info.value)
    assert result.returncode == 1
    assert "record type" in result.stderr
