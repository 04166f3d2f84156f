"""The receiving side of a migration: accepts the channels and loads the main stream.

Theory of operation. The destination listens on one address. Connections arrive in any
order; each is classified by peeking at its first four bytes (``QEVM`` for the main channel,
the multifd magic for the others) and multifd channels are handed to the
:class:`~multifd.engine.recv.Receiver`, which reads their init packets and starts one thread
each. Once the main channel and all N multifd channels are there, the loader decodes the
main stream: ``MEM_SIZE`` creates the blocks, PAGE and ZERO records are applied in place,
and each sync marker runs the receiver's two-phase barrier. A real machine's device state
follows the ``ram`` section, in sections only its own QEMU can decode (their lengths are in
its vmstate descriptions): from the first section without a parser on, the rest is an
undecoded tail, checked only to end with EOF (and a VM description), and dropped; a relay
or a recorder (:mod:`multifd.migration.incoming`) passes it on instead.

Connections are accepted, authenticated (TLS) and identified by
:mod:`multifd.migration.arrivals`, which refuses strangers without failing the migration;
once every channel is there the listener is closed, so the kernel refuses any later
connection. What the source announces is bounded by
:class:`~multifd.migration.limits.ReceiveLimits` before anything is allocated.

The sync mode is not announced by the source (spec 11.4); the loader learns it from the
setup section: a ``MULTIFD_FLUSH`` before the first ``EOS`` means per-round mode, its absence
means per-section mode (every ``EOS`` is a marker).

A source may open QEMU's return path (``MIG_CMD_OPEN_RETURN_PATH``, see
:mod:`multifd.wire.return_path`). The loader thread then answers each ``MIG_CMD_PING`` with
a PONG and, at the end, writes a SHUT: status 0 once every block is written and the
receiver has finished, status 1 when the migration failed (best effort: a dead socket gets
nothing). It is the only writer of the main socket. Such a source keeps its sockets open
until it hears the SHUT (QEMU cleans its channels up only then), so the main stream ends
with its VM description, not with the connection, and the multifd channels are ended here
(``SHUT_RD``) once the final SYNC has been honoured.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final
from urllib.parse import quote

from multifd import transport
from multifd.address import Address
from multifd.engine.recv import Receiver
from multifd.engine.trace import TraceHook, emit
from multifd.errors import (
    MAIN,
    ChannelError,
    ChannelRefused,
    ConfigError,
    MigrationFailed,
    MultifdError,
    ProtocolError,
)
from multifd.migration.arrivals import Arrivals
from multifd.migration.limits import ReceiveLimits
from multifd.migration.setup_watch import SetupWatch
from multifd.migration.stats import ChannelStats, MigrationStats, Status
from multifd.ram import Ram, RamBlock
from multifd.wire import return_path as rp
from multifd.wire import stream
from multifd.wire.compat import SyncMode
from multifd.wire.constants import MIG_CMD_SWITCHOVER_START, PAGE_SIZE, RAM_SECTION_VERSION

log = logging.getLogger("multifd.destination")

_RECV_CHUNK: Final = 1 << 20
_POLL: Final = 0.25  # seconds between liveness checks while a channel is quiet
# The end of an undecoded tail kept for the EOF check: room for the largest VM description
# the decoder accepts.
_TAIL_CHECK: Final = (16 << 20) + 16

ListeningHook = Callable[[Address], None]


def block_filename(name: str) -> str:
    """A file name for block ``name`` that stays inside the output folder."""
    encoded = quote(name, safe="")
    return encoded if encoded not in (".", "..") else encoded.replace(".", "%2E")


class Destination:
    """Receives one migration into RAM blocks (anonymous memory or files in a folder).

    Args:
        channels: number of multifd channels the source uses (0: multifd off).
        output: folder where each block is written as a file named after the block;
            None keeps the blocks in anonymous memory (see :attr:`ram`).
        uuid: if set, every multifd channel must carry this UUID.
        compression: the method the source uses (not negotiated by QEMU).
        io_timeout: seconds without any progress after which the migration fails.
        setup_timeout: seconds for the main and all multifd channels to arrive.
        limits: what the source may announce and how connections may behave.
        trace: sees every packet and marker received.
        on_refused: told about each connection refused during setup, as it is.

    Attributes:
        refused: the connections refused during setup (TLS failures, strangers, extra
            channels); each was logged as a warning.
    """

    def __init__(
        self,
        *,
        channels: int = 2,
        output: Path | None = None,
        uuid: bytes | None = None,
        compression: str = "none",
        io_timeout: float = 30.0,
        setup_timeout: float = 60.0,
        limits: ReceiveLimits | None = None,
        trace: TraceHook | None = None,
        on_refused: Callable[[ChannelRefused], None] | None = None,
    ) -> None:
        self.channels = channels
        self.output = output
        self.uuid = uuid
        self.compression = compression
        self.io_timeout = io_timeout
        self.setup_timeout = setup_timeout
        self.limits = limits or ReceiveLimits()
        self.trace = trace
        self._backpressure: Callable[[], None] | None = None  # for the receiver (Incoming)
        self.refused: list[ChannelRefused] = []
        self._on_refused = on_refused
        self.ram = Ram()
        self._preallocated: tuple[tuple[str, int], ...] | None = None
        self._blocks_announced = False
        self.status = Status.NONE
        self.machine: str | None = None
        self.sync_mode: SyncMode | None = None
        self._receiver: Receiver | None = None
        self._main: socket.socket | None = None
        # A real machine's device state follows the ram section: sections we have no
        # parser for (only the machine's own QEMU can decode them) start the tail.
        self._decoder = stream.StreamDecoder(
            MAIN,
            max_blocks=self.limits.max_blocks,
            max_name_len=self.limits.max_name_len,
            tail_from_unknown=True,
        )
        self.tail_bytes = 0  # bytes of the stream's undecoded tail
        self._tail_end = bytearray()  # its last bytes, for the EOF check
        self._flush_seen = False
        self._eof_seen = False
        # The source opened QEMU's return path: the loader thread, the only one that
        # writes the main socket, answers PINGs and ends with a SHUT carrying the outcome.
        self.return_path = False
        self._vmdesc_seen = False
        self._start = 0.0
        self._setup_ms = 0.0
        self._main_bytes = 0
        self._multifd_socks: list[socket.socket] = []  # owned by the thread in run()
        self._main_pages = 0
        self._zero_records = 0
        self._syncs = 0

    # -- the whole migration ----------------------------------------------------------------
    def run(self, listener: transport.Listener) -> MigrationStats:
        """Accept the channels from ``listener`` and receive one migration.

        TLS is used if ``listener.address`` carries a config. The listener is closed once
        every channel is there.
        """
        self._start = time.monotonic()
        self.status = Status.SETUP
        try:
            if self.channels:
                self._receiver = Receiver(
                    self.ram,
                    channels=self.channels,
                    uuid=self.uuid,
                    compression=self.compression,
                    trace=self.trace,
                    io_timeout=self.io_timeout,
                    backpressure=self._backpressure,
                )
            self._main, early = self._accept_channels(listener)
            listener.close()  # every channel is here: later connections are refused
            self._setup_ms = (time.monotonic() - self._start) * 1e3
            self.status = Status.ACTIVE
            self._load(early)
            if self._receiver is not None:
                if self.return_path:
                    self._stop_reading_multifd()
                self._receiver.finish(self.io_timeout)
            for block in self.ram:
                block.flush()
            self._send_shut(0)  # every block written and the receiver finished
        except MultifdError as exc:
            self.status = Status.FAILED
            self._abort(exc)
            self._send_shut(1)
            if isinstance(exc, MigrationFailed):
                raise
            failed = MigrationFailed(str(exc))
            failed.channel = getattr(exc, "channel", None)
            raise failed from exc
        finally:
            if self._main is not None:
                transport.close_after_last_write(self._main)  # the SHUT must arrive
            if self._receiver is not None:
                self._receiver.close()
        self.status = Status.COMPLETED
        return self.stats()

    def _abort(self, exc: MultifdError) -> None:
        if self._receiver is not None:
            self._receiver.abort(exc)

    # -- setup: accept and classify ---------------------------------------------------------
    def _accept_channels(self, listener: transport.Listener) -> tuple[socket.socket, bytes]:
        """The main channel, once every channel is here, and what it sent meanwhile."""
        watch = SetupWatch(self.channels, self.setup_timeout, self.refused)
        waiting = True  # for the source's first connection
        with Arrivals(
            listener,
            expected=1 + self.channels,
            limits=self.limits,
            io_timeout=self.io_timeout,
            on_refused=self._refuse,
        ) as arrivals:
            while not self._all_here(arrivals):
                watch.check(arrivals, self._receiver)
                arrivals.wait(min(watch.remaining(), _POLL))
                while not self._all_here(arrivals) and (identified := arrivals.pop()):
                    if waiting:
                        # The migration's clock starts when its source shows up: waiting
                        # for one is not part of it (a rate over the wait means nothing).
                        self._start, waiting = time.monotonic(), False
                    sock, kind = identified
                    if kind == "main":
                        arrivals.set_main(sock)
                    else:
                        arrivals.multifd += 1
                        self._accept_multifd(sock)
            log.info("all %d channels connected", 1 + self.channels)
            arrivals.refuse_the_rest()
            return arrivals.take_main(_POLL)

    def _refuse(self, refused: ChannelRefused) -> None:
        self.refused.append(refused)
        if self._on_refused is not None:
            self._on_refused(refused)

    def _all_here(self, arrivals: Arrivals) -> bool:
        return arrivals.main is not None and arrivals.multifd == self.channels

    def _accept_multifd(self, sock: socket.socket) -> None:
        if self._receiver is None:
            transport.close_quietly(sock)
            raise ProtocolError(
                "connection",
                channel="multifd/?",
                expected="no multifd channel (--channels 0)",
                received="a multifd channel",
            )
        self._multifd_socks.append(sock)
        self._receiver.accept_channel(sock, self.io_timeout)

    # -- the main stream --------------------------------------------------------------------
    def _load(self, early: bytes = b"") -> None:
        """Decode the main stream, ``early`` (what setup read of it) first."""
        assert self._main is not None
        buffer = bytearray(_RECV_CHUNK)
        view = memoryview(buffer)
        quiet_since = time.monotonic()
        progress = self._progress_mark()
        ended = bool(early) and self._decode(early)
        while not ended:
            try:
                count = self._main.recv_into(view)
            except TimeoutError:
                mark = self._progress_mark()
                if mark != progress:
                    progress, quiet_since = mark, time.monotonic()
                elif time.monotonic() - quiet_since > self.io_timeout:
                    raise ChannelError(
                        f"no data on any channel for {self.io_timeout:g} s", channel=MAIN
                    ) from None
                self._check_receiver()
                continue
            except OSError as exc:
                self._check_receiver()  # a multifd channel that failed first names the cause
                raise ChannelError(
                    f"receive failed: {transport.os_reason(exc)}", channel=MAIN
                ) from exc
            if count == 0:
                self._check_receiver()  # as above: the source may have closed main because of it
                self._decoder.close()
                self._drain_events()
                break
            quiet_since = time.monotonic()
            ended = self._decode(view[:count])
        if self._decoder.in_tail:
            if not stream.ends_with_eof(self._tail_end):
                raise ProtocolError(
                    "end of the stream after the ram section",
                    channel=MAIN,
                    expected="QEMU_VM_EOF, then a VM description or nothing",
                    received=(
                        f"{self.tail_bytes} bytes ending {bytes(self._tail_end[-16:]).hex()}"
                    ),
                )
        elif not self._eof_seen:
            raise ProtocolError(
                "main stream", channel=MAIN, expected="QEMU_VM_EOF", received="end of stream"
            )

    def _decode(self, data: bytes | memoryview) -> bool:
        """Decode and apply ``data``; True once the stream is over with the socket open."""
        self._main_bytes += len(data)
        self._decoder.feed(data)
        self._drain_events()
        # The source may keep the socket open: it waits for our SHUT.
        return self.return_path and self._stream_ended()

    def _progress_mark(self) -> int:
        if self._receiver is None:
            return self._main_bytes
        return self._main_bytes + sum(ch.bytes for ch in self._receiver.stats())

    def _check_receiver(self) -> None:
        if self._receiver is not None:
            self._receiver.check()

    def _drain_events(self) -> None:
        while (event := self._decoder.next_event()) is not None:
            self._handle(event)
        if self._decoder.in_tail and (data := self._decoder.take_tail()):
            self.tail_bytes += len(data)
            self._tail_end += data
            del self._tail_end[:-_TAIL_CHECK]
            self._tail(data)

    def _tail(self, data: bytes) -> None:
        """Bytes of the undecoded tail, in order: a plain destination drops them."""

    def _handle(self, event: stream.Event) -> None:
        match event:
            case stream.RamPage(block=name, offset=offset, data=data):
                block = self._block(name, offset)
                block.view[offset : offset + PAGE_SIZE] = data
                block.written_page(offset // PAGE_SIZE)
                self._main_pages += 1
            case stream.RamZero(block=name, offset=offset, fill=fill):
                self._apply_zero(name, offset, fill)
            case stream.RamEos():
                self._on_eos()
            case stream.RamMultifdFlush():
                self._on_flush()
            case stream.RamMemSize(total=total, blocks=blocks):
                self._create_blocks(total, blocks)
            case stream.Configuration(machine=machine):
                self.machine = machine
            case stream.SectionStart(idstr="ram", version_id=version) if (
                version != RAM_SECTION_VERSION
            ):
                raise ProtocolError(
                    "ram section version",
                    channel=MAIN,
                    expected=RAM_SECTION_VERSION,
                    received=version,
                )
            case stream.Command():
                self._command(event)
            case stream.VmDescription():
                self._vmdesc_seen = True
            case stream.Eof():
                self.status = Status.DEVICE
                self._eof_seen = True
            case _:
                pass

    def _command(self, command: stream.Command) -> None:
        if command.cmd == rp.MIG_CMD_OPEN_RETURN_PATH:
            self._open_return_path()
        elif command.cmd == rp.MIG_CMD_PING:
            self._answer_ping(rp.ping_value(command.data))
        elif command.cmd != MIG_CMD_SWITCHOVER_START:
            known = (
                f"MIG_CMD_SWITCHOVER_START ({MIG_CMD_SWITCHOVER_START}), "
                f"MIG_CMD_OPEN_RETURN_PATH ({rp.MIG_CMD_OPEN_RETURN_PATH}) "
                f"or MIG_CMD_PING ({rp.MIG_CMD_PING})"
            )
            raise ProtocolError("command", channel=MAIN, expected=known, received=command.cmd)

    # -- the return path --------------------------------------------------------------------
    def _stream_ended(self) -> bool:
        """Whether the main stream is over although the source keeps the socket open.

        A source with a return path waits for our SHUT before it closes anything; ours
        half-closes after its last byte, QEMU does not. The VM description is the last
        record QEMU sends. In an undecoded tail, the end is a whole VM description after
        EOF (EOF alone could be a chance byte of device state).
        """
        if self._decoder.in_tail:
            return stream.ends_with_eof(self._tail_end, description=True)
        return self._vmdesc_seen

    def _open_return_path(self) -> None:
        if self.return_path:
            log.warning("the return path was opened twice")  # QEMU ignores it too
        self.return_path = True
        log.info("return path opened")

    def _answer_ping(self, value: int) -> None:
        if not self.return_path:
            raise ProtocolError(
                "MIG_CMD_PING", channel=MAIN, expected="an open return path", received=value
            )
        assert self._main is not None
        transport.send_all(self._main, [rp.pong(value)], channel=rp.RETURN_PATH)

    def _stop_reading_multifd(self) -> None:
        """End every multifd channel's stream here: the final SYNC has been honoured, and
        a source waiting for our SHUT keeps its channels open until it hears it."""
        for sock in self._multifd_socks:
            with contextlib.suppress(OSError):  # already closed by a failed channel
                sock.shutdown(socket.SHUT_RD)

    def _send_shut(self, status: int) -> None:
        """Tell the source the outcome (QEMU's ``migrate_send_rp_shut``); best effort: a
        source that does not hear it fails the migration anyway."""
        if not self.return_path or self._main is None:
            return
        try:
            transport.send_all(self._main, [rp.shut(status)], channel=rp.RETURN_PATH)
        except ChannelError as exc:
            log.warning("SHUT(%d) not sent: %s", status, exc)
            return
        log.info("SHUT(%d) sent on the return path", status)

    def _block(self, name: str, offset: int) -> RamBlock:
        block = self.ram.get(name)
        if block is None:
            raise ProtocolError(
                "ram record block",
                channel=MAIN,
                expected=f"one of {[b.name for b in self.ram]}",
                received=name,
            )
        if offset % PAGE_SIZE or offset > block.size - PAGE_SIZE:
            raise ProtocolError(
                f"ram record offset in {name!r}",
                channel=MAIN,
                expected=f"a page offset <= {block.size - PAGE_SIZE:#x}",
                received=f"{offset:#x}",
            )
        return block

    def _apply_zero(self, name: str, offset: int, fill: int) -> None:
        block = self._block(name, offset)
        if fill != 0:
            raise ProtocolError("zero page fill byte", channel=MAIN, expected=0, received=fill)
        block.write_zero_page(offset // PAGE_SIZE)
        self._zero_records += 1

    def _create_blocks(self, total: int, blocks: tuple[tuple[str, int], ...]) -> None:
        if self._preallocated is not None and not self._blocks_announced:
            self._blocks_announced = True
            if blocks != self._preallocated:
                raise ProtocolError(
                    "ram blocks", channel=MAIN, expected=self._preallocated, received=blocks
                )
            return
        if len(self.ram):
            raise ProtocolError(
                "ram setup", channel=MAIN, expected="one MEM_SIZE record", received="a second one"
            )
        self.limits.check_blocks(total, blocks, channel=MAIN)  # all of them, before allocating
        for name, size in blocks:
            block = self._new_block(name, size)
            block.prefault()
            self.ram.add(block)
        log.info("blocks: %s", ", ".join(f"{n} ({s} bytes)" for n, s in blocks))

    def preallocate(self, blocks: Mapping[str, int]) -> None:
        """Allocate and pre-fault the blocks the source must announce, before it connects.

        QEMU's destination is started with its RAM (``prealloc=on`` pre-faults it); this is
        the same: first-touch costs are paid before the migration, and the source's block
        list must then match exactly.
        """
        for name, size in blocks.items():
            if size <= 0 or size % PAGE_SIZE:
                raise ConfigError(f"block {name!r}: size {size} is not a multiple of {PAGE_SIZE}")
            block = self._new_block(name, size)
            block.prefault()
            self.ram.add(block)
        self._preallocated = tuple(blocks.items())

    def adopt(self, ram: Ram) -> None:
        """Receive into ``ram``, the caller's blocks, whatever they hold now.

        The source must announce exactly these blocks. Every page the source sends is written,
        zero pages included, so old content never survives a completed migration.
        """
        if len(self.ram):
            raise ConfigError("the destination already has its blocks")
        self.ram = ram
        self._preallocated = tuple((block.name, block.size) for block in ram)

    def _new_block(self, name: str, size: int) -> RamBlock:
        if self.output is None:
            block = RamBlock.anonymous(name, size)
        else:
            self.output.mkdir(parents=True, exist_ok=True)
            path = self.output / block_filename(name)
            block = RamBlock.from_file(name, path, size=size, create=True)
        block.assume_zeroed()  # fresh memory and a freshly truncated file read as zeros
        return block

    # -- sync markers -----------------------------------------------------------------------
    def _on_eos(self) -> None:
        if self.sync_mode is None:
            self.sync_mode = SyncMode.PER_ROUND if self._flush_seen else SyncMode.PER_SECTION
            log.info("sync mode: %s", self.sync_mode.value)
        if self.sync_mode is SyncMode.PER_SECTION:
            self._sync("EOS")

    def _on_flush(self) -> None:
        if self.sync_mode is SyncMode.PER_SECTION:
            raise ProtocolError(
                "sync marker",
                channel=MAIN,
                expected="EOS (per-section sync mode, set by the setup section)",
                received="MULTIFD_FLUSH",
            )
        self._flush_seen = True
        self._sync("MULTIFD_FLUSH")

    def _sync(self, marker: str) -> None:
        if self._receiver is None:
            self._at_marker(marker)
            return
        self._receiver.wait_sync(self.io_timeout, while_parked=lambda: self._at_marker(marker))
        self._syncs += 1
        if self.trace is not None:
            emit(self.trace, "recv", MAIN, record=marker)

    def _at_marker(self, marker: str) -> None:
        """Hook for subclasses (the relay): runs at each sync marker, ``marker`` being
        ``"EOS"`` or ``"MULTIFD_FLUSH"``, while no channel writes RAM."""

    # -- statistics -------------------------------------------------------------------------
    def stats(self) -> MigrationStats:
        """A snapshot of the figures so far; safe from any thread while :meth:`run` runs
        (each figure has one writer, and the channels' are copied under their lock)."""
        elapsed = (time.monotonic() - self._start) * 1e3 if self._start else 0.0
        main = ChannelStats(
            MAIN, pages=self._main_pages, zero_pages=self._zero_records, bytes=self._main_bytes
        )
        engine = self._receiver.stats() if self._receiver is not None else ()
        return MigrationStats(
            status=self.status,
            total_time_ms=elapsed,
            setup_time_ms=self._setup_ms,
            total=self.ram.total_size,
            dirty_sync_count=self._syncs,
            channels=(main, *engine),
        )
