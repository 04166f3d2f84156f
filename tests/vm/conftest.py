"""Fixtures for the tests that migrate a real guest (``scripts/guest.sh``) between QEMUs.

The QEMU fixtures are those of ``tests/interop`` (QEMU 7.2 from the system, QEMU 10.0 from
``scripts/qemu10.sh``). ``guest_kernel`` runs ``scripts/guest.sh``, a no-op once the guest
is built in ``$GUEST_DIR`` (default ``<repo>/.cache/guest``); when it cannot be built (no
network on a first run) the tests skip, unless ``MULTIFD_REQUIRE_QEMU=1``, where they fail.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.interop.conftest import REQUIRE_ENV, qemu10_binary, qemu_binary
from tests.vm.guest import Guest, GuestKernel

__all__ = ["guest_kernel", "make_guest", "qemu10_binary", "qemu_binary"]

GUEST_DIR_ENV = "GUEST_DIR"
_REPO = Path(__file__).resolve().parents[2]

MakeGuest = Callable[..., Guest]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots and migrates a real guest kernel under QEMU")


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    """The kernel and initramfs of ``scripts/guest.sh``, built on first use."""
    out = Path(os.environ.get(GUEST_DIR_ENV) or _REPO / ".cache" / "guest")
    try:
        return GuestKernel.build(out)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"scripts/guest.sh did not run: {exc}")
    except RuntimeError as exc:
        _unavailable(str(exc))


@pytest.fixture
def make_guest(guest_kernel: GuestKernel, tmp_path: Path) -> Iterator[MakeGuest]:
    """Factory: ``make_guest(binary, name=..., incoming=...)`` starts a :class:`Guest`.

    Every guest is killed at teardown; its console is kept in ``tmp_path/<name>.console``.
    """
    with contextlib.ExitStack() as stack:

        def make(binary: str, *, name: str = "guest", **options: Any) -> Guest:
            options.setdefault("console_log", tmp_path / f"{name}.console")
            options.setdefault("scratch_parent", tmp_path)
            return stack.enter_context(Guest(binary, guest_kernel, name=name, **options))

        yield make
