"""The relay and record/replay between real QEMUs (``-M none``, file-backed RAM).

Each hop has settings the other would not accept: the relay re-encodes RAM for the
destination (channels, compression, sync marker, zero pages, switchover-start) and
passes the configuration and device state through. The destination's RAM must equal
the source's image byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from multifd.errors import MigrationFailed
from multifd.migration.recording import record, replay
from multifd.migration.relay import OutSettings, RelayStats, relay
from tests.interop.cli import as_uri
from tests.interop.qemu import QemuVm, free_port, ram_mismatch
from tests.interop.test_matrix import QEMU10_COMPAT
from tests.relay.helpers import LateFailingDestination, Listening

pytestmark = pytest.mark.interop

SIZE: Final = 16 << 20
TIMEOUT: Final = 30.0
FAST: Final = 10 << 30  # lifts QEMU's 128 MiB/s max-bandwidth default
LOCAL: Final = "tcp:127.0.0.1:0"
UUID: Final = "12345678-9abc-def0-1122-334455667788"

MakeVm = Callable[..., QemuVm]
MakeImage = Callable[..., Path]


def _relay_between(
    src: QemuVm, dst: QemuVm, src_channels: int, out: OutSettings, **incoming: object
) -> RelayStats:
    target = dst.listen()
    relayed = Listening(relay, LOCAL, target, channels=src_channels, out=out, **incoming)
    address = relayed.start()
    src.configure(src_channels, max_bandwidth=FAST, **incoming)  # type: ignore[arg-type]
    src.migrate(as_uri(address))
    src.wait_for_status("completed", TIMEOUT)
    dst.wait_for_status("completed", TIMEOUT)
    return relayed.result()


def test_qemu72_via_relay_into_qemu10_with_other_settings(
    make_vm: MakeVm, make_vm10: MakeVm, ram_image: MakeImage
) -> None:
    image = ram_image(SIZE, seed=71)
    src = make_vm(SIZE, ram_file=image, name="src", uuid=UUID)
    dst = make_vm10(SIZE, name="dst", incoming=True, uuid=UUID)  # the UUID is passed on
    dst.configure(4, compression="zstd")
    out = OutSettings(channels=4, compression="zstd", peer="qemu-10.0")
    stats = _relay_between(src, dst, 2, out)
    assert ram_mismatch(image, dst.ram_path) is None
    assert stats.sync_mode == "per-section"
    assert stats.machine == "none"
    assert dst.log() == ""


@pytest.mark.parametrize(
    ("extra_args", "parameters"),
    [
        pytest.param((), (), id="qemu10-defaults"),
        pytest.param(QEMU10_COMPAT.extra_args, dict(QEMU10_COMPAT.parameters), id="compat"),
    ],
)
def test_qemu10_via_relay_into_qemu72(
    make_vm: MakeVm,
    make_vm10: MakeVm,
    ram_image: MakeImage,
    extra_args: tuple[str, ...],
    parameters: dict[str, str],
) -> None:
    image = ram_image(SIZE, seed=72)
    src = make_vm10(SIZE, ram_file=image, name="src", extra_args=extra_args)
    dst = make_vm(SIZE, name="dst", incoming=True)
    if parameters:
        src.set_parameters(**parameters)
    dst.configure(1, compression="zlib")
    out = OutSettings(channels=1, compression="zlib", level=6, peer="qemu-7.2")
    stats = _relay_between(src, dst, 4, out)
    assert ram_mismatch(image, dst.ram_path) is None
    assert stats.sync_mode == ("per-section" if extra_args else "per-round")
    assert dst.log() == ""


def test_outgoing_failure_fails_the_qemu_source_which_runs_on(
    make_vm: MakeVm, ram_image: MakeImage
) -> None:
    image = ram_image(SIZE, seed=73)
    src = make_vm(SIZE, ram_file=image, name="src")
    relayed = Listening(relay, LOCAL, f"tcp:127.0.0.1:{free_port()}", channels=2)
    address = relayed.start()
    src.configure(2, max_bandwidth=FAST)
    src.migrate(as_uri(address))
    src.wait_for_status("failed", TIMEOUT)
    assert src.execute("query-status")["status"] == "running"
    outcome = relayed.outcome()
    assert isinstance(outcome, MigrationFailed)
    assert "outgoing migration" in str(outcome)


def test_record_qemu72_then_replay_into_qemu10_and_qemu72(
    make_vm: MakeVm, make_vm10: MakeVm, ram_image: MakeImage, tmp_path: Path
) -> None:
    image = ram_image(SIZE, seed=74)
    src = make_vm(SIZE, ram_file=image, name="src")
    recording = tmp_path / "rec"
    recorder = Listening(record, LOCAL, recording, channels=2, compression="zstd")
    address = recorder.start()
    src.configure(2, max_bandwidth=FAST, compression="zstd")
    src.migrate(as_uri(address))
    src.wait_for_status("completed", TIMEOUT)
    _, manifest = recorder.result()
    assert manifest.source.sync_mode == "per-section"
    assert manifest.source.zero_pages == "legacy"
    assert not manifest.source.switchover_start
    dst10 = make_vm10(SIZE, name="dst10", incoming=True)
    dst10.configure(2)
    replay(recording, dst10.listen(), channels=2, peer="qemu-10.0")
    dst10.wait_for_status("completed", TIMEOUT)
    assert ram_mismatch(image, dst10.ram_path) is None
    dst72 = make_vm(SIZE, name="dst72", incoming=True)
    dst72.configure(4, compression="zstd")
    replay(recording, dst72.listen(), channels=4, compression="zstd")  # as the source did
    dst72.wait_for_status("completed", TIMEOUT)
    assert ram_mismatch(image, dst72.ram_path) is None


def test_a_qemu_source_with_a_return_path_hears_the_destination_through_the_relay(
    make_vm: MakeVm, make_vm10: MakeVm, ram_image: MakeImage
) -> None:
    # QEMU keeps its socket open until it hears SHUT: the relay must see the end of the
    # stream in the bytes it forwards, then pass the destination's SHUT(0) back.
    image = ram_image(SIZE, seed=75)
    src = make_vm(SIZE, ram_file=image, name="src")
    dst = make_vm10(SIZE, name="dst", incoming=True)
    dst.configure(2)
    target = dst.listen()
    relayed = Listening(relay, LOCAL, target, channels=2, out=OutSettings(peer="qemu-10.0"))
    address = relayed.start()
    src.configure(2, max_bandwidth=FAST)
    src.set_capabilities(multifd=True, return_path=True)
    src.migrate(as_uri(address))
    src.wait_for_status("completed", TIMEOUT)
    dst.wait_for_status("completed", TIMEOUT)
    relayed.result()
    assert ram_mismatch(image, dst.ram_path) is None


def test_a_destination_failing_late_fails_the_qemu_source_with_a_return_path(
    make_vm: MakeVm, ram_image: MakeImage
) -> None:
    destination = LateFailingDestination(channels=2)
    try:
        src = make_vm(SIZE, ram_file=ram_image(SIZE, seed=76), name="src")
        relayed = Listening(relay, LOCAL, destination.address, channels=2)
        address = relayed.start()
        src.configure(2, max_bandwidth=FAST)
        src.set_capabilities(multifd=True, return_path=True)
        src.migrate(as_uri(address))
        src.wait_for_status("failed", TIMEOUT)
        assert src.execute("query-status")["status"] == "running"
        outcome = relayed.outcome()
    finally:
        destination.close()
    assert isinstance(outcome, MigrationFailed)
    assert "SHUT status 1" in str(outcome)
