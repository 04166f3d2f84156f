"""The receive side of multifd: one thread per channel, applying pages in place.

Each channel thread reads packets in order, checks them (spec 3.4 plus page alignment),
reads page data straight into the destination's RAM and steps the receive handshake of
:mod:`multifd.engine.handshake`. The per-packet path is kept short because both ends of a
migration often share the CPUs: the checks run on the raw header (a packet object is built
only for a trace hook or an error), a run of consecutive pages is recognised without a loop
and read with one ``recv_into``, and a step that changes nothing takes no lock.

The main-stream loader meets the threads at every marker through
:meth:`Receiver.wait_sync`, a two-phase barrier (QEMU ``multifd_recv_sync_main()``, spec
6.1). Whatever QEMU 7.2 and later send is accepted: pages inside SYNC packets (applied
before the SYNC is honoured), empty flag-0 packets, stale fields when the counts are zero,
the same page twice, ``pages_alloc`` from 0 to 128.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Final
from uuid import UUID

import numpy as np

from multifd.compression import Decompressor, decompressor, describe_flag, flag_of
from multifd.engine.handshake import (
    RECV_INITIAL,
    RECV_QUIET,
    RecvAction,
    RecvEvent,
    RecvState,
    recv_step,
)
from multifd.engine.pageio import (
    Offsets,
    channel_error,
    channel_io,
    recv_exact,
    recv_exact_into,
    run_views,
)
from multifd.engine.shutdown import Shutdown, Stoppable
from multifd.engine.stats import ChannelCounters, Counters
from multifd.engine.trace import TraceHook, emit
from multifd.errors import (
    UNIDENTIFIED,
    ChannelError,
    ConfigError,
    MultifdError,
    ProtocolError,
    multifd_channel,
)
from multifd.ram import Ram, RamBlock
from multifd.transport import set_io_timeout
from multifd.wire.constants import (
    INIT_PACKET_SIZE,
    MAX_COMPRESSED_PAYLOAD,
    MULTIFD_FLAG_COMPRESSION_MASK,
    MULTIFD_FLAG_SYNC,
    PACKET_FIXED_SIZE,
    PACKET_HEADER_SIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGES_PER_PACKET,
    UUID_SIZE,
)
from multifd.wire.packets import (
    RAMBLOCK_AT,
    InitPacket,
    RamPacket,
    consecutive_from,
    offsets_view,
    pages_inside,
    unpack_counts,
)

# Parked threads and the loader re-check for shutdown this often even without a notify.
_POLL: Final = 0.25
_MAX_CHANNELS: Final = 256  # the init packet's id is one byte
_FINISHED: Final = frozenset({RecvState.EOF_SEEN, RecvState.DONE})
_PAGE_MASK: Final = PAGE_SIZE - 1
_MAX_CACHED_BLOCKS: Final = 64


class _RecvChannel:
    """One multifd receive channel: its socket, its thread and its half of the barrier."""

    def __init__(self, owner: Receiver, index: int, sock: socket.socket) -> None:
        # Immutable after construction.
        self.owner = owner
        self.index = index
        self.name = multifd_channel(index)
        self.sock = sock
        self.log = logging.getLogger(f"multifd.recv.ch{index}")
        self.thread = threading.Thread(target=self._run, name=f"recv-{self.name}")
        # Written under owner.cond. The channel thread alone reads it without the lock, to
        # take a RECV_QUIET step (one that writes nothing: see handshake.RECV_QUIET).
        self.state: RecvState = RECV_INITIAL
        # Owned by the channel thread.
        self.decompressor: Decompressor | None = decompressor(owner.compression)
        self.header = bytearray(PACKET_HEADER_SIZE)
        self.header_view = memoryview(self.header)
        self.offsets = offsets_view(self.header)  # follows every header read into it
        self.payload = memoryview(bytearray(MAX_COMPRESSED_PAYLOAD if self.decompressor else 0))
        # Scattered pages inflate here in one piece, then go to the block in one scatter.
        inflated = bytearray(PAGES_PER_PACKET * PAGE_SIZE if self.decompressor else 0)
        self.inflated = memoryview(inflated)
        self.inflated_pages = np.frombuffer(inflated, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        self.blocks: dict[bytes, RamBlock] = {}  # raw ramblock field -> block, hits only
        self.counters = Counters(self.name)
        self.counters.bytes = INIT_PACKET_SIZE

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._handle_packet():
                pass
        except MultifdError as exc:
            self.owner.shutdown.fail(exc, self.name)
        except Exception as exc:
            self.log.exception("receive thread failed")
            self.owner.shutdown.fail(exc, self.name)
        self.log.debug("receive thread exits")

    def _handle_packet(self) -> bool:
        """Read, check and apply one packet, then step the barrier; False to stop."""
        got = self._read_header()
        if got != PACKET_HEADER_SIZE:
            if got == 0:
                self._transition(RecvEvent.EOF)
                return False
            raise ProtocolError(
                "unexpected EOF in packet header",
                channel=self.name,
                expected=f"{PACKET_HEADER_SIZE} bytes",
                received=f"{got} bytes",
            )
        flags, normal, zero, next_size = unpack_counts(self.header, channel=self.name)
        size = 0
        if normal or zero:
            size = self._apply(flags, normal, zero, next_size)
            if self.owner.backpressure is not None:
                self.owner.backpressure()
        sync = flags & MULTIFD_FLAG_SYNC
        counters = self.counters
        counters.packets += 1
        counters.sync_packets += bool(sync)
        counters.pages += normal
        counters.zero_pages += zero
        counters.bytes += PACKET_HEADER_SIZE + size
        if self.owner.trace is not None:
            packet = RamPacket.unpack(self.header_view, channel=self.name)
            emit(self.owner.trace, "recv", self.name, packet=packet)
        # Pages, even those inside an old sender's SYNC packet, are applied by now.
        event = RecvEvent.SYNC if sync else RecvEvent.PACKET
        if (self.state, event) in RECV_QUIET:
            return True
        action = self._transition(event)
        if action is RecvAction.PARK:
            return self._park()
        return action is RecvAction.CONTINUE

    def _transition(self, event: RecvEvent) -> RecvAction:
        with self.owner.cond:
            self.state, action = recv_step(self.state, event)
            if action is RecvAction.PARK or event is RecvEvent.EOF:
                self.owner.cond.notify_all()  # the loader may wait for this channel
        return action

    def _park(self) -> bool:
        """Wait until the loader releases this channel (or finishes, or shuts down)."""
        cond = self.owner.cond
        with cond:
            while self.state is RecvState.AT_SYNC_POSTED:
                if self.owner.shutdown.exiting:
                    return False
                cond.wait(_POLL)  # notified by wait_sync(), finish() and the shutdown path
            self.state, action = recv_step(self.state, RecvEvent.WAKE)
        return action is RecvAction.CONTINUE and not self.owner.shutdown.exiting

    def _read_header(self) -> int:
        """Bytes of the next header read: 0 at end of stream, short inside a packet."""
        view = self.header_view
        got = 0
        while got < PACKET_HEADER_SIZE:
            try:
                count = self.sock.recv_into(
                    view[got:] if got else view, PACKET_HEADER_SIZE - got, socket.MSG_WAITALL
                )
            except (TimeoutError, BlockingIOError) as exc:
                # Between packets a channel may idle as long as the source likes.
                if got or self.owner.shutdown.exiting:
                    raise self._io_error(exc) from exc
                continue
            except OSError as exc:
                raise self._io_error(exc) from exc
            if count == 0:
                break
            got += count
        return got

    def _io_error(self, exc: OSError) -> ChannelError:
        return channel_error(exc, self.name, "read", self.owner.io_timeout)

    # -- pages -----------------------------------------------------------------------------
    def _apply(self, flags: int, normal: int, zero: int, next_size: int) -> int:
        """Apply the pages of the packet in ``header``; returns the payload bytes read."""
        block = self._block()
        count = normal + zero
        first = consecutive_from(self.header, count)
        offsets: Offsets | None = None
        if first is None or first & _PAGE_MASK or first + count * PAGE_SIZE > block.size:
            offsets = self._checked_offsets(block, count)
            first = 0
        if offsets is None:
            first_page = first >> PAGE_SHIFT
            data: slice | Offsets = slice(first_page, first_page + normal)
            zeros: slice | Offsets = slice(first_page + normal, first_page + count)
        else:
            data, zeros = offsets[:normal] >> PAGE_SHIFT, offsets[normal:] >> PAGE_SHIFT
        size = 0
        if normal:
            block.written(data)  # before the bytes land: a failed read leaves no false zero
            if flags & MULTIFD_FLAG_COMPRESSION_MASK != self.owner.flag:
                raise ProtocolError(
                    "packet compression method",
                    channel=self.name,
                    expected=describe_flag(self.owner.flag),
                    received=(
                        f"{describe_flag(flags & MULTIFD_FLAG_COMPRESSION_MASK)}: the method "
                        "is not negotiated, both ends must be given the same"
                    ),
                )
            if self.decompressor is None:
                size = self._read_runs(_runs(block, first, normal, offsets), normal * PAGE_SIZE)
            elif offsets is None:
                size = self._read_compressed(_runs(block, first, normal, None), next_size)
            else:
                # Scattered pages (tens of runs in half-zero RAM): one numpy scatter costs
                # less than a copy per run in Python.
                size = self._read_compressed([self.inflated[: normal * PAGE_SIZE]], next_size)
                block.pages[data] = self.inflated_pages[:normal]
            block.landed(data)
        if zero:
            block.write_zero(zeros)
        return size

    def _block(self) -> RamBlock:
        """The block the header names (spec 3.4: an unknown block fails the channel)."""
        raw = self.header_view[RAMBLOCK_AT:PACKET_FIXED_SIZE].tobytes()
        block = self.blocks.get(raw)
        if block is not None:
            return block
        packet = RamPacket.unpack(self.header_view, channel=self.name)  # checks the name
        block = self.owner.ram.get(packet.ramblock)
        if block is None:
            raise ProtocolError(
                "unknown ramblock",
                channel=self.name,
                expected=f"one of {[b.name for b in self.owner.ram]}",
                received=repr(packet.ramblock),
            )
        if len(self.blocks) >= _MAX_CACHED_BLOCKS:
            self.blocks.clear()  # names padded with garbage must not grow it without bound
        self.blocks[raw] = block
        return block

    def _checked_offsets(self, block: RamBlock, count: int) -> Offsets:
        """The packet's offsets, each one checked to name a whole page of ``block``."""
        offsets = self.offsets[:count]
        if not pages_inside(offsets, block.size):
            packet = RamPacket.unpack(self.header_view, channel=self.name)
            packet.check_offsets(block.size, channel=self.name)  # says which one is bad
        return offsets.astype(np.int64)

    def _read_runs(self, runs: list[memoryview], total: int) -> int:
        # nocomp: next_packet_size is not trusted; the page count says it all.
        try:
            if len(runs) == 1:
                got = recv_exact(self.sock, runs[0])
            else:
                got = recv_exact_into(self.sock, runs)
        except OSError as exc:
            raise self._io_error(exc) from exc
        if got < total:
            self._eof_in_payload(total, got)
        return total

    def _read_compressed(self, pages: list[memoryview], next_size: int) -> int:
        assert self.decompressor is not None
        if next_size > MAX_COMPRESSED_PAYLOAD:
            raise ProtocolError(
                "next_packet_size",
                channel=self.name,
                expected=f"<= {MAX_COMPRESSED_PAYLOAD}",
                received=next_size,
            )
        payload = self.payload[:next_size]
        try:
            got = recv_exact(self.sock, payload)
        except OSError as exc:
            raise self._io_error(exc) from exc
        if got < next_size:
            self._eof_in_payload(next_size, got)
        self.decompressor.decompress_into(payload, pages, channel=self.name)
        return next_size

    def _eof_in_payload(self, expected: int, received: int) -> None:
        raise ProtocolError(
            "unexpected EOF in page data",
            channel=self.name,
            expected=f"{expected} bytes",
            received=f"{received} bytes",
        )


