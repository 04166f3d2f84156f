"""The handshake tables: their entries, and every interleaving of small programs over them.

The explorers here are deliberately small (one send channel; two receive channels); they
enumerate every order in which the requester/loader and the channel threads can take their
steps, driving the very tables the engine threads use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

import pytest

from multifd.engine import handshake
from multifd.engine.handshake import (
    RECV_TABLE,
    SEND_TABLE,
    IllegalTransitionError,
    RecvAction,
    RecvEvent,
    RecvState,
    SendAction,
    SendEvent,
    SendState,
)

# --- send table entries -------------------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True])
def test_wake_serves_the_job_before_the_sync(sync: bool) -> None:
    state = SendState(pending_job=True, pending_sync=sync)
    assert handshake.step(state, SendEvent.WAKE) == (state, SendAction.SEND_PAGES)
    after, action = handshake.step(state, SendEvent.PAGES_SENT)
    assert after == SendState(pending_job=False, pending_sync=sync)  # the sync stays pending
    assert action is SendAction.POST_CHANNELS_READY


def test_wake_with_only_a_sync_sends_the_sync_then_clears_it() -> None:
    state = SendState(pending_job=False, pending_sync=True)
    assert handshake.step(state, SendEvent.WAKE) == (state, SendAction.SEND_SYNC)
    assert handshake.step(state, SendEvent.SYNC_SENT) == (SendState(), SendAction.POST_SEM_SYNC)


def test_wake_without_a_request_does_nothing() -> None:
    assert handshake.step(SendState(), SendEvent.WAKE) == (SendState(), SendAction.NONE)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (SendState(pending_job=True), SendEvent.HAND_JOB),  # a batch is never overwritten
        (SendState(pending_sync=True), SendEvent.HAND_JOB),  # it would overtake the SYNC
        (SendState(pending_sync=True), SendEvent.REQUEST_SYNC),  # one SYNC per marker
        (SendState(), SendEvent.PAGES_SENT),
        (SendState(pending_job=True, pending_sync=True), SendEvent.SYNC_SENT),  # job first
    ],
)
def test_send_table_refuses_what_the_protocol_forbids(state: SendState, event: SendEvent) -> None:
    with pytest.raises(IllegalTransitionError):
        handshake.step(state, event)


def test_send_table_is_pure_data_covering_every_state() -> None:
    states = {state for state, _ in SEND_TABLE}
    assert states == {SendState(j, s) for j in (False, True) for s in (False, True)}
    assert all((state, SendEvent.WAKE) in SEND_TABLE for state in states)
    with pytest.raises(TypeError):
        SEND_TABLE[SendState(), SendEvent.WAKE] = (SendState(), SendAction.NONE)  # type: ignore[index]


# --- send explorer ------------------------------------------------------------------------


@dataclass(frozen=True)
class SendWorld:
    state: SendState = handshake.SEND_INITIAL
    sem: int = 0  # the channel's sem
    sem_sync: int = 0
    channels_ready: int = 1  # posted once by the thread after its init packet
    pc: int = 0  # requester: next operation of its program
    waiting_sync: bool = False  # requester: blocked in sync() on sem_sync
    serving: SendAction = SendAction.NONE  # thread: the write in progress
    wire: tuple[str, ...] = ()


def requester_moves(world: SendWorld, program: tuple[str, ...]) -> list[SendWorld]:
    if world.waiting_sync:
        if world.sem_sync == 0:
            return []
        return [replace(world, sem_sync=world.sem_sync - 1, waiting_sync=False)]
    if world.pc == len(program):
        return []
    if program[world.pc] == "job":
        if world.channels_ready == 0:
            return []
        state, action = handshake.step(world.state, SendEvent.HAND_JOB)
        assert action is SendAction.POST_SEM
        return [
            replace(
                world,
                state=state,
                sem=world.sem + 1,
                pc=world.pc + 1,
                channels_ready=world.channels_ready - 1,
            )
        ]
    state, action = handshake.step(world.state, SendEvent.REQUEST_SYNC)
    assert action is SendAction.POST_SEM
    return [replace(world, state=state, sem=world.sem + 1, pc=world.pc + 1, waiting_sync=True)]


def thread_moves(world: SendWorld) -> list[SendWorld]:
    if world.serving is SendAction.SEND_PAGES:
        state, action = handshake.step(world.state, SendEvent.PAGES_SENT)
        assert action is SendAction.POST_CHANNELS_READY
        return [
            replace(
                world,
                state=state,
                serving=SendAction.NONE,
                wire=(*world.wire, "pages"),
                channels_ready=world.channels_ready + 1,
            )
        ]
    if world.serving is SendAction.SEND_SYNC:
        state, action = handshake.step(world.state, SendEvent.SYNC_SENT)
        assert action is SendAction.POST_SEM_SYNC
        return [
            replace(
                world,
                state=state,
                serving=SendAction.NONE,
                wire=(*world.wire, "sync"),
                sem_sync=world.sem_sync + 1,
            )
        ]
    if world.sem == 0:
        return []
    state, action = handshake.step(world.state, SendEvent.WAKE)
    return [replace(world, state=state, sem=world.sem - 1, serving=action)]


def explore_send(program: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Every wire sequence a complete run can produce; asserts no run gets stuck."""
    seen: set[SendWorld] = set()
    todo = [SendWorld()]
    wires: set[tuple[str, ...]] = set()
    while todo:
        world = todo.pop()
        if world in seen:
            continue
        seen.add(world)
        moves = requester_moves(world, program) + thread_moves(world)
        if not moves:
            assert world.pc == len(program), f"stuck: {world}"
            assert not world.waiting_sync, f"stuck: {world}"
            assert world.sem == 0, f"left over: {world}"
            assert world.state == SendState(), f"left over: {world}"
            wires.add(world.wire)
        todo.extend(moves)
    return wires


