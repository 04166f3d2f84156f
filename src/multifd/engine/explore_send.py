"""The send-side handshake as a model: one requester and N channel threads over a table.

The model takes the steps :mod:`multifd.engine.send` takes, each atomic step being one
lock region or one semaphore operation, and takes every decision through the design's
table (for our design :data:`~multifd.engine.handshake.SEND_TABLE` itself):

* requester, ``send_pages()`` of one batch (job ``Jn``): acquire ``channels_ready``; read
  the channels' ``pending_job`` one at a time, round-robin from the channel after the last
  one used, until one is idle; ``HAND_JOB`` on it (swapping the batch in); post what the
  table says (its ``sem``).
* requester, ``sync()`` (sync ``Sn``): ``REQUEST_SYNC`` then the post, channel by channel;
  then acquire each channel's ``sem_sync`` in order.
* channel thread: write the init packet and post ``channels_ready``; then loop: acquire
  ``sem``; step ``WAKE``; write the packet the action names; step the event the write
  ends with (``PAGES_SENT``, ``SYNC_SENT``); post what the table says.

A design is the table plus what its actions do (:class:`Write` a packet, or post
semaphores), so the old counter-based handshake and deliberately broken tables run
through the same model. Every request handed to a channel is remembered in order; each
packet written is checked against it:

* I1: a SYNC packet carries no pages;
* I2: no packet is neither SYNC nor pages;
* I3: each channel writes exactly what it was asked for, in order: one SYNC per sync
  request, after every job handed to it before the request (checked at every write and,
  for lost work, at the end);
* WAITER: when ``sync()`` takes a channel's ``sem_sync``, that channel has written
  everything it was asked for, its SYNC included (so nothing can follow the marker);
* DEADLOCK: when nobody can move, the requester has returned and no request is pending;
* NO_IDLE: ``channels_ready`` never lets the requester find no idle channel (the
  engine's assertion);
* ILLEGAL / OVERWRITE: the table refuses an event; a batch is handed over another one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, fields
from typing import Final, Generic, NamedTuple, TypeVar

from multifd.engine.explore_core import Finding, Move, Result, Step, search
from multifd.engine.explore_designs import Packet, Post, SendDesign, Write
from multifd.engine.handshake import SendEvent
from multifd.errors import multifd_channel

S = TypeVar("S", bound=Hashable)
A = TypeVar("A", bound=Hashable)


# --- the model ----------------------------------------------------------------------------


class Thread(enum.Enum):
    """Where a channel thread is, when it is not about to write, step or post."""

    __hash__ = object.__hash__  # as in handshake.SendEvent

    START = "start"  # about to write its init packet and post channels_ready
    WAIT = "wait"  # waiting on its sem
    WOKEN = "woken"  # acquired its sem, about to step WAKE


Doing = Thread | Write | SendEvent | tuple[Post, ...]  # a write, an event to step, or posts


class Chan(NamedTuple, Generic[S]):
    """One channel: its handshake state, its semaphores, its thread and its output."""

    state: S
    sem: int
    sem_sync: int
    doing: Doing  # the thread's next step
    batch: int | None  # the job the channel holds
    asked: tuple[Packet, ...]  # every request handed to it, as the packet it must become
    wrote: tuple[Packet, ...]  # every packet it wrote


class Req(enum.Enum):
    """Where the requester is."""

    __hash__ = object.__hash__  # as in handshake.SendEvent

    IDLE = "idle"  # between calls
    READY = "ready"  # send_pages(): waiting on channels_ready
    SCAN = "scan"  # send_pages(): about to read the arg-th channel after next_channel
    HAND = "hand"  # send_pages(): HAND_JOB on channel arg
    HAND_POST = "hand_post"  # send_pages(): posting what HAND_JOB returned
    REQUEST = "request"  # sync(): REQUEST_SYNC on channel arg
    REQUEST_POST = "request_post"  # sync(): posting what REQUEST_SYNC returned
    WAIT = "wait"  # sync(): waiting on the sem_sync of channel arg
    DONE = "done"  # returned for good


class World(NamedTuple, Generic[S]):
    """The whole state: the requester, channels_ready and the channels."""

    req: Req
    arg: int  # the channel (or, in SCAN, the channels read) the next step is about
    posts: tuple[Post, ...]  # what the requester's last table step asked it to post
    jobs: int  # jobs handed so far: the next is J<jobs>
    syncs: int  # sync() calls completed: the current one is S<syncs>
    ready: int  # channels_ready
    next_channel: int  # where the round-robin scan starts
    chans: tuple[Chan[S], ...]


class Label(NamedTuple):
    """A step, kept cheap; :meth:`SendModel.render` turns the few reported into words."""

    actor: int  # a channel index, or REQUESTER
    event: str  # a SendEvent name or CALL, RETURN, ACQUIRE, SCAN, POST, START, WRITE
    chan: int = -1  # the channel the step is about
    what: object = None  # job/sync number, packet, posts, semaphore name, busy flag
    before: object = None  # the state before a table step
    after: object = None  # the state after it
    action: object = None  # the action it returned


REQUESTER: Final = -1


@dataclass(frozen=True)
class SendWorkload:
    """What the requester does: a fixed program of ``J``/``S``, or any order within bounds.

    Args:
        channels: the number of channels.
        jobs: at most this many page jobs (without a program).
        syncs: at most this many sync() calls (without a program).
        program: e.g. ``"JJSJS"``; None explores every order, and every prefix, at once.
    """

    channels: int
    jobs: int = 4
    syncs: int = 2
    program: str | None = None

    def __str__(self) -> str:
        if self.program is not None:
            return f"{self.channels} ch, {self.program}"
        return f"{self.channels} ch, <={self.jobs} J, <={self.syncs} S, any order"


SendMove = Move[World[S], Label]


class SendModel(Generic[S, A]):
    """The requester and the channel threads of ``design`` running ``workload``."""

    def __init__(self, design: SendDesign[S, A], workload: SendWorkload) -> None:
        self.design = design
        self.workload = workload
        self.names = [multifd_channel(i) for i in range(workload.channels)]
        self.coverage: set[tuple[S, SendEvent]] = set()  # table entries stepped
        self.outputs: set[tuple[tuple[Packet, ...], ...]] = set()  # of runs without deadlock

    def initial(self) -> World[S]:
        chan = Chan(self.design.initial, 0, 0, Thread.START, None, (), ())
        return World(Req.IDLE, 0, (), 0, 0, 0, 0, (chan,) * self.workload.channels)

    def moves(self, world: World[S]) -> Iterator[SendMove[S]]:
        yield from self._requester(world)
        for index in range(len(world.chans)):
            move = self._thread(world, index)
            if move is not None:
                yield move

    def _step(self, state: S, event: SendEvent) -> tuple[S, A] | None:
        found = self.design.table.get((state, event))
        if found is not None:
            self.coverage.add((state, event))
        return found

    def _illegal(self, label: Label) -> SendMove[S]:
        text = f"{self.names[label.chan]}: {label.event} is not allowed in {label.before}"
        return Move(label, None, (Finding("ILLEGAL", text),))

    # -- the requester ---------------------------------------------------------------------
    def _requester(self, world: World[S]) -> Iterator[SendMove[S]]:
        req = world.req
        if req is Req.IDLE:
            yield from self._call(world)
        elif req is Req.READY:
            if world.ready:
                label = Label(REQUESTER, "ACQUIRE", what="channels_ready")
                yield Move(label, world._replace(req=Req.SCAN, arg=0, ready=world.ready - 1))
        elif req is Req.SCAN:
            yield self._scan(world)
        elif req is Req.HAND or req is Req.REQUEST:
            yield self._request(world)
        elif req is Req.HAND_POST or req is Req.REQUEST_POST:
            yield self._requester_post(world)
        elif req is Req.WAIT:
            yield from self._wait_sync(world)

    def _call(self, world: World[S]) -> Iterator[SendMove[S]]:
        program = self.workload.program
        if program is not None:
            done = world.jobs + world.syncs
            ops = program[done : done + 1]
        else:
            ops = "J" * (world.jobs < self.workload.jobs)
            ops += "S" * (world.syncs < self.workload.syncs)
        for op in ops:
            if op == "J":
                label = Label(REQUESTER, "CALL", what=f"J{world.jobs}")
                yield Move(label, world._replace(req=Req.READY))
            else:
                label = Label(REQUESTER, "CALL", what=f"S{world.syncs}")
                yield Move(label, world._replace(req=Req.REQUEST, arg=0))
        if program is None:
            yield Move(Label(REQUESTER, "RETURN"), world._replace(req=Req.DONE))

    def _scan(self, world: World[S]) -> SendMove[S]:
        count = len(world.chans)
        if world.arg == count:
            text = "channels_ready was posted but no channel is idle"
            return Move(Label(REQUESTER, "SCAN"), None, (Finding("NO_IDLE", text),))
        index = (world.next_channel + world.arg) % count
        if self.design.has_job(world.chans[index].state):
            label = Label(REQUESTER, "SCAN", index, what=True)
            return Move(label, world._replace(arg=world.arg + 1))
        after = world._replace(req=Req.HAND, arg=index, next_channel=(index + 1) % count)
        return Move(Label(REQUESTER, "SCAN", index, what=False), after)

    def _request(self, world: World[S]) -> SendMove[S]:
        """HAND_JOB or REQUEST_SYNC on channel ``world.arg``, under the channel's lock."""
        index, chan = world.arg, world.chans[world.arg]
        job = world.req is Req.HAND
        event = SendEvent.HAND_JOB if job else SendEvent.REQUEST_SYNC
        label = Label(REQUESTER, event.name, index, world.jobs if job else world.syncs, chan.state)
        found = self._step(chan.state, event)
        if found is None:
            return self._illegal(label)
        state, action = found
        findings: tuple[Finding, ...] = ()
        if not job:
            chan = chan._replace(state=state, asked=(*chan.asked, Packet(sync=True, job=None)))
        else:
            if chan.batch is not None:
                text = f"J{world.jobs} was handed to {self.names[index]} over J{chan.batch}"
                findings = (Finding("OVERWRITE", text),)
            asked = (*chan.asked, Packet(sync=False, job=world.jobs))
            chan = chan._replace(state=state, batch=world.jobs, asked=asked)
        effect = self.design.effects[action]
        after = world._replace(
            req=Req.HAND_POST if job else Req.REQUEST_POST,
            posts=() if isinstance(effect, Write) else effect,
            jobs=world.jobs + job,
            chans=_put(world.chans, index, chan),
        )
        return Move(label._replace(after=state, action=action), after, findings)

    def _requester_post(self, world: World[S]) -> SendMove[S]:
        index = world.arg
        after = _post(world, index, world.posts)._replace(posts=())
        if world.req is Req.HAND_POST:
            after = after._replace(req=Req.IDLE, arg=0)
        elif index + 1 < len(world.chans):
            after = after._replace(req=Req.REQUEST, arg=index + 1)
        else:
            after = after._replace(req=Req.WAIT, arg=0)
        return Move(Label(REQUESTER, "POST", index, world.posts), after)

    def _wait_sync(self, world: World[S]) -> Iterator[SendMove[S]]:
        index, chan = world.arg, world.chans[world.arg]
        if not chan.sem_sync:
            return
        findings: tuple[Finding, ...] = ()
        if chan.wrote != chan.asked:
            text = (
                f"sync() took the sem_sync of {self.names[index]}, which has written "
                f"{_packets(chan.wrote)} of {_packets(chan.asked)}"
            )
            findings = (Finding("WAITER", text),)
        chans = _put(world.chans, index, chan._replace(sem_sync=chan.sem_sync - 1))
        if index + 1 < len(chans):
            after = world._replace(arg=index + 1, chans=chans)
        else:
            after = world._replace(req=Req.IDLE, arg=0, syncs=world.syncs + 1, chans=chans)
        yield Move(Label(REQUESTER, "ACQUIRE", index, "sem_sync"), after, findings)

    # -- the channel threads ---------------------------------------------------------------
    def _thread(self, world: World[S], index: int) -> SendMove[S] | None:
        doing = world.chans[index].doing
        if isinstance(doing, Thread):
            return self._thread_wait(world, index, doing)
        if isinstance(doing, Write):
            return self._write(world, index, doing)
        if isinstance(doing, SendEvent):
            return self._thread_step(world, index, doing)
        after = _post(world, index, doing)
        chan = after.chans[index]._replace(doing=Thread.WAIT)
        label = Label(index, "POST", index, doing)
        return Move(label, after._replace(chans=_put(after.chans, index, chan)))

    def _thread_wait(self, world: World[S], index: int, doing: Thread) -> SendMove[S] | None:
        chan = world.chans[index]
        if doing is Thread.WOKEN:
            return self._thread_step(world, index, SendEvent.WAKE)
        if doing is Thread.START:
            chans = _put(world.chans, index, chan._replace(doing=Thread.WAIT))
            after = world._replace(ready=world.ready + 1, chans=chans)
            return Move(Label(index, "START", index), after)
        if not chan.sem:
            return None
        chan = chan._replace(sem=chan.sem - 1, doing=Thread.WOKEN)
        label = Label(index, "ACQUIRE", index, "sem")
        return Move(label, world._replace(chans=_put(world.chans, index, chan)))

    def _thread_step(self, world: World[S], index: int, event: SendEvent) -> SendMove[S]:
        """A table step of the thread, under the channel's lock."""
        chan = world.chans[index]
        label = Label(index, event.name, index, before=chan.state)
        found = self._step(chan.state, event)
        if found is None:
            return self._illegal(label)
        state, action = found
        effect = self.design.effects[action]
        chan = chan._replace(state=state, doing=effect if effect else Thread.WAIT)
        after = world._replace(chans=_put(world.chans, index, chan))
        return Move(label._replace(after=state, action=action), after)

    def _write(self, world: World[S], index: int, write: Write) -> SendMove[S]:
        chan = world.chans[index]
        packet = Packet(sync=write.sync, job=chan.batch if write.batch else None)
        findings = self._check_packet(index, chan, packet)
        # The batch is cleared with the write: the engine clears it before the *_SENT step.
        chan = chan._replace(
            doing=write.then,
            batch=None if write.batch else chan.batch,
            wrote=(*chan.wrote, packet),
        )
        after = world._replace(chans=_put(world.chans, index, chan))
        return Move(Label(index, "WRITE", index, packet), after, findings)

    def _check_packet(self, index: int, chan: Chan[S], packet: Packet) -> tuple[Finding, ...]:
        name = self.names[index]
        findings = []
        if packet.sync and packet.job is not None:
            findings.append(Finding("I1", f"{name} wrote a SYNC packet that carries pages"))
        if not packet.sync and packet.job is None:
            findings.append(Finding("I2", f"{name} wrote a packet that is neither SYNC nor pages"))
        count = len(chan.wrote)
        if count >= len(chan.asked) or chan.asked[count] != packet:
            text = f"{name} wrote {packet} after {_packets(chan.wrote)}"
            text += f"; asked for {_packets(chan.asked)}"
            findings.append(Finding("I3", text))
        return tuple(findings)

    # -- the end ---------------------------------------------------------------------------
    def at_end(self, world: World[S]) -> tuple[Finding, ...]:
        findings = []
        if world.req is Req.READY:
            findings.append(Finding("DEADLOCK", "the requester waits on channels_ready forever"))
        elif world.req is Req.WAIT:
            name = self.names[world.arg]
            findings.append(Finding("DEADLOCK", f"sync() waits on the sem_sync of {name} forever"))
        for name, chan in zip(self.names, world.chans, strict=True):
            if chan.state != self.design.initial or chan.batch is not None:
                state = self.design.show(chan.state)
                text = f"{name} is left in {state} holding {chan.batch} with nobody to serve it"
                findings.append(Finding("DEADLOCK", text))
            if chan.wrote != chan.asked:
                text = f"{name} wrote {_packets(chan.wrote)}; asked for {_packets(chan.asked)}"
                findings.append(Finding("I3", text))
        if all(f.kind != "DEADLOCK" for f in findings):
            self.outputs.add(tuple(chan.wrote for chan in world.chans))
        return tuple(findings)

    # -- schedules -------------------------------------------------------------------------
    def render(self, label: Label) -> Step:
        """The words for one step of a schedule."""
        if label.actor == REQUESTER:
            return Step("requester", label.event, self._requester_text(label))
        return Step(self.names[label.actor], label.event, self._thread_text(label))

    def _thread_text(self, label: Label) -> str:
        fixed = {
            "START": "writes its init packet, posts channels_ready",
            "ACQUIRE": "acquires its sem",
        }
        if label.event in fixed:
            return fixed[label.event]
        if label.event == "WRITE":
            return f"sends {label.what}"
        if label.event == "POST":
            return self._post_text(label)
        return ("wakes up: " if label.event == "WAKE" else "") + self._step_text(label)

    def _requester_text(self, label: Label) -> str:
        event = label.event
        if event == "POST":
            return self._post_text(label)
        name = self.names[label.chan] if label.chan >= 0 else ""
        if event in {"HAND_JOB", "REQUEST_SYNC"}:
            what = "queues page job J" if event == "HAND_JOB" else "requests sync S"
            return f"{what}{label.what} on {name}: {self._step_text(label)}"
        what = str(label.what)
        texts = {
            "CALL": f"calls {'send_pages()' if what[0] == 'J' else 'sync()'} ({what})",
            "RETURN": "returns for good",
            "ACQUIRE": (
                "acquires channels_ready"
                if what == "channels_ready"
                else f"acquires the sem_sync of {name}"
            ),
            "SCAN": f"{name} {'has a job' if label.what else 'is idle'}"
            if name
            else "finds no idle channel",
        }
        return texts[event]

    def _step_text(self, label: Label) -> str:
        show = self.design.show
        text = show(label.before)  # type: ignore[arg-type]
        if label.after is not None:
            text += f" -> {show(label.after)}"  # type: ignore[arg-type]
        if isinstance(label.action, enum.Enum):
            text += f": {label.action.name}"
        return text

    def _post_text(self, label: Label) -> str:
        posts: tuple[Post, ...] = label.what  # type: ignore[assignment]
        own = self.names[label.chan]
        parts = [p.value if p is Post.CHANNELS_READY else f"the {p.value} of {own}" for p in posts]
        return "posts " + (" and ".join(parts) or "nothing")


