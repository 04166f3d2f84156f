"""multifd ``zlib`` compression (spec section 4.1): one deflate stream per channel.

Per packet the sender deflates each page with no flush and ends with ``Z_SYNC_FLUSH``, so
every payload ends on a byte boundary with the empty stored block ``00 00 ff ff`` and the
stream is never finished. The first payload of a channel starts with the zlib header.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Final

from multifd.compression.base import Poisoned, check_pages, scatter
from multifd.wire.constants import MULTIFD_FLAG_ZLIB, PAGE_SIZE

METHOD: Final = "zlib"
MIN_LEVEL: Final = 0
MAX_LEVEL: Final = 9
DEFAULT_LEVEL: Final = 1  # multifd-zlib-level default


class ZlibCompressor:
    """Deflate side of one channel (QEMU ``deflateInit(level)``: zlib wrapper, window 15)."""

    flag = MULTIFD_FLAG_ZLIB
    whole_packets = False  # deflate is fed page by page (see compress_parts)

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self._deflate = zlib.compressobj(level)  # owned by the channel's send thread

    def compress(self, pages: Sequence[memoryview | bytes]) -> bytes:
        return b"".join(self.compress_parts(pages))

    def compress_parts(self, pages: Sequence[memoryview | bytes]) -> list[bytes]:
        check_pages(pages)
        # Page by page, as QEMU feeds deflate: at level 0 the stored blocks follow the
        # input calls, so whole runs would give other (equally valid) bytes.
        parts = [
            self._deflate.compress(memoryview(run)[start : start + PAGE_SIZE])
            for run in pages
            for start in range(0, len(run), PAGE_SIZE)
        ]
        parts.append(self._deflate.flush(zlib.Z_SYNC_FLUSH))
        return [part for part in parts if part]


class ZlibDecompressor:
    """Inflate side of one channel; rejects a finished stream as QEMU does."""

    flag = MULTIFD_FLAG_ZLIB

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj()  # owned by the channel's receive thread
        self._poisoned = Poisoned(METHOD)

    def decompress_into(
        self, payload: bytes | memoryview, out: Sequence[memoryview], *, channel: str
    ) -> None:
        expected = self._poisoned.start_packet(payload, out, channel=channel)
        if not expected:
            return
        try:
            # One byte of slack tells "exactly right" from "too much" without ever
            # producing more than a packet's worth of output.
            data = self._inflate.decompress(payload, expected + 1)
        except zlib.error as exc:
            raise self._poisoned.fail(
                "payload", channel=channel, expected="a deflate stream", received=str(exc)
            ) from None
        if self._inflate.eof:
            raise self._poisoned.fail(
                "stream ended",
                channel=channel,
                expected="Z_SYNC_FLUSH packets",
                received="the end of the deflate stream (Z_FINISH)",
            )
        if len(data) != expected or self._inflate.unconsumed_tail:
            received = len(data) if len(data) <= expected else f"more than {expected}"
            raise self._poisoned.fail(
                "packet size", channel=channel, expected=expected, received=received
            )
        scatter(data, out)
