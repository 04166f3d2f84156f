"""The sending side of a migration: main stream plus multifd channels.

Theory of operation. The source writes QEMU's main stream on the main channel and hands
non-zero pages (all pages in ``multifd`` zero-page mode) to the engine's ``Sender``, which
spreads them over N channel threads. Every round of pages ends with ``Sender.sync()`` (one
SYNC packet per channel, all written) followed by the marker the peer expects on the
main channel: ``RAM_SAVE_FLAG_EOS`` in per-section mode, ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` in
per-round mode (spec 6.3). Without multifd (``channels == 0``) every page travels on the
main channel as a PAGE or ZERO record.

The stream for a one-pass migration::

    header, configuration "none", [open return path]
    ram START: MEM_SIZE + blocks, [SYNC x N], [FLUSH], EOS, footer
    ram PART:  pages..., [SYNC x N], [FLUSH], EOS, footer
    [switchover-start]
    ram END:   EOS, footer
    timer FULL, globalstate FULL, EOF, vmdesc
    [the destination's SHUT, read back on the main socket]

A relay or a replay writes another machine's stream: it gives the configuration record
as the source sent it, the ``ram`` section's ids as the source announced them, and writes
the device state itself (:meth:`Source.forward`) instead of the ``-M none`` sections.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from multifd import transport
from multifd.address import Address
from multifd.engine.send import Sender, greet
from multifd.engine.trace import TraceHook, emit
from multifd.errors import MAIN, ChannelError, MigrationFailed, multifd_channel
from multifd.migration.pacing import Pacer
from multifd.migration.stats import ChannelStats
from multifd.ram import Ram, RamBlock, ReadAhead, zero_pages
from multifd.wire import return_path as rp
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

Pages = npt.NDArray[np.int64]  # page numbers of one block, ascending


@dataclass(frozen=True, slots=True)
class RamSection:
    """The ``ram`` section's header fields; a relay keeps those its source announced."""

    section_id: int = RAM_SECTION_ID
    instance_id: int = 0
    version_id: int = RAM_SECTION_VERSION


class MainChannel:
    """Buffered writer for the main migration stream over one socket."""

    def __init__(
        self, sock: socket.socket, *, trace: TraceHook | None, timeout: float | None = None
    ) -> None:
        self._sock = sock
        self._trace = trace
        self._timeout = timeout  # bounds each flush as a whole (write_buffers)
        self._pending: list[bytes | memoryview] = []
        self.bytes_sent = 0
        self.records = 0

    @property
    def sock(self) -> socket.socket:
        """The socket; the return path is read from it once every write is done."""
        return self._sock

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
            self.bytes_sent += transport.send_all(
                self._sock, pending, channel=MAIN, timeout=self._timeout
            )
            self.records += 1


