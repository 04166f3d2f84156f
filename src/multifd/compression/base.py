"""What every multifd compression method provides, and helpers they share.

A method is a pair of stateful objects, one per channel and per direction, that live for
the whole migration: QEMU never resets its deflate/zstd streams between packets (spec
section 4), so a packet can only be decompressed by the object that decompressed every
earlier packet of the same channel. Each object belongs to one channel thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from multifd.errors import ProtocolError
from multifd.wire.constants import MAX_COMPRESSED_PAYLOAD, PAGE_SIZE


class Compressor(Protocol):
    """The sending half of a method, for one channel.

    Attributes:
        flag: the method's value in the packet ``flags`` field (``MULTIFD_FLAG_*``).
        whole_packets: the method makes one library call per buffer, so a sender should
            hand it a packet's pages as one buffer, gathering scattered pages first (each
            call leaves and retakes the GIL). False: it feeds the library page by page
            whatever it is given, and a gather would only add a copy.
    """

    flag: int
    whole_packets: bool

    def compress(self, pages: Sequence[memoryview | bytes]) -> bytes:
        """One packet's payload: every page fed in order, the last with a sync flush.

        ``pages`` holds single pages or runs of contiguous pages. The stream is never
        ended, so the next packet continues it.

        Raises:
            ValueError: ``pages`` is empty or a buffer is not whole ``PAGE_SIZE`` pages.
        """
        ...

    def compress_parts(self, pages: Sequence[memoryview | bytes]) -> Sequence[memoryview | bytes]:
        """:meth:`compress`'s payload as the pieces the library returned, none empty.

        A sender hands them to ``sendmsg`` as they are: joining them first would copy the
        whole payload once more. A piece may be a view of memory the compressor reuses:
        it is valid until the compressor's next call.
        """
        ...


class Decompressor(Protocol):
    """The receiving half of a method, for one channel.

    Attributes:
        flag: the method's value in the packet ``flags`` field (``MULTIFD_FLAG_*``).
    """

    flag: int

    def decompress_into(
        self, payload: bytes | memoryview, out: Sequence[memoryview], *, channel: str
    ) -> None:
        """Decompress one packet's payload into its pages: the views of ``out`` in turn,
        each one page or a run of contiguous pages (the packet's order).

        The payload must produce exactly as many bytes as ``out`` holds; output is
        bounded by that size whatever the payload claims (no decompression bombs).

        Raises:
            ProtocolError: the payload is corrupt, too short or too long, or an earlier
                payload on this channel was.
            ValueError: an ``out`` view is not whole writable pages.
        """
        ...


def check_pages(pages: Sequence[memoryview | bytes]) -> None:
    """Reject what no packet may carry: no pages, or a buffer that is not whole pages.

    Each buffer is one page or a run of contiguous pages, in the packet's order.
    """
    if not pages:
        raise ValueError("a compressed packet needs at least one page")
    for page in pages:
        if not len(page) or len(page) % PAGE_SIZE:
            raise ValueError(f"page data must be whole {PAGE_SIZE}-byte pages, got {len(page)}")


def check_out(out: Sequence[memoryview]) -> int:
    """Reject output views that are not whole writable pages; the bytes they hold."""
    total = 0
    for view in out:
        if view.readonly or not view.nbytes or view.nbytes % PAGE_SIZE:
            raise ValueError(f"each output view must be whole writable {PAGE_SIZE}-byte pages")
        total += view.nbytes
    return total


def check_payload(payload: bytes | memoryview, pages: int, method: str, *, channel: str) -> None:
    """Reject a payload no QEMU would send: too large, or data for a packet without pages."""
    if len(payload) > MAX_COMPRESSED_PAYLOAD:
        raise ProtocolError(
            f"{method} payload size",
            channel=channel,
            expected=f"<= {MAX_COMPRESSED_PAYLOAD}",
            received=len(payload),
        )
    if not pages and payload:
        raise ProtocolError(
            f"{method} payload for a packet without pages",
            channel=channel,
            expected=0,
            received=len(payload),
        )


def scatter(data: bytes | memoryview, out: Sequence[memoryview]) -> None:
    """Copy ``data`` into the output views in turn (as many bytes as they hold)."""
    with memoryview(data) as view:
        at = 0
        for run in out:
            end = at + run.nbytes
            run[:] = view[at:end]
            at = end


class Poisoned:
    """Remembers the first error of a decompression stream, which it cannot recover from."""

    def __init__(self, method: str) -> None:
        self._method = method
        self._error: ProtocolError | None = None

    def start_packet(
        self, payload: bytes | memoryview, out: Sequence[memoryview], *, channel: str
    ) -> int:
        """Check one packet before it is inflated; the bytes it must produce (0: none)."""
        self.check(channel)
        expected = check_out(out)
        check_payload(payload, expected // PAGE_SIZE, self._method, channel=channel)
        return expected

    def check(self, channel: str) -> None:
        """Raise if an earlier payload broke the stream."""
        if self._error is not None:
            raise ProtocolError(
                f"{self._method} stream unusable after an earlier error",
                channel=channel,
                expected="a healthy stream",
                received=self._error.what,
            ) from self._error

    def fail(self, what: str, *, channel: str, expected: object, received: object) -> ProtocolError:
        """Record and return the error that breaks the stream (the caller raises it)."""
        self._error = ProtocolError(
            f"{self._method} {what}", channel=channel, expected=expected, received=received
        )
        return self._error
