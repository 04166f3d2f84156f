"""The receive side's two-phase barrier as a model: the loader and N channel threads.

Each channel thread reads a fixed packet sequence (what a sender wrote on that channel)
and takes every decision through :data:`~multifd.engine.handshake.RECV_TABLE`, as
:mod:`multifd.engine.recv` does:

* read the next packet and apply its pages, then step ``PACKET``, ``SYNC`` or ``EOF``
  (one atomic step: the pages are applied before the state changes, and nobody looks at
  them in between; a step in :data:`~multifd.engine.handshake.RECV_QUIET`, which the
  engine takes without the lock, writes nothing, so it is the same step);
* after ``PARK``: wait until the state is no longer ``AT_SYNC_POSTED``, then step
  ``WAKE``;
* after ``EXIT``: stop.

The loader runs ``wait_sync()`` once per marker, then ``finish()``: at a marker it waits
until every channel is ``AT_SYNC_POSTED`` and releases them all (``RELEASE``) in one step
under the barrier's lock, or fails fast if a channel ended its stream; ``finish()`` steps
``FINISH`` on every channel in one step, then waits for every thread to exit.

Properties, in every interleaving:

* BARRIER: the loader passes marker k only when every channel is parked at its k-th SYNC;
* I4: by then every channel has applied exactly the pages it read before that SYNC;
* READ_PAST: no channel reads a packet after its k-th SYNC before the loader passed
  marker k (or called ``finish()``);
* DRAIN: after ``finish()`` every channel reads its stream to the end and exits;
* DEADLOCK: when nobody can move, the loader is done (or failed fast, where the streams
  say it must: a channel ended before its SYNC).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from multifd.engine.explore_core import Finding, Move, Result, Step, search
from multifd.engine.explore_designs import Packet
from multifd.engine.handshake import (
    RECV_INITIAL,
    RECV_TABLE,
    RecvAction,
    RecvEvent,
    RecvState,
)
from multifd.errors import multifd_channel

# A stream item: what one packet is to the receiver.
PAGES: Final = "P"  # pages, no SYNC
SYNC: Final = "S"  # SYNC, no pages
SYNC_PAGES: Final = "SP"  # SYNC with pages (QEMU < 9.0)
EMPTY: Final = "E"  # neither (QEMU < 9.0)
EOF: Final = "EOF"  # clean end of stream

_EVENT: Final = {
    PAGES: RecvEvent.PACKET,
    EMPTY: RecvEvent.PACKET,
    SYNC: RecvEvent.SYNC,
    SYNC_PAGES: RecvEvent.SYNC,
    EOF: RecvEvent.EOF,
}
_HAS_PAGES: Final = frozenset({PAGES, SYNC_PAGES})
_ENDED: Final = frozenset({RecvState.EOF_SEEN, RecvState.DONE})

RecvTable = Mapping[tuple[RecvState, RecvEvent], tuple[RecvState, RecvAction]]


@dataclass(frozen=True)
class RecvWorkload:
    """What the loader and the channels see.

    Args:
        streams: per channel, its packets in order, ending with ``EOF``.
        markers: the markers on the main stream: ``wait_sync()`` calls before ``finish()``.
        may_fail: the streams are short of SYNCs, so the loader must fail fast
            rather than pass every marker.
    """

    streams: tuple[tuple[str, ...], ...]
    markers: int
    may_fail: bool = False

    def __post_init__(self) -> None:
        for stream in self.streams:
            if not stream or stream[-1] != EOF or EOF in stream[:-1]:
                raise ValueError(f"a stream ends with EOF, once: {stream}")

    def __str__(self) -> str:
        streams = " | ".join(" ".join(s) for s in self.streams)
        return f"{len(self.streams)} ch, {self.markers} markers: {streams}"

    @classmethod
    def from_packets(cls, wrote: Sequence[Sequence[Packet]]) -> RecvWorkload:
        """The workload a sender's output makes: a marker per SYNC of channel 0."""
        streams = tuple((*map(_item, packets), EOF) for packets in wrote)
        return cls(streams, markers=sum(p.sync for p in wrote[0]))


def _item(packet: Packet) -> str:
    if packet.sync:
        return SYNC if packet.job is None else SYNC_PAGES
    return EMPTY if packet.job is None else PAGES


class Thread(enum.Enum):
    __hash__ = object.__hash__  # as in handshake.SendEvent

    READ = "read"  # about to read its next packet
    PARKED = "parked"  # waiting until the loader moves it out of AT_SYNC_POSTED
    EXITED = "exited"


