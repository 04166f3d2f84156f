"""multifd ``zstd`` compression (spec section 4.2): one zstd frame per channel, never ended.

Per packet the sender compresses each page with ``ZSTD_e_continue`` and ends with
``ZSTD_e_flush``, so each payload holds whole blocks of one endless frame; the first
payload of a channel starts with the frame header.

Both sides call libzstd's streaming functions through the cffi binding that the zstandard
package ships (its ``backend_cffi``). Each call releases the GIL, and a thread that gives
it up for a few microseconds can wait milliseconds to get it back, so both sides make one
call per packet where they can:

- The sender compresses each buffer it is given (the sender hands a packet's pages as one
  buffer, gathered first when they are scattered: ``whole_packets``) straight into an
  output buffer of its own, reused by every packet. zstd's output does not depend on how
  the input is cut (checked against page-by-page feeding at levels 0-19). One call per
  run of pages instead, through zstandard's compression object, let two threads compress
  only 1.1-1.25x as fast as one; one call per packet, 1.8x.
- The receiver decompresses straight into the output views, one after the other; the
  receive threads always hand one view (scattered pages inflate into a buffer of the
  channel's, see engine/recv.py).

Without cffi both sides fall back to zstandard's objects: its compression object, and its
stream writer, which hands output in bounded chunks to a sink that copies it into the pages
(two more copies of every byte).

Either way a payload cannot inflate beyond its packet: output only goes into buffers of
the packet's size, so a decompression bomb stops at the first byte too many. And a frame
may not ask for a window larger than QEMU's highest level uses (:data:`MAX_WINDOW_LOG`):
the decoder keeps that much of the stream, and libzstd's own limit (128 MiB) would let a
hostile source make every channel's decoder hold 128 MiB.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import IO, Any, Final, cast

import zstandard

from multifd.compression.base import Poisoned, check_pages
from multifd.errors import ProtocolError
from multifd.wire.constants import MULTIFD_FLAG_ZSTD, PAGE_SIZE, PAGES_PER_PACKET

_cffi_backend: ModuleType | None
try:
    _cffi_backend = importlib.import_module("zstandard.backend_cffi")
except ImportError:  # cffi missing, or a zstandard built without its cffi backend
    _cffi_backend = None

METHOD: Final = "zstd"
MIN_LEVEL: Final = 0  # 0 means libzstd's default level (3), in QEMU and in zstandard
MAX_LEVEL: Final = 20
DEFAULT_LEVEL: Final = 1  # multifd-zstd-level default
# A stream's window is 2**MAX_WINDOW_LOG bytes at most: 32 MiB, what level 20 (QEMU's
# highest multifd-zstd-level) uses when the size is not known in advance, as in a stream.
MAX_WINDOW_LOG: Final = 25

# zstandard's cffi binding: ``ffi`` and ``lib`` (every ZSTD_* function of its libzstd).
_FFI: Final[Any] = getattr(_cffi_backend, "ffi", None)
_LIB: Final[Any] = getattr(_cffi_backend, "lib", None)
LIBZSTD_AVAILABLE: Final = _FFI is not None and _LIB is not None
"""Whether libzstd's streaming calls can be used directly (see the module docstring)."""

use_libzstd = LIBZSTD_AVAILABLE
"""Whether compressors and decompressors made from now on use them; the tests clear it to
cover the fallback."""

# Output chunk of the stream writer. Larger than a whole packet plus one zstd block, so a
# packet's output always comes out within one write() call: a chunk that fills up before
# the input is consumed could leave decoded bytes inside libzstd until the next packet.
_WRITE_SIZE: Final = PAGES_PER_PACKET * PAGE_SIZE + (128 << 10) + PAGE_SIZE


