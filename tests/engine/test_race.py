"""The pending_sync race of QEMU < 9.0 (spec 6.4), forced deterministically.

A page job and a sync request both reach a channel before its thread wakes up. With a
per-channel *counter* of pending work (QEMU < 9.0) the thread saw ``pending_job == 2`` and
one wake-up took both: it sent the pages in a packet that also carried the SYNC flag, posted
``sem_sync`` (so the marker could overtake the rest) and then sent a second, empty packet
with flags 0. With two independent flags the thread serves the job first and then the sync:
a page packet without SYNC, then a SYNC packet without pages, and ``sync()`` returns only
after both are on the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from multifd.engine import handshake
from multifd.engine.handshake import SendAction, SendEvent, SendState
from multifd.engine.send import Sender
from multifd.engine.shutdown import Semaphore
from multifd.errors import multifd_channel
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import MULTIFD_FLAG_SYNC, PAGE_SIZE, PAGES_PER_PACKET
from tests.engine.helpers import TIMEOUT, Recorder, link


class GatedSemaphore(Semaphore):
    """A semaphore whose ``acquire`` cannot succeed before ``release`` was called ``hold`` times.

    It holds a channel thread back, without sleeping, until the test has posted both the
    page job and the sync request; ``on_open`` runs in the thread when it gets through.
    """

    def __init__(self, hold: int, on_open: Callable[[], None]) -> None:
        super().__init__()
        self._gate = threading.Condition()  # guards _releases; signals each release
        self._releases = 0
        self._hold = hold
        self._on_open = on_open
        self._opened = False  # touched by the one thread that acquires

    def release(self) -> None:
        with self._gate:
            self._releases += 1
            self._gate.notify_all()
        super().release()

    def acquire(self, timeout: float) -> bool:
        with self._gate:
            if not self._gate.wait_for(lambda: self._releases >= self._hold, timeout):
                return False
        got = super().acquire(timeout)
        if got and not self._opened:
            self._opened = True
            self._on_open()
        return got


def test_job_and_sync_posted_before_the_thread_wakes_give_two_clean_packets() -> None:
    """Hand a batch over, request a sync, and only then let the channel thread wake.

    A counter-based handshake fails this: the thread would find two units of pending work
    and a SYNC flag set at its first wake-up, write the pages in a packet flagged SYNC,
    post ``sem_sync`` (letting ``sync()`` return and the marker go out) and then write an
    empty flag-0 packet after the marker. The flags here must give pages, SYNC, marker.
    """
    src = RamBlock.anonymous("mem", 2 * PAGES_PER_PACKET * PAGE_SIZE)
    src.pages[:] = 0x5A
    dst = Ram([RamBlock.anonymous("mem", src.size)])
    recorder = Recorder()
    seen: list[SendState] = []

    def gate(sender: Sender) -> None:
        # The thread cannot take a wake-up before two posts arrived: HAND_JOB, REQUEST_SYNC.
        channel = sender._channels[0]
        channel.sem = GatedSemaphore(2, on_open=lambda: seen.append(channel.state))
        sender.shutdown.add_semaphore(channel.sem)  # so that close() wakes it too

    with link(dst, 1, recorder=recorder, before_start=gate) as (sender, receiver, _):
        channel = sender._channels[0]
        sender.send_pages(src, np.arange(PAGES_PER_PACKET) * PAGE_SIZE)  # full: handed over
        assert channel.state == SendState(pending_job=True, pending_sync=False)
        sender.sync()  # REQUEST_SYNC opens the gate; returns after both packets are written
        recorder.marker()
        receiver.wait_sync(TIMEOUT)
    assert seen == [SendState(pending_job=True, pending_sync=True)]  # the race window was hit
    name = multifd_channel(0)
    events = [e for e in recorder.sent() if e.channel in (name, "main")]
    assert [(e.packet.flags, e.packet.normal_pages) if e.packet else e.record for e in events] == [
        (0, PAGES_PER_PACKET),  # the pages, without SYNC
        (MULTIFD_FLAG_SYNC, 0),  # then the SYNC, without pages
        "MULTIFD_FLUSH",  # and the marker only after both
    ]
    assert bytes(dst["mem"].view[: PAGES_PER_PACKET * PAGE_SIZE]) == bytes(
        src.view[: PAGES_PER_PACKET * PAGE_SIZE]
    )


# --- the same scenario through the tables -------------------------------------------------


@dataclass(frozen=True)
class CounterState:
    """QEMU < 9.0: a counter of pending work, a batch, and a SYNC flag in ``p->flags``."""

    pending: int = 0
    has_pages: bool = False
    sync_flag: bool = False


@dataclass(frozen=True)
class Packet:
    sync: bool
    pages: bool


def counter_table(
    limit: int = 3,
) -> Mapping[tuple[CounterState, SendEvent], tuple[CounterState, object]]:
    """The pre-9.0 handshake as a table: both requests increment one counter."""
    table: dict[tuple[CounterState, SendEvent], tuple[CounterState, object]] = {}
    for pending in range(limit):
        for has_pages in (False, True):
            for sync_flag in (False, True):
                state = CounterState(pending, has_pages, sync_flag)
                if pending + 1 < limit:
                    table[state, SendEvent.HAND_JOB] = (
                        replace(state, pending=pending + 1, has_pages=True),
                        SendAction.POST_SEM,
                    )
                    table[state, SendEvent.REQUEST_SYNC] = (
                        replace(state, pending=pending + 1, sync_flag=True),
                        SendAction.POST_SEM,
                    )
                if pending:
                    # One wake-up sends whatever is there, with whatever flags are set.
                    table[state, SendEvent.WAKE] = (
                        CounterState(pending - 1),
                        Packet(sync=sync_flag, pages=has_pages),
                    )
    return table


def test_counter_handshake_merges_job_and_sync_into_a_sync_packet_with_pages() -> None:
    table = counter_table()
    state = CounterState()
    packets = []
    for event in (SendEvent.HAND_JOB, SendEvent.REQUEST_SYNC, SendEvent.WAKE, SendEvent.WAKE):
        state, action = handshake.step(state, event, table=table)
        if isinstance(action, Packet):
            packets.append(action)
    # A SYNC that carries the pages, then an empty packet: what QEMU 7.2 put on the wire.
    assert packets == [Packet(sync=True, pages=True), Packet(sync=False, pages=False)]


def test_flag_handshake_keeps_job_and_sync_apart() -> None:
    state = handshake.SEND_INITIAL
    actions = []
    for event in (
        SendEvent.HAND_JOB,
        SendEvent.REQUEST_SYNC,
        SendEvent.WAKE,
        SendEvent.PAGES_SENT,
        SendEvent.WAKE,
        SendEvent.SYNC_SENT,
    ):
        state, action = handshake.step(state, event)
        actions.append(action)
    assert actions == [
        SendAction.POST_SEM,
        SendAction.POST_SEM,
        SendAction.SEND_PAGES,
        SendAction.POST_CHANNELS_READY,
        SendAction.SEND_SYNC,
        SendAction.POST_SEM_SYNC,
    ]
    assert state == handshake.SEND_INITIAL
