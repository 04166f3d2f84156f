"""The send-side designs the explorer runs: our table, QEMU < 9.0's, and what actions do.

A design is a transition table over :class:`~multifd.engine.handshake.SendEvent` plus the
meaning of its actions: :class:`Write` one packet (and step an event once it is out), or
post semaphores. :data:`OURS` is the engine's own
:data:`~multifd.engine.handshake.SEND_TABLE` with what ``send.py`` does for each action;
:data:`OLD` is the handshake QEMU had before 9.0 (spec 6.4), expressed over the same
events; tests build broken designs by copying a table and changing entries.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, NamedTuple, TypeVar

from multifd.engine.handshake import SEND_INITIAL, SEND_TABLE, SendAction, SendEvent, SendState

S = TypeVar("S", bound=Hashable)
A = TypeVar("A", bound=Hashable)


class Packet(NamedTuple):
    """A packet a channel wrote, reduced to what the invariants look at."""

    sync: bool  # MULTIFD_FLAG_SYNC is set
    job: int | None  # the job whose pages it carries; None: no pages

    def __str__(self) -> str:
        if self.job is None:
            return "a SYNC" if self.sync else "an empty packet"
        return f"the pages of J{self.job}" + (" with the SYNC flag" if self.sync else "")


class Post(enum.Enum):
    """A semaphore a step posts."""

    SEM = "sem"  # the channel's sem: a request is pending
    SEM_SYNC = "sem_sync"  # the channel's sem_sync: its SYNC is written
    CHANNELS_READY = "channels_ready"  # the shared channels_ready: a channel can take a job


class Write(NamedTuple):
    """An action that writes one packet, then steps ``then``."""

    sync: bool  # the packet has MULTIFD_FLAG_SYNC
    batch: bool  # the packet carries the channel's batch (whatever it holds, maybe nothing)
    then: SendEvent  # the event the thread steps once the packet is written


Effect = Write | tuple[Post, ...]


@dataclass(frozen=True)
class SendDesign(Generic[S, A]):
    """A send-side handshake: a table and what its actions do."""

    name: str
    table: Mapping[tuple[S, SendEvent], tuple[S, A]]
    initial: S
    effects: Mapping[A, Effect]
    has_job: Callable[[S], bool]  # the requester's test for a busy channel
    show: Callable[[S], str]  # the state in words, for schedules


def _show_ours(state: SendState) -> str:
    return f"(job={int(state.pending_job)} sync={int(state.pending_sync)})"


def _has_job_ours(state: SendState) -> bool:
    return state.pending_job  # the engine's _idle_channel() test


OUR_EFFECTS: Final[Mapping[SendAction, Effect]] = {
    SendAction.NONE: (),
    SendAction.POST_SEM: (Post.SEM,),
    SendAction.SEND_PAGES: Write(sync=False, batch=True, then=SendEvent.PAGES_SENT),
    SendAction.SEND_SYNC: Write(sync=True, batch=False, then=SendEvent.SYNC_SENT),
    SendAction.POST_CHANNELS_READY: (Post.CHANNELS_READY,),
    SendAction.POST_SEM_SYNC: (Post.SEM_SYNC,),
}
"""What send.py's ``_SendChannel.perform()`` and ``_serve()`` do for each action."""

OURS: Final = SendDesign[SendState, SendAction](
    name="ours",
    table=SEND_TABLE,
    initial=SEND_INITIAL,
    effects=OUR_EFFECTS,
    has_job=_has_job_ours,
    show=_show_ours,
)
"""Our handshake: the engine's own table."""


# --- QEMU < 9.0 ---------------------------------------------------------------------------


class OldSendState(NamedTuple):
    """A send channel of QEMU < 9.0: one counter for both kinds of request."""

    pending_job: int = 0  # p->pending_job: requests not yet written, jobs and syncs alike
    sync_flag: bool = False  # MULTIFD_FLAG_SYNC in p->flags, set by the requester's sync


class OldSendAction(enum.Enum):
    __hash__ = object.__hash__  # as in handshake.SendEvent

    WRITE = "write"  # write p->pages, whatever it holds, with flags 0
    WRITE_SYNC = "write_sync"  # write p->pages, whatever it holds, with MULTIFD_FLAG_SYNC


OldAction = SendAction | OldSendAction
_OLD_LIMIT: Final = 3  # pending_job never exceeds 2 (a job and a sync); 3 is a model bound


def _old_table() -> dict[tuple[OldSendState, SendEvent], tuple[OldSendState, OldAction]]:
    table: dict[tuple[OldSendState, SendEvent], tuple[OldSendState, OldAction]] = {}
    for pending in range(_OLD_LIMIT):
        for flag in (False, True):
            state = OldSendState(pending, flag)
            if pending == 0:  # multifd_send_pages() picks a channel with !pending_job
                table[state, SendEvent.HAND_JOB] = (OldSendState(1, flag), SendAction.POST_SEM)
            if pending + 1 < _OLD_LIMIT:  # multifd_send_sync_main(): flags |= SYNC, pending_job++
                table[state, SendEvent.REQUEST_SYNC] = (
                    OldSendState(pending + 1, True),
                    SendAction.POST_SEM,
                )
            if pending == 0:
                table[state, SendEvent.WAKE] = (state, SendAction.NONE)
                continue
            # One wake-up takes the flags as they are now (and clears them) and writes
            # whatever batch the channel holds; pending_job drops after the write.
            write = OldSendAction.WRITE_SYNC if flag else OldSendAction.WRITE
            table[state, SendEvent.WAKE] = (OldSendState(pending, False), write)
            after = OldSendState(pending - 1, flag)
            table[state, SendEvent.PAGES_SENT] = (after, SendAction.POST_CHANNELS_READY)
            table[state, SendEvent.SYNC_SENT] = (after, SendAction.POST_SEM_SYNC)
    return table


OLD_SEND_TABLE: Final[Mapping[tuple[OldSendState, SendEvent], tuple[OldSendState, OldAction]]] = (
    _old_table()
)
"""QEMU < 9.0 as a table over the same events: a counter, and a SYNC flag in ``p->flags``."""


def _show_old(state: OldSendState) -> str:
    flags = "SYNC" if state.sync_flag else "0"
    return f"(pending_job={state.pending_job} flags={flags})"


def _has_job_old(state: OldSendState) -> bool:
    return state.pending_job > 0


_OLD_EFFECTS: Final[dict[OldAction, Effect]] = {
    OldSendAction.WRITE: Write(sync=False, batch=True, then=SendEvent.PAGES_SENT),
    OldSendAction.WRITE_SYNC: Write(sync=True, batch=True, then=SendEvent.SYNC_SENT),
}
_OLD_EFFECTS.update(OUR_EFFECTS.items())

OLD: Final = SendDesign[OldSendState, OldAction](
    name="QEMU<9.0",
    table=OLD_SEND_TABLE,
    initial=OldSendState(),
    effects=_OLD_EFFECTS,
    has_job=_has_job_old,
    show=_show_old,
)
"""The handshake QEMU had before 9.0 (spec 6.4)."""