class ZstdCompressor:
    """Compression side of one channel (QEMU ``ZSTD_initCStream(level)``)."""

    flag = MULTIFD_FLAG_ZSTD
    whole_packets = True

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        # owned by the channel's send thread
        self._stream: _LibzstdCompress | _ObjectCompress = (
            _LibzstdCompress(level) if use_libzstd else _ObjectCompress(level)
        )

    def compress(self, pages: Sequence[memoryview | bytes]) -> bytes:
        return b"".join(self.compress_parts(pages))

    def compress_parts(self, pages: Sequence[memoryview | bytes]) -> list[memoryview | bytes]:
        check_pages(pages)
        return self._stream.compress(pages)


class ZstdDecompressor:
    """Decompression side of one channel (QEMU ``ZSTD_initDStream``)."""

    flag = MULTIFD_FLAG_ZSTD

    def __init__(self) -> None:
        # owned by the channel's receive thread
        self._stream: _LibzstdDecompress | _WriterDecompress = (
            _LibzstdDecompress() if use_libzstd else _WriterDecompress()
        )
        self._poisoned = Poisoned(METHOD)

    def decompress_into(
        self, payload: bytes | memoryview, out: Sequence[memoryview], *, channel: str
    ) -> None:
        expected = self._poisoned.start_packet(payload, out, channel=channel)
        if not expected:
            return
        try:
            written = self._stream.decompress(payload, out, expected)
        except _PacketOverflowError:
            raise self._fail("packet size", channel, expected, f"more than {expected}") from None
        except _CorruptStreamError as exc:
            raise self._fail("payload", channel, "a zstd stream", str(exc)) from None
        if written != expected:
            raise self._fail("packet size", channel, expected, written)

    def _fail(self, what: str, channel: str, expected: object, received: object) -> ProtocolError:
        return self._poisoned.fail(what, channel=channel, expected=expected, received=received)


class _PacketOverflowError(Exception):
    """A payload produces more than its packet holds."""


class _CorruptStreamError(Exception):
    """libzstd refused the payload; the message is its error name."""


# -- libzstd's streaming calls ----------------------------------------------------------------
def _checked(code: int) -> int:
    """``code`` unless it is one of libzstd's error codes."""
    if _LIB.ZSTD_isError(code):
        raise _CorruptStreamError(_FFI.string(_LIB.ZSTD_getErrorName(code)).decode())
    return code


def _owned(create: Any, free: Any) -> Any:
    """A new libzstd context from ``create``, freed with ``free`` when it is collected."""
    context = create()
    if context == _FFI.NULL:
        raise MemoryError(create.__name__)
    return _FFI.gc(context, free)


class _LibzstdCompress:
    """``ZSTD_compressStream2`` from each buffer in turn into one output buffer, reused by
    every packet: a payload is a view of it, valid until the next packet."""

    def __init__(self, level: int) -> None:
        self._cctx = _owned(_LIB.ZSTD_createCCtx, _LIB.ZSTD_freeCCtx)
        _checked(_LIB.ZSTD_CCtx_setParameter(self._cctx, _LIB.ZSTD_c_compressionLevel, level))
        self._out = _FFI.new("ZSTD_outBuffer *")
        self._in = _FFI.new("ZSTD_inBuffer *")
        self._room_for(PAGES_PER_PACKET * PAGE_SIZE)

    def _room_for(self, size: int) -> None:
        """An output buffer for ``size`` bytes of input: their bound, plus the flush's block
        header (and, in a channel's first payload, the frame header)."""
        room = _LIB.ZSTD_compressBound(size) + PAGE_SIZE
        self._memory = _FFI.new("char[]", room)  # owned by cffi: no buffer export to release
        self._view = memoryview(_FFI.buffer(self._memory))
        self._out.dst, self._out.size = self._memory, room

    def compress(self, pages: Sequence[memoryview | bytes]) -> list[memoryview | bytes]:
        size = sum(memoryview(run).nbytes for run in pages)
        if _LIB.ZSTD_compressBound(size) + PAGE_SIZE > self._out.size:
            self._room_for(size)  # more than a packet: only callers other than a sender
        out, source = self._out, self._in
        out.pos = 0
        last = len(pages) - 1
        for index, run in enumerate(pages):
            mode = _LIB.ZSTD_e_flush if index == last else _LIB.ZSTD_e_continue
            with _FFI.from_buffer(run) as data:
                source.src, source.size, source.pos = data, len(data), 0
                left = _checked(_LIB.ZSTD_compressStream2(self._cctx, out, source, mode))
            if source.pos != source.size or (mode == _LIB.ZSTD_e_flush and left):
                raise RuntimeError(f"zstd output outgrew its {out.size}-byte buffer")
        return [self._view[: out.pos]]