class Loader(enum.Enum):
    __hash__ = object.__hash__  # as in handshake.SendEvent

    MARKERS = "markers"  # at its next marker (or at finish() once all are passed)
    JOIN = "join"  # finish() stepped FINISH, waits for every thread to exit
    DONE = "done"
    FAILED = "failed"  # wait_sync() failed fast: a channel ended before its SYNC


class Chan(NamedTuple):
    state: RecvState
    thread: Thread
    read: int  # packets read (the next is stream[read])
    syncs: int  # SYNC packets read
    pages: int  # packets with pages applied


class World(NamedTuple):
    loader: Loader
    passed: int  # markers passed
    finishing: bool  # finish() has stepped FINISH
    chans: tuple[Chan, ...]


class Label(NamedTuple):
    actor: int  # a channel index, or LOADER
    event: str
    what: object = None
    before: object = None
    after: object = None


LOADER: Final = -1
RecvMove = Move[World, Label]


class RecvModel:
    """The loader and the channel threads over ``table`` with ``workload``."""

    def __init__(self, workload: RecvWorkload, table: RecvTable = RECV_TABLE) -> None:
        self.workload = workload
        self.table = table
        self.names = [multifd_channel(i) for i in range(len(workload.streams))]
        # Per channel: the packets with pages before (and in) its k-th SYNC, for each k.
        self.pages_at_sync = [_pages_at_syncs(stream) for stream in workload.streams]

    def initial(self) -> World:
        chan = Chan(RECV_INITIAL, Thread.READ, 0, 0, 0)
        return World(Loader.MARKERS, 0, False, (chan,) * len(self.workload.streams))

    def moves(self, world: World) -> Iterator[RecvMove]:
        move = self._loader(world)
        if move is not None:
            yield move
        for index, chan in enumerate(world.chans):
            if chan.thread is Thread.READ:
                yield self._read(world, index)
            elif chan.thread is Thread.PARKED and chan.state is not RecvState.AT_SYNC_POSTED:
                yield self._wake(world, index)

    # -- the channel threads ---------------------------------------------------------------
    def _read(self, world: World, index: int) -> RecvMove:
        chan = world.chans[index]
        item = self.workload.streams[index][chan.read]
        label = Label(index, "READ", item, chan.state)
        findings: tuple[Finding, ...] = ()
        if chan.syncs > world.passed and not world.finishing:
            text = (
                f"{self.names[index]} read packet {chan.read + 1} ({item}) after its SYNC "
                f"{chan.syncs}, but the loader has passed {world.passed} markers"
            )
            findings = (Finding("READ_PAST", text),)
        found = self.table.get((chan.state, _EVENT[item]))
        if found is None:
            return Move(label, None, (*findings, self._illegal(index, chan.state, item)))
        state, action = found
        thread = {RecvAction.CONTINUE: Thread.READ, RecvAction.PARK: Thread.PARKED}.get(
            action, Thread.EXITED
        )
        chan = Chan(
            state,
            thread,
            chan.read + 1,
            chan.syncs + (_EVENT[item] is RecvEvent.SYNC),
            chan.pages + (item in _HAS_PAGES),
        )
        after = world._replace(chans=_put(world.chans, index, chan))
        return Move(label._replace(after=state), after, findings)

    def _wake(self, world: World, index: int) -> RecvMove:
        chan = world.chans[index]
        label = Label(index, "WAKE", None, chan.state)
        found = self.table.get((chan.state, RecvEvent.WAKE))
        if found is None:
            return Move(label, None, (self._illegal(index, chan.state, "WAKE"),))
        state, action = found
        thread = Thread.READ if action is RecvAction.CONTINUE else Thread.EXITED
        chans = _put(world.chans, index, chan._replace(state=state, thread=thread))
        return Move(label._replace(after=state), world._replace(chans=chans))

    def _illegal(self, index: int, state: RecvState, event: str) -> Finding:
        return Finding("ILLEGAL", f"{self.names[index]}: {event} is not allowed in {state.name}")

    # -- the loader ------------------------------------------------------------------------
    def _loader(self, world: World) -> RecvMove | None:
        if world.loader is Loader.MARKERS:
            if world.passed < self.workload.markers:
                return self._barrier(world)
            return self._finish(world)
        if world.loader is Loader.JOIN and all(c.thread is Thread.EXITED for c in world.chans):
            return Move(Label(LOADER, "JOIN"), world._replace(loader=Loader.DONE))
        return None

    def _barrier(self, world: World) -> RecvMove | None:
        states = [c.state for c in world.chans]
        if all(s is RecvState.AT_SYNC_POSTED for s in states):
            return self._release(world)
        if any(s in _ENDED for s in states):
            findings: tuple[Finding, ...] = ()
            if not self.workload.may_fail:
                text = f"wait_sync() failed at marker {world.passed + 1}: a channel ended"
                findings = (Finding("DEADLOCK", text),)
            return Move(
                Label(LOADER, "FAIL", world.passed), world._replace(loader=Loader.FAILED), findings
            )
        return None

    def _release(self, world: World) -> RecvMove:
        marker = world.passed
        findings = []
        for index, chan in enumerate(world.chans):
            name = self.names[index]
            if chan.syncs != marker + 1:
                text = f"marker {marker + 1} passed with {name} parked at its SYNC {chan.syncs}"
                findings.append(Finding("BARRIER", text))
            elif chan.pages != self.pages_at_sync[index][marker]:
                expected = self.pages_at_sync[index][marker]
                text = (
                    f"marker {marker + 1} passed with {chan.pages} packets of pages applied "
                    f"on {name}; {expected} precede its SYNC"
                )
                findings.append(Finding("I4", text))
        chans = []
        for index, chan in enumerate(world.chans):
            found = self.table.get((chan.state, RecvEvent.RELEASE))
            if found is None:
                findings.append(self._illegal(index, chan.state, "RELEASE"))
                return Move(Label(LOADER, "RELEASE", marker + 1), None, tuple(findings))
            chans.append(chan._replace(state=found[0]))
        after = World(Loader.MARKERS, marker + 1, False, tuple(chans))
        return Move(Label(LOADER, "RELEASE", marker + 1), after, tuple(findings))

    def _finish(self, world: World) -> RecvMove:
        chans = []
        for index, chan in enumerate(world.chans):
            found = self.table.get((chan.state, RecvEvent.FINISH))
            if found is None:
                finding = self._illegal(index, chan.state, "FINISH")
                return Move(Label(LOADER, "FINISH"), None, (finding,))
            chans.append(chan._replace(state=found[0]))
        after = World(Loader.JOIN, world.passed, True, tuple(chans))
        return Move(Label(LOADER, "FINISH"), after)

    # -- the end ---------------------------------------------------------------------------
    def at_end(self, world: World) -> tuple[Finding, ...]:
        if world.loader is Loader.FAILED:
            return ()
        if world.loader is not Loader.DONE:
            waiting = [
                n
                for n, c in zip(self.names, world.chans, strict=True)
                if c.thread is not Thread.EXITED
            ]
            what = "at a marker" if world.loader is Loader.MARKERS else "in finish()"
            text = f"nobody can move; the loader waits {what} for {', '.join(waiting) or 'nothing'}"
            return (Finding("DEADLOCK", text),)
        findings = []
        for name, chan, stream in zip(self.names, world.chans, self.workload.streams, strict=True):
            if chan.read != len(stream) or chan.state is not RecvState.DONE:
                text = (
                    f"{name} stopped in {chan.state.name}, {chan.read}/{len(stream)} packets read"
                )
                findings.append(Finding("DRAIN", text))
        return tuple(findings)

    # -- schedules -------------------------------------------------------------------------
    def render(self, label: Label) -> Step:
        """The words for one step of a schedule."""
        if label.actor == LOADER:
            texts = {
                "RELEASE": f"marker {label.what}: every channel is parked, releases them all",
                "FAIL": f"marker {label.what}: a channel ended, wait_sync() fails",
                "FINISH": "finish(): FINISH on every channel",
                "JOIN": "every thread has exited",
            }
            return Step("loader", label.event, texts[label.event])
        states = f"{_name(label.before)} -> {_name(label.after)}"
        text = f"reads {label.what}" if label.event == "READ" else "wakes up"
        return Step(self.names[label.actor], label.event, f"{text}: {states}")


def _name(state: object) -> str:
    return state.name if isinstance(state, RecvState) else "?"


def _put(chans: tuple[Chan, ...], index: int, chan: Chan) -> tuple[Chan, ...]:
    return (*chans[:index], chan, *chans[index + 1 :])


def _pages_at_syncs(stream: tuple[str, ...]) -> list[int]:
    counts = []
    pages = 0
    for item in stream:
        pages += item in _HAS_PAGES
        if _EVENT[item] is RecvEvent.SYNC:
            counts.append(pages)
    return counts


def explore_recv(workload: RecvWorkload, table: RecvTable = RECV_TABLE) -> Result:
    """Every interleaving of the loader and the channel threads; see the module docstring."""
    return search(RecvModel(workload, table), f"recv: {workload}")
