"""The sending side of a migration: main stream plus multifd channels.

Theory of operation. The source writes QEMU's main stream on the main channel and hands
non-zero pages (all pages in ``multifd`` zero-page mode) to the engine's ``Sender``, which
spreads them over N channel threads. Every round of pages ends with ``Sender.sync()`` (one
SYNC packet per channel, all written) followed by the marker the peer expects on the
main channel: ``RAM_SAVE_FLAG_EOS`` in per-section mode, ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` in
per-round mode (spec 6.3). Without multifd (``channels == 0``) every page travels on the
main channel as a PAGE or ZERO record.

The stream for a one-pass migration::

    header, configuration "none",
    ram START: MEM_SIZE + blocks, [SYNC x N], [FLUSH], EOS, footer
    ram PART:  pages..., [SYNC x N], [FLUSH], EOS, footer
    [switchover-start]
    ram END:   EOS, footer
    timer FULL, globalstate FULL, EOF, vmdesc
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from multifd import transport
from multifd.engine.send import Sender
from multifd.engine.trace import TraceHook, emit
from multifd.errors import MAIN, MigrationFailed, MultifdError, multifd_channel
from multifd.migration.stats import ChannelStats, MigrationStats, Status
from multifd.ram import Ram, RamBlock
from multifd.wire import stream
from multifd.wire.compat import PeerProfile, SyncMode, ZeroPageMode
from multifd.wire.constants import (
    GLOBALSTATE_SECTION_VERSION,
    PAGE_SIZE,
    PAGES_PER_PACKET,
    RAM_SECTION_VERSION,
)

log = logging.getLogger("multifd.source")

# Section ids as QEMU 7.2 numbers them for ``-M none``: the destination keys on idstr, but
# keeping QEMU's ids makes our streams diff cleanly against captures.
TIMER_SECTION_ID: Final = 0
RAM_SECTION_ID: Final = 2
GLOBALSTATE_SECTION_ID: Final = 4
MACHINE_TYPE: Final = "none"
# Pages handed to the engine per call: large enough to amortise Python overhead, small
# enough that progress reports stay fresh.
_CHUNK_PAGES: Final = 64 * PAGES_PER_PACKET
_IOV_MAX: Final = 512

ProgressHook = Callable[[MigrationStats], None]


class MainChannel:
    """Buffered writer for the main migration stream over one socket."""

    def __init__(self, sock: socket.socket, *, trace: TraceHook | None) -> None:
        self._sock = sock
        self._trace = trace
        self._pending: list[bytes | memoryview] = []
        self.bytes_sent = 0
        self.records = 0

    def write(self, *chunks: bytes | memoryview) -> None:
        self._pending.extend(chunks)
        if len(self._pending) >= _IOV_MAX:
            self.flush()

    def marker(self, record: bytes, name: str) -> None:
        """Write a sync marker now and tell the trace hook, after the bytes left."""
        self.write(record)
        self.flush()
        if self._trace is not None:
            emit(self._trace, "send", MAIN, record=name)

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self.bytes_sent += transport.send_all(self._sock, pending, channel=MAIN)
            self.records += 1


class Source:
    """One migration of static RAM blocks to a destination.

    Args:
        ram: the blocks to send; their content is read, never written.
        profile: the peer profile (sync mode, zero-page mode, switchover-start).
        channels: number of multifd channels; 0 sends every page on the main channel.
        uuid: 16 bytes carried in every multifd init packet.
        compression: ``none``, ``zlib`` or ``zstd`` (multifd only).
        level: compression level, or None for QEMU's default.
        trace: sees every packet and marker sent.
        progress: called with a snapshot after each chunk of pages.
    """

    def __init__(
        self,
        ram: Ram,
        profile: PeerProfile,
        *,
        channels: int = 2,
        uuid: bytes = bytes(16),
        compression: str = "none",
        level: int | None = None,
        io_timeout: float = 30.0,
        trace: TraceHook | None = None,
        progress: ProgressHook | None = None,
    ) -> None:
        self.ram = ram
        self.profile = profile
        self.channels = channels
        self.uuid = uuid
        self.compression = compression
        self.level = level
        self.io_timeout = io_timeout
        self.trace = trace
        self.progress = progress
        self._sender: Sender | None = None
        self._main: MainChannel | None = None
        self._start = 0.0
        self._setup_ms = 0.0
        self._zero_records = 0
        self._main_pages = 0
        self._sent_pages = 0
        self._syncs = 0
        self._last_block: RamBlock | None = None  # for RAM_SAVE_FLAG_CONTINUE
        self.status = Status.NONE

    # -- the whole migration ----------------------------------------------------------------
    def migrate(
        self, address: transport.Address, *, connect_timeout: float = 10.0
    ) -> MigrationStats:
        """Connect, send every page once, complete the stream; return the final statistics."""
        self._start = time.monotonic()
        self.status = Status.SETUP
        sockets: list[socket.socket] = []
        try:
            main_sock = transport.connect(address, timeout=connect_timeout, channel=MAIN)
            sockets.append(main_sock)
            main_sock.settimeout(self.io_timeout)
            # QEMU 7.2 takes the first connection as the main channel: the multifd channels
            # are opened only once the main one is connected (spec 2.2).
            for index in range(self.channels):
                sock = transport.connect(
                    address, timeout=connect_timeout, channel=multifd_channel(index)
                )
                sockets.append(sock)
            self._run(main_sock, sockets[1:])
        except MigrationFailed:
            self.status = Status.FAILED
            raise
        except MultifdError as exc:
            self.status = Status.FAILED
            raise _failed(exc) from exc
        finally:
            for sock in sockets:
                transport.close_quietly(sock)
        self.status = Status.COMPLETED
        return self.stats()

    def _run(self, main_sock: socket.socket, channel_socks: Sequence[socket.socket]) -> None:
        self._main = MainChannel(main_sock, trace=self.trace)
        if channel_socks:
            self._sender = Sender(
                channel_socks,
                uuid=self.uuid,
                compression=self.compression,
                level=self.level,
                detect_zero_pages=self.profile.zero_pages is ZeroPageMode.MULTIFD,
                trace=self.trace,
                io_timeout=self.io_timeout,
            )
            self._sender.start()
        try:
            self._setup()
            self._setup_ms = (time.monotonic() - self._start) * 1e3
            self.status = Status.ACTIVE
            self._iterate(list(self.ram))
            self.status = Status.DEVICE
            self._complete()
        finally:
            if self._sender is not None:
                self._sender.close()

    # -- stream phases ----------------------------------------------------------------------
    def _setup(self) -> None:
        main = self._require_main()
        main.write(
            stream.file_header(),
            stream.configuration(MACHINE_TYPE),
            stream.section_start(RAM_SECTION_ID, "ram", 0, RAM_SECTION_VERSION),
            stream.ram_mem_size([(block.name, block.size) for block in self.ram]),
        )
        # The setup SYNC keeps destination channel threads away from RAM until the block
        # list has been loaded (spec 6.3).
        self._round_end(section_end=True)
        main.write(stream.section_footer(RAM_SECTION_ID))
        main.flush()

    def _iterate(self, blocks: list[RamBlock]) -> None:
        main = self._require_main()
        main.write(stream.section_part(RAM_SECTION_ID))
        for block in blocks:
            self._send_block(block)
        self._round_end(section_end=True, pass_end=True)
        main.write(stream.section_footer(RAM_SECTION_ID))
        main.flush()

    def _complete(self) -> None:
        main = self._require_main()
        if self.profile.switchover_start:
            main.write(stream.switchover_start())
        main.write(stream.section_end(RAM_SECTION_ID))
        self._round_end(section_end=True)
        main.write(
            stream.section_footer(RAM_SECTION_ID),
            stream.timer_section(TIMER_SECTION_ID),
            stream.globalstate_section(GLOBALSTATE_SECTION_ID, "running"),
            stream.eof(),
            stream.vmdescription(_vmdesc()),
        )
        main.flush()

    def _round_end(self, *, section_end: bool, pass_end: bool = False) -> None:
        """Close a round: sync the channels where the profile wants it, then write EOS."""
        main = self._require_main()
        per_section = self.profile.sync_mode is SyncMode.PER_SECTION
        setup = self.status is Status.SETUP
        if self._sender is not None and (per_section or setup or pass_end):
            main.flush()
            self._sender.sync()
            self._syncs += 1
            if not per_section:
                main.marker(stream.ram_multifd_flush(), "MULTIFD_FLUSH")
        if section_end:
            if per_section and self._sender is not None:
                main.marker(stream.ram_eos(), "EOS")
            else:
                main.write(stream.ram_eos())

    # -- pages ------------------------------------------------------------------------------
    def _send_block(self, block: RamBlock) -> None:
        for first in range(0, block.page_count, _CHUNK_PAGES):
            count = min(_CHUNK_PAGES, block.page_count - first)
            pages = np.arange(first, first + count, dtype=np.int64)
            block.populate(first, count)
            self._send_pages(block, pages)
            if self.progress is not None:
                self.progress(self.stats())

    def _send_pages(self, block: RamBlock, pages: npt.NDArray[np.int64]) -> None:
        """Send the pages numbered ``pages`` of ``block``: zero pages as the profile says."""
        if self._sender is not None and self.profile.zero_pages is ZeroPageMode.MULTIFD:
            self._sender.send_pages(block, pages * PAGE_SIZE)
            self._sent_pages += len(pages)
            return
        zero = block.zero_page_mask(int(pages[0]), len(pages))
        self._write_zero_records(block, pages[zero])
        normal = pages[~zero]
        if self._sender is not None:
            if len(normal):
                self._sender.send_pages(block, normal * PAGE_SIZE)
        else:
            self._write_page_records(block, normal)
        self._sent_pages += len(pages)

    def _write_zero_records(self, block: RamBlock, pages: npt.NDArray[np.int64]) -> None:
        main = self._require_main()
        for offset in _offsets(pages):
            main.write(stream.ram_zero(offset, self._block_name(block)))
            self._zero_records += 1

    def _write_page_records(self, block: RamBlock, pages: npt.NDArray[np.int64]) -> None:
        main = self._require_main()
        for offset in _offsets(pages):
            main.write(
                stream.ram_page_header(offset, self._block_name(block)),
                block.page_view(offset),
            )
            self._main_pages += 1

    def _block_name(self, block: RamBlock) -> str | None:
        """The idstr to write, or None for RAM_SAVE_FLAG_CONTINUE after the first record."""
        if self._last_block is block:
            return None
        self._last_block = block
        return block.name

    def _require_main(self) -> MainChannel:
        assert self._main is not None, "main channel used before connect"
        return self._main

    # -- statistics -------------------------------------------------------------------------
    def stats(self) -> MigrationStats:
        elapsed = (time.monotonic() - self._start) * 1e3 if self._start else 0.0
        main = ChannelStats(
            MAIN,
            packets=self._main.records if self._main is not None else 0,
            pages=self._main_pages,
            zero_pages=self._zero_records,
            bytes=self._main.bytes_sent if self._main is not None else 0,
        )
        engine = self._sender.stats() if self._sender is not None else ()
        total = self.ram.total_size
        return MigrationStats(
            status=self.status,
            total_time_ms=elapsed,
            setup_time_ms=self._setup_ms,
            total=total,
            remaining=max(0, total - self._sent_pages * PAGE_SIZE),
            dirty_sync_count=self._syncs,
            channels=(main, *engine),
        )


def _offsets(pages: npt.NDArray[np.int64]) -> Iterator[int]:
    return iter((pages * PAGE_SIZE).tolist())


def _vmdesc() -> bytes:
    """The JSON description QEMU appends after EOF; its destination reads and drops it."""
    devices = [
        {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": []},
        {
            "name": "globalstate",
            "instance_id": 0,
            "vmsd_name": "globalstate",
            "version": GLOBALSTATE_SECTION_VERSION,
            "fields": [],
        },
    ]
    return json.dumps({"page_size": PAGE_SIZE, "devices": devices}).encode()


def _failed(exc: MultifdError) -> MigrationFailed:
    """Wrap a root cause; its text already names the channel."""
    failed = MigrationFailed(str(exc))
    channel = getattr(exc, "channel", None)
    failed.channel = channel if isinstance(channel, str) else None
    return failed