class Source:
    """The sending end of one migration stream: main channel, multifd channels, passes.

    It writes what it is told (:meth:`setup`, :meth:`send_pass` as often as needed,
    :meth:`complete`); deciding which pages and when is the orchestrator's job
    (:mod:`multifd.migration.precopy`).

    Args:
        ram: the blocks to send; their content is read, never written.
        profile: the peer profile (sync mode, zero-page mode, switchover-start).
        channels: number of multifd channels; 0 sends every page on the main channel.
        uuid: 16 bytes carried in every multifd init packet.
        compression: ``none``, ``zlib`` or ``zstd`` (multifd only).
        level: compression level, or None for QEMU's default.
        trace: sees every packet and marker sent.
        progress: called after each chunk of pages is handed to the channels.
        configuration: the configuration record to send as is (a relay's source's);
            None sends machine type ``none``.
        ram_section: the ids of the ``ram`` section.
        device_state: whether :meth:`complete` writes the ``-M none`` device sections,
            EOF and the VM description; a relay forwards its source's instead.
        return_path: open QEMU's return path after the configuration; then
            :meth:`await_destination` waits for the destination's verdict.
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
        progress: Callable[[], None] | None = None,
        configuration: bytes | None = None,
        ram_section: RamSection = RamSection(),
        device_state: bool = True,
        return_path: bool = False,
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
        self.configuration = configuration or stream.configuration(MACHINE_TYPE)
        self.ram_section = ram_section
        self.device_state = device_state
        self.return_path = return_path
        self._sender: Sender | None = None
        self._readahead: ReadAhead | None = None  # maps the next chunk; started on first use
        self._main: MainChannel | None = None
        self._start = 0.0
        self._setup_ms = 0.0
        self._zero_records = 0
        self._main_pages = 0
        self._sent_pages = 0
        self._syncs = 0
        self._last_block: RamBlock | None = None  # for RAM_SAVE_FLAG_CONTINUE
        self._sockets: list[socket.socket] = []

    # -- connection -------------------------------------------------------------------------
    def open(self, address: Address, *, connect_timeout: float = 10.0) -> None:
        """Connect the main channel, then the multifd channels, and start the sender."""
        self._start = time.monotonic()
        main_sock = transport.connect(address, timeout=connect_timeout, channel=MAIN)
        self._sockets.append(main_sock)
        main_sock.settimeout(self.io_timeout)
        # QEMU 7.2 takes the first connection as the main channel: the multifd channels
        # are opened only once the main one is connected (spec 2.2). Each says which one
        # it is at once: QEMU reads that before it goes on to the next connection.
        for index in range(self.channels):
            sock = transport.connect(
                address, timeout=connect_timeout, channel=multifd_channel(index)
            )
            self._sockets.append(sock)
            greet(sock, index, self.uuid, timeout=self.io_timeout)
        self._main = MainChannel(main_sock, trace=self.trace, timeout=self.io_timeout)
        if self.channels:
            self._sender = Sender(
                self._sockets[1:],
                uuid=self.uuid,
                compression=self.compression,
                level=self.level,
                detect_zero_pages=self.profile.zero_pages is ZeroPageMode.MULTIFD,
                trace=self.trace,
                io_timeout=self.io_timeout,
                greeted=True,
            )
            self._sender.start()

    def close(self) -> None:
        """Stop the channel threads and close every socket; idempotent."""
        if self._readahead is not None:
            self._readahead.close()
        if self._sender is not None:
            self._sender.close()
        for sock in self._sockets:
            transport.close_quietly(sock)

    def abort(self, exc: BaseException) -> None:
        """Fail the channels with ``exc`` and wake whoever waits on them; never blocks.

        Safe from any thread, a channel thread or a trace hook included: the threads are
        joined later, by :meth:`close` on the migrating thread.
        """
        if self._sender is not None:
            self._sender.fail(exc, None)
        for sock in self._sockets:
            transport.shutdown_quietly(sock)

    # -- stream phases ----------------------------------------------------------------------
    def setup(self) -> None:
        """Header, configuration and the RAM block list, with the setup sync."""
        main = self._require_main()
        section = self.ram_section
        main.write(
            stream.file_header(),
            self.configuration,
            stream.open_return_path() if self.return_path else b"",
            stream.section_start(
                section.section_id, "ram", section.instance_id, section.version_id
            ),
            stream.ram_mem_size([(block.name, block.size) for block in self.ram]),
        )
        # The setup SYNC keeps destination channel threads away from RAM until the block
        # list has been loaded (spec 6.3).
        self._round_end(sync=True)
        main.write(stream.section_footer(section.section_id))
        main.flush()
        self._setup_ms = (time.monotonic() - self._start) * 1e3

    def send_pass(self, pages: Mapping[str, Pages], *, pace: Pacer | None = None) -> None:
        """One pass: a PART section with ``pages`` of each block, ending with a sync round."""
        main = self._require_main()
        main.write(stream.section_part(self.ram_section.section_id))
        self._send_all(pages, pace)
        self._round_end(sync=True)
        main.write(stream.section_footer(self.ram_section.section_id))
        main.flush()

    def complete(self, pages: Mapping[str, Pages]) -> None:
        """The last pages in the END section; then, with ``device_state``, the device
        sections, EOF and the description."""
        main = self._require_main()
        if self.profile.switchover_start:
            main.write(stream.switchover_start())
        main.write(stream.section_end(self.ram_section.section_id))
        self._send_all(pages, None)
        self._round_end(sync=True)
        main.write(stream.section_footer(self.ram_section.section_id))
        if self.device_state:
            main.write(
                stream.timer_section(TIMER_SECTION_ID),
                stream.globalstate_section(GLOBALSTATE_SECTION_ID, "running"),
                stream.eof(),
                stream.vmdescription(_vmdesc()),
            )
        main.flush()

    def await_destination(self) -> None:
        """With the return path, wait for the destination's SHUT after the last write.

        Waits at most ``io_timeout``; PONG and SWITCHOVER_ACK messages before the SHUT are
        skipped. Without the return path it returns at once: nothing can be known.

        Raises:
            MigrationFailed: the SHUT carries a failure status.
            ChannelError: the destination closed the connection without a SHUT, or sent
                none in time (naming ``main (return path)``).
            ProtocolError: the destination sent something else.
        """
        if not self.return_path:
            return
        sock = self._require_main().sock
        # Half-close: a destination that reads the stream to its end (a relay) sees it,
        # and the SHUT still comes back the other way. A TCP one even under TLS: sending
        # close_notify makes OpenSSL wait for the peer's and drop a SHUT already in flight.
        with contextlib.suppress(OSError):  # the destination reset already: read says why
            socket.socket.shutdown(sock, socket.SHUT_WR)
        status = _read_shut(sock, self.io_timeout)
        if status != 0:
            raise MigrationFailed(
                f"the destination failed the migration (SHUT status {status})",
                channel=rp.RETURN_PATH,
            )
        log.info("the destination completed the migration (SHUT status 0)")

    def forward(self, *chunks: bytes | memoryview) -> None:
        """Write stream bytes made elsewhere (a relay's passed-through records) now."""
        main = self._require_main()
        main.write(*chunks)
        main.flush()

    def _round_end(self, *, sync: bool) -> None:
        """Close a round: a SYNC on every channel and the peer's marker, then EOS."""
        main = self._require_main()
        per_section = self.profile.sync_mode is SyncMode.PER_SECTION
        if self._sender is None or not sync:
            main.write(stream.ram_eos())
            return
        main.flush()
        self._sender.sync()
        self._syncs += 1
        if per_section:
            main.marker(stream.ram_eos(), "EOS")
        else:
            main.marker(stream.ram_multifd_flush(), "MULTIFD_FLUSH")
            main.write(stream.ram_eos())

    # -- pages ------------------------------------------------------------------------------
    def _send_all(self, pages: Mapping[str, Pages], pace: Pacer | None) -> None:
        for block in self.ram:
            chosen = pages.get(block.name)
            if chosen is None or not len(chosen):
                continue
            step = pace.chunk_pages if pace is not None else _CHUNK_PAGES
            self._read_ahead(block, chosen[:step])
            for first in range(0, len(chosen), step):
                chunk = chosen[first : first + step]
                self._read_ahead(block, chosen[first + step : first + 2 * step])
                if pace is not None:
                    pace.wait(len(chunk) * PAGE_SIZE)
                self._send_pages(block, chunk)
                if self.progress is not None:
                    self.progress()

    def _send_pages(self, block: RamBlock, pages: Pages) -> None:
        """Send the pages numbered ``pages`` (ascending) of ``block``, zero pages as the
        profile says."""
        first, count = int(pages[0]), len(pages)
        contiguous = int(pages[-1]) - first == count - 1
        if self._sender is not None and self.profile.zero_pages is ZeroPageMode.MULTIFD:
            self._sender.send_pages(block, pages * PAGE_SIZE)
            self._sent_pages += count
            return
        zero = block.zero_page_mask(first, count) if contiguous else zero_pages(block.words[pages])
        self._write_zero_records(block, pages[zero])
        normal = pages[~zero]
        if self._sender is not None:
            if len(normal):
                self._sender.send_pages(block, normal * PAGE_SIZE)
        else:
            self._write_page_records(block, normal)
        self._sent_pages += count

    def _read_ahead(self, block: RamBlock, pages: Pages) -> None:
        """Have the pages of the next chunk mapped while this one is scanned and sent."""
        if not len(pages) or int(pages[-1]) - int(pages[0]) >= 2 * len(pages):
            return  # nothing, or too sparse for one range to be worth mapping
        if self._readahead is None:
            self._readahead = ReadAhead(name="send-read-ahead")
        self._readahead.ahead(block, int(pages[0]), int(pages[-1]) - int(pages[0]) + 1)

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
    def channel_stats(self) -> tuple[ChannelStats, ...]:
        """The main channel's traffic, then each multifd channel's."""
        main = ChannelStats(
            MAIN,
            packets=self._main.records if self._main is not None else 0,
            pages=self._main_pages,
            zero_pages=self._zero_records,
            bytes=self._main.bytes_sent if self._main is not None else 0,
        )
        engine = self._sender.stats() if self._sender is not None else ()
        return (main, *engine)

    @property
    def setup_ms(self) -> float:
        return self._setup_ms

    @property
    def syncs(self) -> int:
        return self._syncs


def _read_shut(sock: socket.socket, timeout: float) -> int:
    """The status of the destination's SHUT, read from ``sock`` within ``timeout`` s."""
    decoder = rp.ReturnPathDecoder()
    deadline = time.monotonic() + timeout
    while True:
        for message in decoder.messages():
            if isinstance(message, rp.Shut):
                return message.status
            log.info("return path: %s", message)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChannelError(
                f"no SHUT from the destination within {timeout:g} s", channel=rp.RETURN_PATH
            )
        try:
            sock.settimeout(remaining)
            data = sock.recv(64)
        except TimeoutError:
            continue  # the deadline check above reports it
        except OSError as exc:
            raise ChannelError(
                f"receive failed: {transport.os_reason(exc)}", channel=rp.RETURN_PATH
            ) from exc
        if not data:
            decoder.close()  # a SHUT cut short is a protocol error
            raise ChannelError(
                "the destination closed the connection without a SHUT: it failed, or it "
                "does not answer the return path",
                channel=rp.RETURN_PATH,
            )
        decoder.feed(data)


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