@pytest.mark.parametrize(
    "program",
    [
        ("job", "sync"),
        ("job", "job", "sync", "job", "sync"),
        ("sync", "sync", "job", "job", "job", "sync"),
    ],
)
def test_every_interleaving_writes_the_program_in_order(program: tuple[str, ...]) -> None:
    expected = tuple("pages" if op == "job" else "sync" for op in program)
    assert explore_send(program) == {expected}


# --- receive table entries ----------------------------------------------------------------


def test_a_sync_parks_the_channel_until_released() -> None:
    state, action = handshake.step(RecvState.RUNNING, RecvEvent.SYNC)
    assert (state, action) == (RecvState.AT_SYNC_POSTED, RecvAction.PARK)
    state, action = handshake.step(state, RecvEvent.RELEASE)
    assert (state, action) == (RecvState.RELEASED, RecvAction.NOTIFY)
    assert handshake.step(state, RecvEvent.WAKE) == (RecvState.RUNNING, RecvAction.CONTINUE)


def test_after_finish_syncs_are_not_honoured() -> None:
    assert handshake.step(RecvState.DRAINING, RecvEvent.SYNC) == (
        RecvState.DRAINING,
        RecvAction.CONTINUE,
    )


@pytest.mark.parametrize("state", list(RecvState))
def test_finish_is_allowed_in_every_state(state: RecvState) -> None:
    after, _ = handshake.step(state, RecvEvent.FINISH)
    assert after in {RecvState.DRAINING, RecvState.DONE}


@pytest.mark.parametrize("state", [s for s in RecvState if s is not RecvState.AT_SYNC_POSTED])
def test_only_a_parked_channel_can_be_released(state: RecvState) -> None:
    with pytest.raises(IllegalTransitionError):
        handshake.step(state, RecvEvent.RELEASE)


def test_end_of_stream_before_finish_is_remembered() -> None:
    assert handshake.step(RecvState.RUNNING, RecvEvent.EOF) == (RecvState.EOF_SEEN, RecvAction.EXIT)
    assert handshake.step(RecvState.EOF_SEEN, RecvEvent.FINISH)[0] is RecvState.DONE
    assert {s for s, _ in RECV_TABLE} == set(RecvState)


# --- receive explorer ---------------------------------------------------------------------


@dataclass(frozen=True)
class RecvWorld:
    states: tuple[RecvState, ...]
    pcs: tuple[int, ...]  # each thread: next item of its stream
    parked: tuple[bool, ...]  # each thread: waiting after a PARK action
    loader_pc: int = 0
    applied: tuple[int, ...] = ()  # per channel: packets with pages applied so far
    passed: tuple[tuple[int, ...], ...] = ()  # per marker: ``applied`` when the loader passed


_EVENTS = {"P": RecvEvent.PACKET, "S": RecvEvent.SYNC, "EOF": RecvEvent.EOF}