def _put(chans: tuple[Chan[S], ...], index: int, chan: Chan[S]) -> tuple[Chan[S], ...]:
    return (*chans[:index], chan, *chans[index + 1 :])


def _post(world: World[S], index: int, posts: tuple[Post, ...]) -> World[S]:
    """``world`` after posting ``posts`` for channel ``index``."""
    chan = world.chans[index]
    ready = world.ready
    for post in posts:
        if post is Post.SEM:
            chan = chan._replace(sem=chan.sem + 1)
        elif post is Post.SEM_SYNC:
            chan = chan._replace(sem_sync=chan.sem_sync + 1)
        else:
            ready += 1
    return world._replace(ready=ready, chans=_put(world.chans, index, chan))


def _packets(packets: tuple[Packet, ...]) -> str:
    return "[" + ", ".join(map(str, packets)) + "]"


@dataclass(frozen=True)
class SendResult(Result):
    """A send-side :class:`~multifd.engine.explore_core.Result` with what the runs did."""

    coverage: frozenset[tuple[Hashable, SendEvent]] = frozenset()  # table entries stepped
    outputs: frozenset[tuple[tuple[Packet, ...], ...]] = frozenset()  # per-channel packets


def explore_send(
    design: SendDesign[S, A],
    workload: SendWorkload,
    *,
    until: Callable[[frozenset[str]], bool] | None = None,
) -> SendResult:
    """Every interleaving of ``design`` running ``workload``; see the module docstring.

    Args:
        design: the table and what its actions do.
        workload: the channel count and what the requester calls.
        until: stops the search early, as in :func:`~multifd.engine.explore_core.search`.

    Returns:
        The result, with the table entries stepped (``coverage``) and the per-channel
        packet sequences of the runs that ended without a deadlock (``outputs``).
    """
    model = SendModel(design, workload)
    result = search(model, f"send {design.name}: {workload}", until=until)
    return SendResult(
        **{f.name: getattr(result, f.name) for f in fields(result)},
        coverage=frozenset(model.coverage),
        outputs=frozenset(model.outputs),
    )