def _runs(block: RamBlock, first: int, normal: int, offsets: Offsets | None) -> list[memoryview]:
    """Views of the block for the runs of the ``normal`` pages with data.

    ``offsets`` None: the pages are the one run from ``first`` (consecutive_from() said so).
    """
    view = block.view
    if offsets is None:
        return [view[first : first + normal * PAGE_SIZE]]
    return run_views(view, offsets[:normal])


class Receiver(Stoppable):
    """The multifd channels of a migration destination (QEMU ``multifd_recv_state``).

    The receiver takes ownership of every socket given to :meth:`accept_channel`. One
    thread (the main-stream loader) calls :meth:`accept_channel`, :meth:`wait_sync` and
    :meth:`finish`; :meth:`close`, :meth:`abort`, :meth:`check` and :meth:`stats` may be
    called from any thread. Blocks may be added to ``ram`` while channels run: each packet
    looks its block up when it arrives.

    Args:
        ram: the destination's blocks; pages are written into them in place.
        channels: the number of multifd channels.
        uuid: the UUID every init packet must carry; None accepts any.
        compression: ``"none"``, ``"zlib"`` or ``"zstd"``; must match the source.
        trace: called with every packet after it was applied.
        io_timeout: seconds a read inside a packet may block before the channel fails.
        backpressure: called by a channel's thread after each packet with pages, before
            it reads on; it may block while pages should not come faster (a relay holds
            its source to its destination's pace), and raising fails the channel.
    """

    def __init__(
        self,
        ram: Ram,
        *,
        channels: int,
        uuid: bytes | None = None,
        compression: str = "none",
        trace: TraceHook | None = None,
        io_timeout: float = 30.0,
        backpressure: Callable[[], None] | None = None,
    ) -> None:
        if not 1 <= channels <= _MAX_CHANNELS:
            raise ConfigError(f"channels must be 1..{_MAX_CHANNELS}, got {channels}")
        if uuid is not None and len(uuid) != UUID_SIZE:
            raise ConfigError(f"uuid must be {UUID_SIZE} bytes, got {len(uuid)}")
        # Immutable after construction (ram's content changes, the object does not).
        self.ram = ram
        self.channels = channels
        self.uuid = uuid
        self.compression = compression
        self.flag = flag_of(compression)  # method bits every packet with pages must carry
        self.trace = trace
        self.io_timeout = io_timeout
        self.backpressure = backpressure
        self.log = logging.getLogger("multifd.recv")
        # The barrier: guards every channel's state, _channels and _finishing; the loader
        # waits on it for the channels to park, parked threads wait on it for release.
        self.cond = threading.Condition()
        self._channels: list[_RecvChannel | None] = [None] * channels
        self._finishing = False
        self.peer_uuid: bytes | None = None  # of the first init packet; set under cond
        self.shutdown = Shutdown("multifd receive", self.log)
        self.shutdown.add_wakeup(self._notify_all)

    # -- setup -----------------------------------------------------------------------------
    def accept_channel(self, sock: socket.socket, timeout: float) -> int:
        """Read the init packet from ``sock``, check it and start the channel's thread.

        Returns:
            The channel id the peer announced.

        Raises:
            ProtocolError: bad magic, version, uuid, an id out of range or already used.
            ChannelError: the init packet did not arrive within ``timeout`` seconds.
            MigrationFailed: the receiver already failed.
        """
        self.shutdown.raise_if_stopped()
        try:
            init = self._read_init(sock, timeout)
            channel = self._register(init, sock)
        except MultifdError as exc:
            sock.close()
            self.shutdown.fail(exc, getattr(exc, "channel", UNIDENTIFIED))
            raise
        channel.thread.start()
        return channel.index

    def _read_init(self, sock: socket.socket, timeout: float) -> InitPacket:
        buffer = bytearray(INIT_PACKET_SIZE)
        with channel_io(UNIDENTIFIED, "read of the init packet", timeout):
            set_io_timeout(sock, timeout)
            got = recv_exact(sock, memoryview(buffer))
        init = InitPacket.unpack(memoryview(buffer)[:got], channel=UNIDENTIFIED)
        name = multifd_channel(init.channel_id)
        if self.uuid is not None and init.uuid != self.uuid:
            raise ProtocolError(
                "init packet uuid",
                channel=name,
                expected=UUID(bytes=self.uuid),
                received=UUID(bytes=init.uuid),
            )
        if init.channel_id >= self.channels:
            raise ProtocolError(
                "init packet channel id",
                channel=name,
                expected=f"< {self.channels}",
                received=(
                    f"{init.channel_id}: the source uses more than {self.channels} channels "
                    "(the count is not negotiated, both ends must be given the same)"
                ),
            )
        return init

    def _register(self, init: InitPacket, sock: socket.socket) -> _RecvChannel:
        index = init.channel_id
        with self.cond:
            if self._channels[index] is not None:
                raise ProtocolError(
                    "init packet channel id",
                    channel=multifd_channel(index),
                    expected="an id not used yet",
                    received=f"{index} a second time",
                )
            channel = _RecvChannel(self, index, sock)
            self._channels[index] = channel
            if self.peer_uuid is None:
                self.peer_uuid = init.uuid
        set_io_timeout(sock, self.io_timeout)
        self.shutdown.add(sock, channel.thread)
        return channel

    # -- the loader's side of the barrier --------------------------------------------------
    def wait_sync(self, timeout: float, *, while_parked: Callable[[], None] | None = None) -> None:
        """At a marker: wait until every channel reached its SYNC, then release them all.

        When this returns, every page that preceded the SYNCs is in ``ram``.

        Args:
            timeout: seconds the channels may take to reach their SYNC.
            while_parked: run once every channel is parked, before any is released:
                nothing writes ``ram`` meanwhile (a relay reads what changed). If it
                raises, the channels stay parked until the receiver is shut down.

        Raises:
            MigrationFailed: a channel failed, ended early, or did not reach its SYNC
                within ``timeout`` seconds (the message names those channels).
        """
        self.shutdown.raise_if_stopped()
        deadline = time.monotonic() + timeout
        problem = self._barrier(deadline, timeout, release=while_parked is None)
        if problem is not None:
            self.shutdown.fail(problem, problem.channel)
        self.shutdown.raise_if_stopped()
        if while_parked is not None:
            while_parked()
            with self.cond:
                self._release_all()
            self.shutdown.raise_if_stopped()

    def _barrier(self, deadline: float, timeout: float, *, release: bool) -> ChannelError | None:
        with self.cond:
            if self._finishing:
                raise ConfigError("wait_sync() called after finish()")
            while not self.shutdown.exiting:
                channels = self._channels
                if all(c is not None and c.state is RecvState.AT_SYNC_POSTED for c in channels):
                    if release:
                        self._release_all()
                    return None
                gone = [c.name for c in channels if c is not None and c.state in _FINISHED]
                if gone:
                    return ChannelError(
                        f"peer closed {', '.join(gone)} before the SYNC", channel=gone[0]
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    late = self._not_at_sync()
                    return ChannelError(
                        f"no SYNC within {timeout:g} s on {', '.join(late)}", channel=late[0]
                    )
                self.cond.wait(min(remaining, _POLL))  # notified when a channel parks or ends
        return None

    def _release_all(self) -> None:
        for channel in self._channels:
            assert channel is not None
            channel.state, _ = recv_step(channel.state, RecvEvent.RELEASE)
        self.cond.notify_all()  # the NOTIFY action, once for all

    def stalled_short(self) -> list[str] | None:
        """The channels missing while every channel that did connect waits at a SYNC;
        None when no channel connected, one is missing none, or one still reads.

        The source then got as far as a sync point without the missing channels: it may
        not have them (a smaller channel count), or they are late; the caller waits a
        little before it decides.
        """
        with self.cond:
            present = [c for c in self._channels if c is not None]
            if not present or len(present) == self.channels:
                return None
            if any(c.state is not RecvState.AT_SYNC_POSTED for c in present):
                return None
            return [multifd_channel(i) for i, c in enumerate(self._channels) if c is None]

    def _not_at_sync(self) -> list[str]:
        return [
            multifd_channel(i)
            for i, c in enumerate(self._channels)
            if c is None or c.state is not RecvState.AT_SYNC_POSTED
        ]

    def finish(self, timeout: float) -> None:
        """End of migration: free parked threads and let every channel read to its end.

        Raises:
            MigrationFailed: a channel failed, never connected, or did not reach the end of
                its stream within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        self.shutdown.raise_if_stopped()
        with self.cond:
            self._finishing = True
            missing = [multifd_channel(i) for i, c in enumerate(self._channels) if c is None]
            if not missing:
                for channel in self._live_channels():
                    channel.state, _ = recv_step(channel.state, RecvEvent.FINISH)
                self.cond.notify_all()
        if missing:
            problem = ChannelError(f"{', '.join(missing)} never connected", channel=missing[0])
            self.shutdown.fail(problem, problem.channel)
        for channel in self._live_channels():
            channel.thread.join(max(0.0, deadline - time.monotonic()))
        alive = [c.name for c in self._live_channels() if c.thread.is_alive()]
        if alive:
            problem = ChannelError(
                f"no end of stream within {timeout:g} s on {', '.join(alive)}", channel=alive[0]
            )
            self.shutdown.fail(problem, problem.channel)
        self.shutdown.raise_if_stopped()
        self.shutdown.close()

    # -- shutdown and observation ----------------------------------------------------------
    def stats(self) -> tuple[ChannelCounters, ...]:
        """A snapshot of every channel's counters, in channel-id order."""
        with self.cond:
            channels = list(self._channels)
        return tuple(
            c.counters.snapshot() if c is not None else ChannelCounters(multifd_channel(i))
            for i, c in enumerate(channels)
        )

    def _live_channels(self) -> list[_RecvChannel]:
        with self.cond:
            return [c for c in self._channels if c is not None]

    def _notify_all(self) -> None:
        with self.cond:
            self.cond.notify_all()