class _LibzstdDecompress:
    """``ZSTD_decompressStream`` into the output views in turn (see the module docstring)."""

    def __init__(self) -> None:
        self._dctx = _owned(_LIB.ZSTD_createDCtx, _LIB.ZSTD_freeDCtx)
        _checked(_LIB.ZSTD_DCtx_setParameter(self._dctx, _LIB.ZSTD_d_windowLogMax, MAX_WINDOW_LOG))
        self._in_pos = _FFI.new("size_t *")
        self._out_pos = _FFI.new("size_t *")
        self._probe = _FFI.new("char[1]")  # where a byte too many would go

    def decompress(self, payload: bytes | memoryview, out: Sequence[memoryview], total: int) -> int:
        """Fill ``out`` in turn from ``payload``; the bytes written (``total`` when right)."""
        self._in_pos[0] = 0
        written = 0
        # The buffers are released on the way out, even on error: a cdata left in a frame
        # that a traceback keeps can crash the collector when it breaks the cycle (a
        # memoryview cleared while still exported).
        with _FFI.from_buffer(payload) as source:
            for run in out:
                with _FFI.from_buffer(run, require_writable=True) as target:
                    filled = self._fill(target, run.nbytes, source, len(payload))
                written += filled
                if filled < run.nbytes:  # the payload is used up: too short
                    return written
            self._drain(source, len(payload))
        return written

    def _drain(self, source: Any, size: int) -> None:
        """Every page is full: what is left of the payload may still hold block headers,
        but not one more byte of output."""
        while True:
            self._out_pos[0] = 0
            before = self._in_pos[0]
            self._step(self._probe, 1, source, size)
            if self._out_pos[0]:
                raise _PacketOverflowError
            if self._in_pos[0] == before:
                return

    def _fill(self, target: Any, room: int, source: Any, size: int) -> int:
        """Decompress into ``target`` until it is full or the payload gives no more."""
        out_pos, in_pos = self._out_pos, self._in_pos
        out_pos[0] = 0
        while out_pos[0] < room:
            before = in_pos[0] + out_pos[0]
            self._step(target, room, source, size)
            if in_pos[0] + out_pos[0] == before:
                break
        return int(out_pos[0])

    def _step(self, target: Any, room: int, source: Any, size: int) -> None:
        _checked(
            _LIB.ZSTD_decompressStream_simpleArgs(
                self._dctx, target, room, self._out_pos, source, size, self._in_pos
            )
        )


# -- zstandard's stream objects (the fallback) ---------------------------------------------
class _ObjectCompress:
    """zstandard's compression object, one call per buffer (the fallback)."""

    def __init__(self, level: int) -> None:
        self._cctx = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, pages: Sequence[memoryview | bytes]) -> list[memoryview | bytes]:
        parts = [self._cctx.compress(run) for run in pages]
        parts.append(self._cctx.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return [part for part in parts if part]


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


class _WriterDecompress:
    """zstandard's stream writer: output comes to a :class:`_PageSink` in bounded chunks."""

    def __init__(self) -> None:
        self._sink = _PageSink()
        decoder = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG)
        self._writer = decoder.stream_writer(
            cast(IO[bytes], self._sink), write_size=_WRITE_SIZE, write_return_read=True
        )

    def decompress(self, payload: bytes | memoryview, out: Sequence[memoryview], total: int) -> int:
        self._sink.start(out, total)
        try:
            self._writer.write(payload)
        except zstandard.ZstdError as exc:
            raise _CorruptStreamError(str(exc)) from None
        finally:
            written = self._sink.finish()
        return written
