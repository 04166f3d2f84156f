"""Fixtures for the tests that drive a real ``qemu-system-x86_64``.

Two peers: the system's QEMU 7.2 (``qemu_binary``, ``make_vm``) and Debian 13's QEMU 10.0
unpacked by ``scripts/qemu10.sh`` into a private prefix (``qemu10_binary``, ``make_vm10``;
the prefix is ``$QEMU10_PREFIX``, by default ``<repo>/.cache/qemu10``, as for the script).
Without a peer its tests skip, unless ``MULTIFD_REQUIRE_QEMU=1`` (set by CI), where a
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
QEMU10_PREFIX_ENV = "QEMU10_PREFIX"
QEMU10_VERSION = (10, 0)
_REPO = Path(__file__).resolve().parents[2]


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1)")
    pytest.skip(reason)


def _checked_version(path: str, wanted: tuple[int, int]) -> str:
    banner = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    found = re.search(r"version (\d+)\.(\d+)", banner)
    version = (int(found[1]), int(found[2])) if found else None
    if version != wanted:
        release = ".".join(map(str, wanted))
        _unavailable(f"{path} is {banner.splitlines()[:1]}, these tests need QEMU {release}")
    return path


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """Path of a QEMU 7.2.x ``qemu-system-x86_64``; skips (or fails under CI) otherwise."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        _unavailable(f"{QEMU_BINARY} is not installed")
    return _checked_version(path, WANTED_VERSION)


@pytest.fixture(scope="session")
def qemu10_binary() -> str:
    """The QEMU 10.0.x wrapper of ``scripts/qemu10.sh``; skips (or fails under CI) otherwise."""
    prefix = Path(os.environ.get(QEMU10_PREFIX_ENV) or _REPO / ".cache" / "qemu10")
    wrapper = prefix / "bin" / QEMU_BINARY
    if not os.access(wrapper, os.X_OK):
        _unavailable(f"no QEMU 10 at {wrapper} (run scripts/qemu10.sh)")
    return _checked_version(str(wrapper), QEMU10_VERSION)


@contextlib.contextmanager
def _vm_factory(binary: str, scratch: Path) -> Iterator[Callable[..., QemuVm]]:
    with contextlib.ExitStack() as stack:

        def make(size: int, **options: Any) -> QemuVm:
            options.setdefault("scratch_parent", scratch)
            return stack.enter_context(QemuVm(size, binary=binary, **options))

        yield make


@pytest.fixture
def make_vm(qemu_binary: str, tmp_path: Path) -> Iterator[Callable[..., QemuVm]]:
    """Factory of started QEMU 7.2 :class:`QemuVm` objects; all are killed at teardown."""
    with _vm_factory(qemu_binary, tmp_path) as make:
        yield make


@pytest.fixture
def make_vm10(qemu10_binary: str, tmp_path: Path) -> Iterator[Callable[..., QemuVm]]:
    """Factory of started QEMU 10.0 :class:`QemuVm` objects; all are killed at teardown."""
    with _vm_factory(qemu10_binary, tmp_path) as make:
        yield make


@pytest.fixture
def ram_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``ram_image(size, seed=...)`` writes a mixed RAM image and returns its path."""

    def make(size: int, *, seed: int = 0, pattern: str = "mixed") -> Path:
        path = tmp_path / f"source-{seed}.ram"
        write_ram_image(path, size, seed=seed, pattern=pattern)
        return path

    return make
