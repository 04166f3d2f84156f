"""The QEMU fixtures of ``tests/interop``, for the relay's interop tests."""

from __future__ import annotations

from tests.interop.conftest import make_vm, make_vm10, qemu10_binary, qemu_binary, ram_image

__all__ = ["make_vm", "make_vm10", "qemu10_binary", "qemu_binary", "ram_image"]
