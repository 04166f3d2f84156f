"""Interop with a real QEMU 7.2: QEMU -> ``multifd receive``, ``multifd send`` -> QEMU.

Every case migrates a file-backed ``-M none`` guest whose RAM mixes random, zero, repeated
and identical pages, and checks the other end's copy byte for byte. The QEMU -> QEMU cases
prove the harness itself: when they pass and a Python case fails, the Python side is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.cli import MultifdProcess, as_uri, receive_args, send_args
from tests.interop.qemu import BLOCK_NAME, QemuError, QemuVm, ram_mismatch, zero_page_count

pytestmark = pytest.mark.interop

SIZE = 32 << 20
# The bound on every wait; each case needs about a second on an idle machine.
TIMEOUT = 30.0
# Lifts 7.2's 128 MiB/s max-bandwidth default, which would throttle every source.
FAST = 10 << 30
UUID = "12345678-9abc-def0-1122-334455667788"
OTHER_UUID = "87654321-0fed-cba9-8877-665544332211"
CHANNELS = [pytest.param(0, id="no-multifd"), 1, 2, 4]

MakeVm = Callable[..., QemuVm]
MakeImage = Callable[..., Path]


def _receive_from_qemu(
    make_vm: MakeVm,
    source_file: Path,
    output: Path,
    *,
    channels: int,
    source_uuid: str | None = None,
    receiver_uuid: str | None = None,
    receiver_channels: int | None = None,
) -> tuple[QemuVm, MultifdProcess]:
    """Start ``multifd receive`` and a QEMU source, and start the migration (the receiver
    expects ``channels`` unless told ``receiver_channels``)."""
    output.mkdir(exist_ok=True)
    expected = channels if receiver_channels is None else receiver_channels
    args = receive_args("tcp:127.0.0.1:0", channels=expected, output=output, uuid=receiver_uuid)
    receiver = MultifdProcess(args, timeout=TIMEOUT)
    try:
        uri = as_uri(receiver.listening_address(TIMEOUT))
        source = make_vm(SIZE, ram_file=source_file, name="src", uuid=source_uuid)
        source.configure(channels, max_bandwidth=FAST)
        source.migrate(uri)
    except BaseException:
        receiver.close()
        raise
    return source, receiver


@pytest.mark.parametrize("channels", CHANNELS)
def test_qemu_source_into_multifd_receive(
    make_vm: MakeVm, ram_image: MakeImage, tmp_path: Path, channels: int
) -> None:
    source_file = ram_image(SIZE, seed=channels)
    output = tmp_path / "received"
    source, receiver = _receive_from_qemu(make_vm, source_file, output, channels=channels)
    with receiver:
        source.wait_for_status("completed", TIMEOUT)
        result = receiver.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert isinstance(result.json(), dict)
    assert ram_mismatch(source_file, output / BLOCK_NAME) is None


def test_qemu_source_uuid_matches_receiver(
    make_vm: MakeVm, ram_image: MakeImage, tmp_path: Path
) -> None:
    source_file = ram_image(SIZE, seed=11)
    output = tmp_path / "received"
    source, receiver = _receive_from_qemu(
        make_vm, source_file, output, channels=2, source_uuid=UUID, receiver_uuid=UUID
    )
    with receiver:
        source.wait_for_status("completed", TIMEOUT)
        result = receiver.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert ram_mismatch(source_file, output / BLOCK_NAME) is None


def test_qemu_source_uuid_mismatch_fails_clearly(
    make_vm: MakeVm, ram_image: MakeImage, tmp_path: Path
) -> None:
    source_file = ram_image(SIZE, seed=12)
    output = tmp_path / "received"
    source, receiver = _receive_from_qemu(
        make_vm, source_file, output, channels=2, source_uuid=UUID, receiver_uuid=OTHER_UUID
    )
    with receiver:
        result = receiver.wait(TIMEOUT)
        # The receiver must drop every connection, so the source fails instead of hanging.
        with pytest.raises(QemuError, match="migration failed"):
            source.wait_for_status("completed", TIMEOUT)
    assert result.returncode != 0
    assert "uuid" in result.stderr.lower(), result.stderr
    # Either spelling of the offending uuid will do, as long as the message names it.
    assert UUID.replace("-", "") in result.stderr.replace("-", ""), result.stderr


def test_qemu_source_with_fewer_channels_fails_both_ends_at_its_first_sync(
    make_vm: MakeVm, ram_image: MakeImage, tmp_path: Path
) -> None:
    # QEMU negotiates no channel count: a source with 2 into a destination told 4 used to
    # wait for the whole setup timeout (60 s, beyond TIMEOUT); now 5 s once the 2 wait at
    # their SYNC.
    source_file = ram_image(SIZE, seed=13)
    output = tmp_path / "received"
    source, receiver = _receive_from_qemu(
        make_vm, source_file, output, channels=2, receiver_channels=4
    )
    with receiver:
        result = receiver.wait(TIMEOUT)
        with pytest.raises(QemuError, match="migration failed"):
            source.wait_for_status("completed", TIMEOUT)
    assert result.returncode == 1
    assert "2 of 4 multifd channels arrived and have waited at a sync point" in result.stderr
    assert "does the source use multifd with 4 channels?" in result.stderr


@pytest.mark.parametrize("channels", CHANNELS)
def test_multifd_send_into_qemu_destination(
    make_vm: MakeVm, ram_image: MakeImage, channels: int
) -> None:
    source_file = ram_image(SIZE, seed=20 + channels)
    destination = make_vm(SIZE, name="dst", incoming=True)
    destination.configure(channels)
    uri = destination.listen()
    args = send_args(uri, {BLOCK_NAME: source_file}, channels=channels, peer="qemu-7.2")
    with MultifdProcess(args, timeout=TIMEOUT) as sender:
        result = sender.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    state = destination.wait_for_status("completed", TIMEOUT)
    assert state.status == "completed"
    assert ram_mismatch(source_file, destination.ram_path) is None
    assert destination.log() == ""  # e.g. no "Expected vmdescription section"


def test_multifd_send_uuid_mismatch_is_refused_by_qemu(
    make_vm: MakeVm, ram_image: MakeImage
) -> None:
    source_file = ram_image(SIZE, seed=30)
    destination = make_vm(SIZE, name="dst", incoming=True, uuid=OTHER_UUID)
    destination.configure(2)
    args = send_args(
        destination.listen(), {BLOCK_NAME: source_file}, channels=2, peer="qemu-7.2", uuid=UUID
    )
    with MultifdProcess(args, timeout=TIMEOUT) as sender:
        result = sender.wait(TIMEOUT)
    assert result.returncode != 0
    assert f"received uuid '{UUID}'" in destination.log()


@pytest.mark.parametrize("channels", [pytest.param(0, id="no-multifd"), 2, 4])
def test_qemu_to_qemu_harness_sanity(make_vm: MakeVm, ram_image: MakeImage, channels: int) -> None:
    source_file = ram_image(SIZE, seed=40 + channels)
    source = make_vm(SIZE, ram_file=source_file, name="src")
    destination = make_vm(SIZE, name="dst", incoming=True)
    source.configure(channels, max_bandwidth=FAST)
    destination.configure(channels)
    source.migrate(destination.listen())
    done = destination.wait_for_status("completed", TIMEOUT)
    sent = source.wait_for_status("completed", TIMEOUT).info["ram"]
    assert done.event_time is not None
    assert ram_mismatch(source_file, destination.ram_path) is None
    assert sent["duplicate"] == zero_page_count(source_file)
    assert sent["normal"] + sent["duplicate"] == SIZE // 4096
    assert (sent["multifd-bytes"] > 0) == (channels > 0)


def test_qemu_to_qemu_uuid_mismatch_is_reported(make_vm: MakeVm, ram_image: MakeImage) -> None:
    source_file = ram_image(SIZE, seed=50)
    source = make_vm(SIZE, ram_file=source_file, name="src", uuid=UUID)
    destination = make_vm(SIZE, name="dst", incoming=True, uuid=OTHER_UUID)
    source.configure(2, max_bandwidth=FAST)
    destination.configure(2)
    source.migrate(destination.listen())
    with pytest.raises(QemuError, match=r"Broken pipe|Connection reset"):
        source.wait_for_status("completed", TIMEOUT)
    assert f"received uuid '{UUID}' and expected uuid '{OTHER_UUID}'" in destination.log()
