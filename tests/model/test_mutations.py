"""Deliberately broken tables make the explorers fail: the checks have teeth.

Each mutant is the engine's table copied with a few entries changed, run through the same
explorer as the real one.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from multifd.engine.explore import (
    OUR_EFFECTS,
    OURS,
    RecvWorkload,
    SendDesign,
    SendWorkload,
    Write,
    explore_recv,
    explore_send,
)
from multifd.engine.explore_designs import Effect
from multifd.engine.handshake import (
    RECV_TABLE,
    SEND_TABLE,
    RecvAction,
    RecvEvent,
    RecvState,
    SendAction,
    SendEvent,
    SendState,
)

IDLE = SendState()
JOB = SendState(pending_job=True)
SYNC = SendState(pending_sync=True)
BOTH = SendState(pending_job=True, pending_sync=True)
E = SendEvent
A = SendAction
FLAGGED = "send_pages_with_the_sync_flag"  # an action our table does not have

Entries = Mapping[tuple[SendState, SendEvent], tuple[SendState, object]]

MUTANTS: dict[str, tuple[Entries, set[str]]] = {
    # A wake-up with both requests serves the sync first: the SYNC overtakes the job.
    "sync served before the pending job": (
        {(BOTH, E.WAKE): (BOTH, A.SEND_SYNC), (BOTH, E.SYNC_SENT): (JOB, A.POST_SEM_SYNC)},
        {"I3", "WAITER"},
    ),
    # Writing the pages clears both flags: the sync request is lost.
    "PAGES_SENT clears both flags": (
        {(BOTH, E.PAGES_SENT): (IDLE, A.POST_CHANNELS_READY)},
        {"DEADLOCK"},
    ),
    # The sync request sets a SYNC flag the page packet then carries (QEMU < 9.0's flags).
    "the requester sets the packet's flags": (
        {(BOTH, E.WAKE): (BOTH, FLAGGED)},
        {"I1", "I3"},
    ),
    # A sync request replaces the pending job instead of adding to it.
    "REQUEST_SYNC drops the pending job": (
        {(JOB, E.REQUEST_SYNC): (SYNC, A.POST_SEM)},
        {"I3"},
    ),
    # The thread writes the SYNC but never tells sync().
    "SYNC_SENT posts nothing": (
        {(SYNC, E.SYNC_SENT): (IDLE, A.NONE)},
        {"DEADLOCK"},
    ),
}


def mutant(name: str, entries: Entries) -> SendDesign[SendState, object]:
    """Our design with ``entries`` of its table replaced."""
    table: dict[tuple[SendState, SendEvent], tuple[SendState, object]] = dict(SEND_TABLE)
    table.update(entries)
    effects: dict[object, Effect] = {FLAGGED: Write(sync=True, batch=True, then=E.PAGES_SENT)}
    effects.update(OUR_EFFECTS.items())
    return SendDesign(name, table, OURS.initial, effects, OURS.has_job, OURS.show)


@pytest.mark.parametrize("name", list(MUTANTS))
@pytest.mark.parametrize("channels", [1, 2])
def test_a_broken_send_table_fails(name: str, channels: int) -> None:
    entries, kinds = MUTANTS[name]
    result = explore_send(mutant(name, entries), SendWorkload(channels), until=kinds.issubset)
    assert kinds <= set(result.kinds()), result.kinds()
    shortest = result.counterexample
    assert shortest is not None
    print(shortest.render())


def test_hand_job_during_a_sync_is_unreachable_not_just_refused() -> None:
    """Allowing HAND_JOB while a sync is pending changes nothing: sync() waits for the SYNCs.

    The table's refusal is a second line of defence; the explorer shows the first one
    (the requester never hands a job while a sync is pending) holds by itself.
    """
    entries = {(SYNC, E.HAND_JOB): (BOTH, A.POST_SEM)}
    result = explore_send(mutant("HAND_JOB while pending_sync", entries), SendWorkload(2))
    assert result.ok
    assert (SYNC, E.HAND_JOB) not in result.coverage


RECV_MUTANTS = {
    # A SYNC does not park: the channel reads on into the next epoch.
    "SYNC not honoured": (
        {(RecvState.RUNNING, RecvEvent.SYNC): (RecvState.RUNNING, RecvAction.CONTINUE)},
        (("P", "S", "P", "EOF"), ("S", "EOF")),
        {"READ_PAST", "DEADLOCK"},
    ),
    # finish() leaves a parked channel parked: a trailing SYNC (QEMU 9.1/9.2) hangs it.
    "FINISH does not free a parked channel": (
        {(RecvState.AT_SYNC_POSTED, RecvEvent.FINISH): (RecvState.AT_SYNC_POSTED, RecvAction.NONE)},
        (("S", "S", "EOF"), ("S", "S", "EOF")),
        {"DEADLOCK"},
    ),
    # finish() misses a channel the loader released that has not woken yet.
    "FINISH skips a released channel": (
        {(RecvState.RELEASED, RecvEvent.FINISH): (RecvState.RELEASED, RecvAction.NONE)},
        (("S", "S", "EOF"), ("S", "S", "EOF")),
        {"DEADLOCK"},
    ),
}


@pytest.mark.parametrize("name", list(RECV_MUTANTS))
def test_a_broken_recv_table_fails(name: str) -> None:
    entries, streams, kinds = RECV_MUTANTS[name]
    table = dict(RECV_TABLE)
    table.update(entries)
    result = explore_recv(RecvWorkload(streams, markers=1), table)
    assert set(result.kinds()) >= kinds, result.kinds()
    assert explore_recv(RecvWorkload(streams, markers=1)).ok  # the real table copes