def recv_thread_moves(world: RecvWorld, streams: tuple[tuple[str, ...], ...]) -> list[RecvWorld]:
    moves = []
    for i, state in enumerate(world.states):
        if world.parked[i]:
            if state is RecvState.AT_SYNC_POSTED:
                continue  # still waiting for the loader
            after, action = handshake.step(state, RecvEvent.WAKE)
            assert action is RecvAction.CONTINUE
            moves.append(
                replace(
                    world, states=_set(world.states, i, after), parked=_set(world.parked, i, False)
                )
            )
            continue
        if state in {RecvState.EOF_SEEN, RecvState.DONE}:
            continue  # the thread has exited
        event = _EVENTS[streams[i][world.pcs[i]]]
        after, action = handshake.step(state, event)
        applied = world.applied[i] + (event is RecvEvent.PACKET)
        moves.append(
            replace(
                world,
                states=_set(world.states, i, after),
                pcs=_set(world.pcs, i, world.pcs[i] + 1),
                parked=_set(world.parked, i, action is RecvAction.PARK),
                applied=_set(world.applied, i, applied),
            )
        )
    return moves


def loader_moves(world: RecvWorld, loader: tuple[str, ...]) -> list[RecvWorld]:
    if world.loader_pc == len(loader):
        return []
    if loader[world.loader_pc] == "finish":
        states = tuple(handshake.step(s, RecvEvent.FINISH)[0] for s in world.states)
        return [replace(world, states=states, loader_pc=world.loader_pc + 1)]
    if not all(s is RecvState.AT_SYNC_POSTED for s in world.states):
        return []
    states = tuple(handshake.step(s, RecvEvent.RELEASE)[0] for s in world.states)
    passed = (*world.passed, world.applied)
    return [replace(world, states=states, loader_pc=world.loader_pc + 1, passed=passed)]


T = TypeVar("T")


def _set(values: tuple[T, ...], index: int, value: T) -> tuple[T, ...]:
    return (*values[:index], value, *values[index + 1 :])


def explore_recv(streams: tuple[tuple[str, ...], ...], loader: tuple[str, ...]) -> set[RecvWorld]:
    start = RecvWorld(
        states=(handshake.RECV_INITIAL,) * len(streams),
        pcs=(0,) * len(streams),
        parked=(False,) * len(streams),
        applied=(0,) * len(streams),
    )
    seen: set[RecvWorld] = set()
    todo = [start]
    ends: set[RecvWorld] = set()
    while todo:
        world = todo.pop()
        if world in seen:
            continue
        seen.add(world)
        moves = recv_thread_moves(world, streams) + loader_moves(world, loader)
        if not moves:
            ends.add(world)
        todo.extend(moves)
    return ends


def pages_before_sync(stream: tuple[str, ...], k: int) -> int:
    """Packets with pages that precede the k-th SYNC of ``stream`` (I4 at model level)."""
    syncs = [i for i, item in enumerate(stream) if item == "S"]
    return sum(1 for item in stream[: syncs[k]] if item == "P")


@pytest.mark.parametrize(
    "streams",
    [
        (("P", "S", "P", "P", "S", "EOF"), ("S", "P", "S", "EOF")),
        # QEMU 9.1/9.2: a trailing SYNC without a marker; finish() must free it.
        (("P", "S", "P", "S", "S", "EOF"), ("S", "P", "S", "P", "S", "EOF")),
    ],
    ids=["two-rounds", "trailing-sync"],
)
def test_every_interleaving_pairs_markers_with_syncs_and_ends_cleanly(
    streams: tuple[tuple[str, ...], ...],
) -> None:
    ends = explore_recv(streams, ("sync", "sync", "finish"))
    assert ends
    for world in ends:
        assert world.states == (RecvState.DONE,) * len(streams), world
        assert world.loader_pc == 3
        for k, counts in enumerate(world.passed):
            # When the loader passes marker k, each channel applied exactly the pages that
            # preceded its k-th SYNC: none missing, none of the next epoch.
            assert counts == tuple(pages_before_sync(s, k) for s in streams), world


def test_a_channel_ending_early_leaves_the_loader_unable_to_pass() -> None:
    ends = explore_recv((("P", "EOF"), ("S", "EOF")), ("sync", "finish"))
    # Every run stops with the loader at its marker and channel 0 at EOF_SEEN: the engine
    # turns exactly this state into a fast failure instead of a wait.
    assert {w.states[0] for w in ends} == {RecvState.EOF_SEEN}
    assert {w.loader_pc for w in ends} == {0}


def test_step_refuses_unknown_pairs() -> None:
    with pytest.raises(IllegalTransitionError):
        handshake.step(RecvState.DONE, RecvEvent.PACKET)
