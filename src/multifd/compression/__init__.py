"""multifd compression methods: registry by name and by wire flag (spec section 4).

Every channel gets its own :class:`Compressor` (sender) or :class:`Decompressor`
(receiver) for the whole migration. ``none`` has no object: its pages travel raw.

The method is not negotiated: both ends are configured with the same one, and a receiver
checks the method bits of every packet that carries pages against its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from multifd.compression import deflate, zstd
from multifd.compression.base import Compressor, Decompressor
from multifd.errors import UNIDENTIFIED, ConfigError, ProtocolError
from multifd.wire.constants import (
    MULTIFD_FLAG_NOCOMP,
    MULTIFD_FLAG_QATZIP,
    MULTIFD_FLAG_QPL,
    MULTIFD_FLAG_UADK,
)

__all__ = [
    "METHODS",
    "Compressor",
    "Decompressor",
    "compressor",
    "decompressor",
    "default_level",
    "describe_flag",
    "flag_of",
    "level_range",
    "method_of",
]


@dataclass(frozen=True, slots=True)
class _Method:
    flag: int
    levels: tuple[int, int] | None  # inclusive range of the multifd-<method>-level parameter
    default_level: int | None
    compressor: Callable[[int], Compressor] | None
    decompressor: Callable[[], Decompressor] | None


_REGISTRY: Final[dict[str, _Method]] = {
    "none": _Method(MULTIFD_FLAG_NOCOMP, None, None, None, None),
    deflate.METHOD: _Method(
        deflate.ZlibCompressor.flag,
        (deflate.MIN_LEVEL, deflate.MAX_LEVEL),
        deflate.DEFAULT_LEVEL,
        deflate.ZlibCompressor,
        deflate.ZlibDecompressor,
    ),
    zstd.METHOD: _Method(
        zstd.ZstdCompressor.flag,
        (zstd.MIN_LEVEL, zstd.MAX_LEVEL),
        zstd.DEFAULT_LEVEL,
        zstd.ZstdCompressor,
        zstd.ZstdDecompressor,
    ),
}
_BY_FLAG: Final = {method.flag: name for name, method in _REGISTRY.items()}
# Methods QEMU knows that have no implementation here (hardware accelerators).
_UNSUPPORTED_FLAGS: Final = {
    MULTIFD_FLAG_QPL: "qpl",
    MULTIFD_FLAG_UADK: "uadk",
    MULTIFD_FLAG_QATZIP: "qatzip",
}

METHODS: Final = tuple(_REGISTRY)


def _method(name: str) -> _Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown compression method {name!r} (known: {', '.join(METHODS)})"
        ) from None


def flag_of(method: str) -> int:
    """The ``MULTIFD_FLAG_*`` value of ``method``; raises :class:`ConfigError` if unknown."""
    return _method(method).flag


def method_of(flag: int, *, channel: str = UNIDENTIFIED) -> str:
    """The method name for the compression bits of a packet's ``flags``.

    Raises:
        ProtocolError: no supported method has that value.
    """
    try:
        return _BY_FLAG[flag]
    except KeyError:
        raise ProtocolError(
            "compression method",
            channel=channel,
            expected=" or ".join(METHODS),
            received=describe_flag(flag),
        ) from None


def describe_flag(flag: int) -> str:
    """The compression bits of a packet's ``flags`` for a message: ``0x2 (zlib)``."""
    name = _BY_FLAG.get(flag)
    if name is None:
        unsupported = _UNSUPPORTED_FLAGS.get(flag)
        name = "unknown" if unsupported is None else f"{unsupported}, not supported here"
    return f"{flag:#x} ({name})"


def level_range(method: str) -> tuple[int, int] | None:
    """Inclusive range of the method's level parameter; ``None`` for ``none``."""
    return _method(method).levels


def default_level(method: str) -> int | None:
    """QEMU's default level for ``method``; ``None`` for ``none``."""
    return _method(method).default_level


def compressor(method: str, level: int | None = None) -> Compressor | None:
    """A new per-channel compressor, or ``None`` for ``none`` (whose level is ignored).

    Args:
        method: one of :data:`METHODS`.
        level: zlib 0..9 or zstd 0..20 (0 is libzstd's default level, 3); ``None`` for
            QEMU's default, 1.

    Raises:
        ConfigError: unknown method or level out of range.
    """
    entry = _method(method)
    if entry.compressor is None or entry.levels is None:
        return None
    low, high = entry.levels
    chosen = entry.default_level if level is None else level
    if chosen is None or not low <= chosen <= high:
        raise ConfigError(f"{method} level must be {low}..{high}, got {level}")
    return entry.compressor(chosen)


def decompressor(method: str) -> Decompressor | None:
    """A new per-channel decompressor, or ``None`` for ``none``.

    Raises:
        ConfigError: unknown method.
    """
    factory = _method(method).decompressor
    return None if factory is None else factory()
