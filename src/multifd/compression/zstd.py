"""multifd ``zstd`` compression (spec section 4.2): one zstd frame per channel, never ended.

Per packet the sender compresses each page with ``ZSTD_e_continue`` and ends with
``ZSTD_e_flush``, so each payload holds whole blocks of one endless frame; the first
payload of a channel starts with the frame header.

The receiver uses zstandard's stream writer rather than a decompression object: the writer
hands output to a sink in bounded chunks, so the sink can stop a payload that inflates
beyond its packet (a decompression bomb) after at most one chunk, and can copy the output
straight into the destination pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, Final, cast

import zstandard

from multifd.compression.base import Poisoned, check_pages
from multifd.errors import ProtocolError
from multifd.wire.constants import MULTIFD_FLAG_ZSTD, PAGE_SIZE, PAGES_PER_PACKET

METHOD: Final = "zstd"
MIN_LEVEL: Final = 0  # 0 means libzstd's default level (3), in QEMU and in zstandard
MAX_LEVEL: Final = 20
DEFAULT_LEVEL: Final = 1  # multifd-zstd-level default

# Output chunk of the stream writer. Larger than a whole packet plus one zstd block, so a
# packet's output always comes out within one write() call: a chunk that fills up before
# the input is consumed could leave decoded bytes inside libzstd until the next packet.
_WRITE_SIZE: Final = PAGES_PER_PACKET * PAGE_SIZE + (128 << 10) + PAGE_SIZE


class ZstdCompressor:
    """Compression side of one channel (QEMU ``ZSTD_initCStream(level)``)."""

    flag = MULTIFD_FLAG_ZSTD

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        # owned by the channel's send thread
        self._cctx = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, pages: Sequence[memoryview | bytes]) -> bytes:
        return b"".join(self.compress_parts(pages))

    def compress_parts(self, pages: Sequence[memoryview | bytes]) -> list[bytes]:
        check_pages(pages)
        # One call per run of pages: zstd's output does not depend on how the input is cut
        # (checked against page-by-page feeding at levels 0-19), and every call takes the GIL.
        parts = [self._cctx.compress(run) for run in pages]
        parts.append(self._cctx.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return [part for part in parts if part]


class _PacketOverflowError(Exception):
    """Raised by the sink to abort a payload that produces more than its packet holds."""


class _PageSink:
    """Receives decompressed chunks and copies them into the current packet's pages.

    The pages come as runs of contiguous pages: one copy per run a chunk covers, not one
    per page (a packet of 128 contiguous pages is one copy).
    """

    def __init__(self) -> None:
        self.runs: Sequence[memoryview] = ()
        self.size = 0  # bytes the runs hold
        self.written = 0
        self._run = 0  # the run the next byte goes to, and where in it
        self._at = 0

    def start(self, runs: Sequence[memoryview], size: int) -> None:
        self.runs, self.size = runs, size
        self.written = self._run = self._at = 0

    def finish(self) -> int:
        """Drop the views (so the caller may release its buffers); bytes written."""
        self.runs = ()
        return self.written

    def write(self, chunk: bytes) -> int:
        end = self.written + len(chunk)
        if end > self.size:
            raise _PacketOverflowError
        with memoryview(chunk) as source:
            used, run, at = 0, self._run, self._at
            while used < len(source):
                view = self.runs[run]
                count = min(view.nbytes - at, len(source) - used)
                view[at : at + count] = source[used : used + count]
                used += count
                at += count
                if at == view.nbytes:
                    run, at = run + 1, 0
            self._run, self._at = run, at
        self.written = end
        return len(chunk)


class ZstdDecompressor:
    """Decompression side of one channel (QEMU ``ZSTD_initDStream``)."""

    flag = MULTIFD_FLAG_ZSTD

    def __init__(self) -> None:
        # The sink and the writer are owned by the channel's receive thread.
        self._sink = _PageSink()
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            cast(IO[bytes], self._sink), write_size=_WRITE_SIZE, write_return_read=True
        )
        self._poisoned = Poisoned(METHOD)

    def decompress_into(
        self, payload: bytes | memoryview, out: Sequence[memoryview], *, channel: str
    ) -> None:
        expected = self._poisoned.start_packet(payload, out, channel=channel)
        if not expected:
            return
        self._sink.start(out, expected)
        try:
            self._writer.write(payload)
        except _PacketOverflowError:
            raise self._fail("packet size", channel, expected, f"more than {expected}") from None
        except zstandard.ZstdError as exc:
            raise self._fail("payload", channel, "a zstd stream", str(exc)) from None
        finally:
            written = self._sink.finish()
        if written != expected:
            raise self._fail("packet size", channel, expected, written)

    def _fail(self, what: str, channel: str, expected: object, received: object) -> ProtocolError:
        return self._poisoned.fail(what, channel=channel, expected=expected, received=received)
