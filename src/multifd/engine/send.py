"""The send side of multifd: one thread per channel, fed with page batches by a requester.

The requester (the migration thread calling :meth:`Sender.send_pages` and
:meth:`Sender.sync`) cuts the pages it is given into batches of at most 128 pages of one
block, prepares the packets of all those batches in one numpy pass
(:class:`~multifd.engine.batch.PacketPlan`), and hands a job of a few consecutive packets
to the next idle channel by swapping job objects; the channel thread stamps flags, counts
and ``packet_num`` into each packet's header and writes the job's packets, several to a
``sendmsg``. A job is one hand-over, so the round trip between requester and channel
thread (a wake-up each way, each waiting for the interpreter lock) is paid once per job,
not once per packet. Requester and channel thread
meet only through the per-channel handshake of :mod:`multifd.engine.handshake` (QEMU 9.0+
``multifd_send()`` / ``multifd_send_thread()``, spec 6.2 and 6.5): a job and a sync
request are two independent flags, so a SYNC packet never carries pages and there is never
an empty packet.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from multifd.compression import Compressor, compressor, flag_of
from multifd.engine.batch import Batch, Job, PacketPlan, data_in_one_buffer
from multifd.engine.handshake import SEND_INITIAL, SendAction, SendEvent, SendState, send_step
from multifd.engine.pageio import Offsets, channel_error
from multifd.engine.shutdown import Semaphore, Shutdown, Stoppable
from multifd.engine.stats import ChannelCounters, Counters
from multifd.engine.trace import TraceHook, emit
from multifd.errors import ConfigError, MultifdError, multifd_channel
from multifd.ram import RamBlock
from multifd.transport import send_all, set_io_timeout, write_buffers
from multifd.wire.constants import (
    INIT_PACKET_SIZE,
    MAX_COMPRESSED_PAYLOAD,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    PAGES_PER_PACKET,
)
from multifd.wire.packets import NIL_UUID, InitPacket, RamPacket, stamp_header

# Requester waits wake up this often to notice a failure even if no post reaches them.
_POLL: Final = 0.25
# Buffers per sendmsg(), under the kernel's IOV_MAX of 1024.
_IOV_MAX: Final = 512
# Packets handed to a channel at once (Sender's default packets_per_job). A compressed
# packet keeps its channel busy for longer, and with 4 per job the requester's hand-overs
# and their GIL round trips showed: 16 took Python -> QEMU 10 zstd at 1 GiB half zero from
# 0.410 to 0.368 s and, in a second run, from 0.402 to 0.378 s (5 and 6 interleaved pairs;
# 32 measured the same as 16). Without compression 16 measured the same as 4 in half-zero
# RAM and slightly worse in random RAM (0.284 -> 0.297 s).
PACKETS_PER_JOB: Final = 4
COMPRESSED_PACKETS_PER_JOB: Final = 16


class _SendChannel:
    """One multifd send channel: its socket, its thread and its half of the handshake."""

    def __init__(self, owner: Sender, index: int, sock: socket.socket) -> None:
        # Immutable after construction.
        self.owner = owner
        self.index = index
        self.name = multifd_channel(index)
        self.sock = sock
        self.log = logging.getLogger(f"multifd.{owner.name}.ch{index}")
        self.thread = threading.Thread(target=self._run, name=f"{owner.name}-{self.name}")
        # Shared handshake state, guarded by ``lock``.
        self.lock = threading.Lock()  # guards state and the batch swap
        self.state: SendState = SEND_INITIAL
        # The job belongs to the requester while state.pending_job is False (it only swaps
        # in an empty one) and to the thread while it is True.
        self.job = Job()
        self.sem = Semaphore()  # a request is pending (HAND_JOB, REQUEST_SYNC)
        self.sem_sync = Semaphore()  # the requested SYNC packet is written
        # Owned by the channel thread.
        self.packet = Batch()  # the packet of the job being written
        self.compressor: Compressor | None = compressor(owner.compression, owner.level)
        # A packet's scattered pages are gathered here for a method that takes whole packets.
        gathers = self.compressor is not None and self.compressor.whole_packets
        self.gathered = np.empty((PAGES_PER_PACKET if gathers else 0, PAGE_SIZE), np.uint8)
        self.counters = Counters(self.name)

    # -- handshake -------------------------------------------------------------------------
    def request(self, event: SendEvent) -> None:
        """Requester side: set a request flag through the table, then post ``sem``."""
        with self.lock:
            self.state, action = send_step(self.state, event)
        self.perform(action)

    def perform(self, action: SendAction) -> None:
        if action is SendAction.POST_SEM:
            self.sem.release()
        elif action is SendAction.POST_SEM_SYNC:
            self.sem_sync.release()
        elif action is SendAction.POST_CHANNELS_READY:
            self.owner.channels_ready.release()

    def _transition(self, event: SendEvent) -> SendAction:
        with self.lock:
            self.state, action = send_step(self.state, event)
        return action

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if not self.owner.greeted:
                init = InitPacket(self.index, self.owner.uuid).pack()
                self._write([init], len(init))
            self.counters.bytes += INIT_PACKET_SIZE
            self.owner.channels_ready.release()
            while self._wait_for_work():
                self._serve(self._transition(SendEvent.WAKE))
        except MultifdError as exc:
            self.owner.fail(exc, self.name)
        except Exception as exc:
            self.log.exception("send thread failed")
            self.owner.fail(exc, self.name)
        self.log.debug("send thread exits")

    def _wait_for_work(self) -> bool:
        # Paired with the posts of request() and with the shutdown path's post of every sem.
        while not self.owner.shutdown.exiting:
            if self.sem.acquire(timeout=_POLL):
                return not self.owner.shutdown.exiting
        return False

    def _serve(self, action: SendAction) -> None:
        if action is SendAction.SEND_PAGES:
            self._send_job(self.job)
            self.job.clear()
            self.perform(self._transition(SendEvent.PAGES_SENT))
        elif action is SendAction.SEND_SYNC:
            header = RamPacket.sync(self.owner.next_packet_num()).pack()
            self._write([header], len(header))
            self.counters.count(pages=0, zero_pages=0, sync=True, size=len(header))
            self._trace(header)
            self.perform(self._transition(SendEvent.SYNC_SENT))

    def _send_job(self, job: Job) -> None:
        """Write the job's packets, several to a ``sendmsg`` while the buffers fit one."""
        plan = job.plan
        assert plan is not None, "a pending job always has a plan"
        packet = self.packet
        number = self.owner.next_packet_nums(len(job))
        buffers: list[bytes | memoryview] = []
        written: list[tuple[memoryview, int, int, int]] = []  # header, normal, zero, size
        size = 0
        for index in range(job.start, job.stop):
            plan.fill(packet, index)
            body: Sequence[memoryview | bytes] = packet.runs
            body_size = packet.normal * PAGE_SIZE
            compressed = self.compressor is not None and packet.normal > 0
            if compressed:
                body, body_size = self._compress(packet)
            if buffers and len(buffers) + 1 + len(body) > _IOV_MAX:
                self._write_packets(buffers, size, written)
                buffers, written, size = [], [], 0
            header = packet.header
            stamp_header(
                header,
                flags=self.owner.flag,
                normal_pages=packet.normal,
                zero_pages=packet.zero,
                next_packet_size=body_size,
                packet_num=number,
            )
            number += 1
            buffers.append(header)
            buffers.extend(body)
            size += PACKET_HEADER_SIZE + body_size
            written.append((header, packet.normal, packet.zero, PACKET_HEADER_SIZE + body_size))
            if compressed:
                # Written at once: the payload may be a view of the compressor's buffer,
                # which the next packet overwrites. (The fallback's payloads are fresh
                # allocations: held for a whole job, every job faulted in new pages, twice
                # the sender's system time; freed now, the next one reuses their memory.)
                self._write_packets(buffers, size, written)
                buffers, written, size = [], [], 0
                del body
        if buffers:
            self._write_packets(buffers, size, written)
        packet.clear()

    def _write_packets(
        self,
        buffers: Sequence[bytes | memoryview],
        size: int,
        packets: Sequence[tuple[memoryview, int, int, int]],
    ) -> None:
        self._write(buffers, size)
        for header, normal, zero, packet_size in packets:
            self.counters.count(pages=normal, zero_pages=zero, sync=False, size=packet_size)
            self._trace(header)

    def _compress(self, batch: Batch) -> tuple[Sequence[memoryview | bytes], int]:
        """The packet's payload, in the pieces the compressor made, and its size."""
        assert self.compressor is not None
        assert batch.block is not None
        runs = batch.runs  # the runs of pages with data
        if self.compressor.whole_packets:
            # A call per run made two threads compress only 1.1-1.25x as fast as one.
            runs = data_in_one_buffer(batch, self.gathered)
        parts = self.compressor.compress_parts(runs)
        size = sum(len(part) for part in parts)
        if size > MAX_COMPRESSED_PAYLOAD:
            raise ConfigError(
                f"{self.name}: compressed payload of {size} bytes exceeds "
                f"{MAX_COMPRESSED_PAYLOAD} bytes"
            )
        return parts, size

    def _write(self, buffers: Sequence[bytes | memoryview], size: int) -> None:
        try:
            write_buffers(self.sock, buffers, size, timeout=self.owner.io_timeout)
        except OSError as exc:
            raise channel_error(exc, self.name, "write", self.owner.io_timeout) from exc

    def _trace(self, header: bytes | memoryview) -> None:
        if self.owner.trace is not None:
            # Decoded from the bytes just written, and only for a hook: the hot path builds
            # no packet objects.
            packet = RamPacket.unpack(header, channel=self.name)
            emit(self.owner.trace, "send", self.name, packet=packet)


