"""Fixtures for the tests that drive a real ``qemu-system-x86_64``.

Without QEMU these tests skip, unless ``MULTIFD_REQUIRE_QEMU=1`` (set by CI), where a
missing or wrong QEMU fails them instead: CI must never pass by skipping interop.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.interop.qemu import QEMU_BINARY, QemuVm, write_ram_image

REQUIRE_ENV = "MULTIFD_REQUIRE_QEMU"
WANTED_VERSION = (7, 2)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """Path of a QEMU 7.2.x ``qemu-system-x86_64``; skips (or fails under CI) otherwise."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        _unavailable(f"{QEMU_BINARY} is not installed")
    banner = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    found = re.search(r"version (\d+)\.(\d+)", banner)
    version = (int(found[1]), int(found[2])) if found else None
    if version != WANTED_VERSION:
        _unavailable(f"{path} is {banner.splitlines()[:1]}, these tests need QEMU 7.2")
    return path


@pytest.fixture
def make_vm(qemu_binary: str, tmp_path: Path) -> Iterator[Callable[..., QemuVm]]:
    """Factory of started :class:`QemuVm` objects; all are killed at teardown."""
    with contextlib.ExitStack() as stack:

        def make(size: int, **options: Any) -> QemuVm:
            options.setdefault("scratch_parent", tmp_path)
            return stack.enter_context(QemuVm(size, binary=qemu_binary, **options))

        yield make


@pytest.fixture
def ram_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``ram_image(size, seed=...)`` writes a mixed RAM image and returns its path."""

    def make(size: int, *, seed: int = 0, pattern: str = "mixed") -> Path:
        path = tmp_path / f"source-{seed}.ram"
        write_ram_image(path, size, seed=seed, pattern=pattern)
        return path

    return make
