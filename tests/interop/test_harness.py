"""The QEMU harness itself: it must clean up and notice a dead QEMU, or interop tests lie."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.qemu import BLOCK_NAME, QemuError, QemuVm, free_port, write_ram_image

pytestmark = pytest.mark.interop

SIZE = 16 << 20


def _fail_inside(vm: QemuVm) -> None:
    with vm:
        assert vm.execute("query-status")["status"] == "running"
        raise RuntimeError("boom")


def test_context_exit_kills_qemu_and_removes_scratch(qemu_binary: str, tmp_path: Path) -> None:
    vm = QemuVm(SIZE, name="doomed", binary=qemu_binary, scratch_parent=tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        _fail_inside(vm)
    assert vm.returncode is not None
    assert not vm.ram_path.exists()
    assert list(tmp_path.iterdir()) == []


def test_guest_ram_is_the_backing_file(make_vm: Callable[..., QemuVm], tmp_path: Path) -> None:
    image = tmp_path / "ram"
    write_ram_image(image, SIZE, seed=3)
    vm = make_vm(SIZE, ram_file=image)
    # pmemsave would need a CPU; the RAMBlock table shows the file is the whole guest RAM.
    table = vm.hmp("info ramblock")
    assert BLOCK_NAME in table
    assert f"{SIZE:#018x}" in table


def test_dead_qemu_ends_a_wait_at_once(make_vm: Callable[..., QemuVm]) -> None:
    destination = make_vm(SIZE, name="dst", incoming=True)
    destination.configure(2)
    destination.listen()
    os.kill(destination.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(QemuError, match="exited -9"):
        destination.wait_for_status("completed", 60)
    assert time.monotonic() - started < 10


def test_start_failure_reports_qemu_log(qemu_binary: str, tmp_path: Path) -> None:
    vm = QemuVm(SIZE, binary=qemu_binary, uuid="not-a-uuid", scratch_parent=tmp_path)
    with pytest.raises(QemuError, match="uuid"):
        vm.start()
    assert vm.returncode is not None


def test_quit_ends_qemu_cleanly(make_vm: Callable[..., QemuVm]) -> None:
    vm = make_vm(SIZE)
    assert vm.quit() == 0
    with pytest.raises(QemuError, match="exited 0"):
        vm.query_migrate()


def test_missing_binary_is_a_qemu_error(tmp_path: Path) -> None:
    vm = QemuVm(SIZE, binary=str(tmp_path / "no-such-qemu"), scratch_parent=tmp_path)
    with pytest.raises(QemuError, match="cannot run"):
        vm.start()
    assert list(tmp_path.iterdir()) == []


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)) as server:
        assert server.getsockname()[1] == port