def greet(sock: socket.socket, index: int, uuid: bytes, *, timeout: float) -> None:
    """Write the init packet of channel ``index``, as a source does as soon as the channel
    is connected: a QEMU destination reads it before it takes the next connection, and over
    TLS that includes the next handshake (see :class:`Sender`'s ``greeted``).

    Raises:
        ChannelError: the write failed, naming the channel.
    """
    init = InitPacket(index, uuid).pack()
    send_all(sock, [init], channel=multifd_channel(index), timeout=timeout)


class Sender(Stoppable):
    """The multifd channels of a migration source (QEMU ``multifd_send_state``).

    The sender takes ownership of the sockets: it shuts them down and closes them in
    :meth:`close`. One thread (the requester) calls :meth:`send_pages` and :meth:`sync`;
    :meth:`close`, :meth:`abort`, :meth:`stats` and the properties may be called from any
    thread.

    Args:
        channels: one connected socket per multifd channel; channel ``i`` uses ``channels[i]``.
        uuid: the 16-byte UUID sent in every init packet (QEMU's ``-uuid``).
        compression: ``"none"``, ``"zlib"`` or ``"zstd"``.
        level: the compression level (None for the method's default).
        detect_zero_pages: list all-zero pages in ``zero_pages`` instead of sending their
            data (QEMU 9.0+ ``zero-page-detection=multifd``).
        trace: called with every packet after it was written.
        io_timeout: seconds a socket write may block before the channel fails.
        name: logger and thread name prefix (loggers are ``multifd.<name>.chN``).
        packets_per_job: at most this many packets are handed to a channel at once (each
            still a packet of at most 128 pages with its own header); None for 4, or 16
            with compression.
        greeted: every channel's init packet was written already (:func:`greet`); the
            threads then start with the pages.
    """

    def __init__(
        self,
        channels: Sequence[socket.socket],
        *,
        uuid: bytes = NIL_UUID,
        compression: str = "none",
        level: int | None = None,
        detect_zero_pages: bool = False,
        trace: TraceHook | None = None,
        io_timeout: float = 30.0,
        name: str = "send",
        packets_per_job: int | None = None,
        greeted: bool = False,
    ) -> None:
        if not channels:
            raise ConfigError("a Sender needs at least one channel")
        try:
            InitPacket(len(channels) - 1, uuid).validate(channel="local")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        # Immutable after construction.
        self.uuid = uuid
        self.compression = compression
        self.flag = flag_of(compression)  # method bits of packets with pages
        self.level = level
        self.detect_zero_pages = detect_zero_pages
        self.trace = trace
        self.io_timeout = io_timeout
        self.name = name
        self.greeted = greeted
        if packets_per_job is None:
            compressed = compression != "none"
            packets_per_job = COMPRESSED_PACKETS_PER_JOB if compressed else PACKETS_PER_JOB
        if packets_per_job < 1:
            raise ConfigError(f"packets_per_job must be at least 1, not {packets_per_job}")
        self.packets_per_job = packets_per_job
        self.log = logging.getLogger(f"multifd.{name}")
        self.channels_ready = Semaphore()  # a channel finished a job or started
        self._num_lock = threading.Lock()  # guards _packet_num
        self._packet_num = 0
        self.shutdown = Shutdown(f"multifd {name}", self.log)
        self._channels = [_SendChannel(self, i, sock) for i, sock in enumerate(channels)]
        for channel in self._channels:
            set_io_timeout(channel.sock, io_timeout)
            self.shutdown.add(channel.sock, channel.thread, channel.sem, channel.sem_sync)
        self.shutdown.add_semaphore(self.channels_ready)
        # Owned by the requester: the empty job it fills and swaps in, and the pages of
        # the last partial batch, held back until more pages of the same block or a sync.
        self._job = Job()
        self._held: Offsets = np.empty(PAGES_PER_PACKET, dtype=np.int64)
        self._held_count = 0
        self._held_block: RamBlock | None = None
        self._next_channel = 0
        self._started = False

    # -- public API ------------------------------------------------------------------------
    def start(self) -> None:
        """Start one thread per channel; each first writes its init packet."""
        if self._started:
            raise ConfigError("Sender.start() called twice")
        self._started = True
        for channel in self._channels:
            channel.thread.start()

    def send_pages(self, block: RamBlock, offsets: npt.ArrayLike) -> None:
        """Queue pages of ``block`` (byte offsets) for sending.

        Full batches go to the next idle channel at once; a partial batch waits for more
        pages of the same block, or for :meth:`sync`.

        Raises:
            MigrationFailed: a channel failed or the sender was closed.
            ValueError: an offset is not a page of ``block``.
        """
        self.shutdown.raise_if_stopped()
        # A copy: the channels read the offsets after this returns.
        offs = np.array(offsets, dtype=np.int64).reshape(-1)
        if not len(offs):
            return
        _check_offsets(block, offs)
        if self._held_count and self._held_block is not block:
            self._flush()
        offs = self._hold(block, offs)
        if len(offs):
            self._hand_over(PacketPlan(block, offs, detect_zero_pages=self.detect_zero_pages))

    def sync(self) -> None:
        """Flush the partial batch and write one SYNC packet on every channel.

        Returns only after every SYNC packet was written to its socket; the caller then
        writes the matching marker on the main channel.

        Raises:
            MigrationFailed: a channel failed or the sender was closed.
        """
        self.shutdown.raise_if_stopped()
        if self._held_count:
            self._flush()
        for channel in self._channels:
            channel.request(SendEvent.REQUEST_SYNC)
        for channel in self._channels:
            self._wait(channel.sem_sync, channel)  # paired with POST_SEM_SYNC

    def stats(self) -> tuple[ChannelCounters, ...]:
        """A snapshot of every channel's counters, in channel order."""
        return tuple(channel.counters.snapshot() for channel in self._channels)

    # -- for the channel threads -----------------------------------------------------------
    def next_packet_num(self) -> int:
        return self.next_packet_nums(1)

    def next_packet_nums(self, count: int) -> int:
        """Reserve ``count`` consecutive packet numbers; returns the first."""
        with self._num_lock:
            first = self._packet_num + 1
            self._packet_num += count
            return first

    def fail(self, exc: BaseException, channel: str | None) -> None:
        self.shutdown.fail(exc, channel)

    # -- the requester's side of the handshake ---------------------------------------------
    def _hold(self, block: RamBlock, offsets: Offsets) -> Offsets:
        """The held pages then ``offsets``, cut to whole batches; the rest is held back."""
        held = self._held_count
        if held:
            offsets = np.concatenate((self._held[:held], offsets))
        whole = len(offsets) - len(offsets) % PAGES_PER_PACKET
        self._held_count = len(offsets) - whole
        self._held[: self._held_count] = offsets[whole:]
        self._held_block = block
        return offsets[:whole]

    def _flush(self) -> None:
        """Hand the held partial batch over as one packet."""
        assert self._held_block is not None, "held pages always name their block"
        offsets = self._held[: self._held_count].copy()
        self._held_count = 0
        plan = PacketPlan(self._held_block, offsets, detect_zero_pages=self.detect_zero_pages)
        self._hand_over(plan)

    def _hand_over(self, plan: PacketPlan) -> None:
        """Give the packets of ``plan``, in order, to the next idle channels, a job each."""
        index, count = 0, len(plan)
        while index < count:
            channel = self._idle_channel()
            stop = index + job_size(count - index, len(self._channels), self.packets_per_job)
            job = self._job
            job.plan, job.start, job.stop = plan, index, stop
            with channel.lock:
                # Swap ownership: the channel gets the full job, we get its empty one.
                channel.job, self._job = job, channel.job
                channel.state, action = send_step(channel.state, SendEvent.HAND_JOB)
            channel.perform(action)
            index = stop

    def _idle_channel(self) -> _SendChannel:
        self._wait(self.channels_ready, None)  # paired with POST_CHANNELS_READY
        count = len(self._channels)
        for k in range(count):
            channel = self._channels[(self._next_channel + k) % count]
            if not channel.state.pending_job:
                self._next_channel = (channel.index + 1) % count
                return channel
        raise AssertionError("channels_ready was posted but no channel is idle")

    def _wait(self, sem: Semaphore, channel: _SendChannel | None) -> None:
        if not self._started:
            raise ConfigError("Sender.start() was not called")
        while not sem.acquire(timeout=_POLL):
            self.shutdown.raise_if_stopped()
            dead = [c.name for c in self._channels if not c.thread.is_alive()]
            if dead and (channel is None or channel.name in dead):
                self.shutdown.fail(RuntimeError(f"send threads exited: {dead}"), dead[0])
        self.shutdown.raise_if_stopped()


def job_size(left: int, channels: int, per_job: int) -> int:
    """Packets in the next job when ``left`` remain: up to ``per_job``, but never more than
    an even share of what is left, so that every channel gets work at the end of a plan."""
    return max(1, min(per_job, left // channels))


def _check_offsets(block: RamBlock, offsets: Offsets) -> None:
    if int(offsets.min()) < 0 or int(offsets.max()) > block.size - PAGE_SIZE:
        raise ValueError(f"offset outside block {block.name!r} of {block.size:#x} bytes")
    if (offsets & (PAGE_SIZE - 1)).any():
        raise ValueError(f"offset not a multiple of {PAGE_SIZE} in block {block.name!r}")
