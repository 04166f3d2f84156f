"""The two multifd handshakes as transition tables: pure data plus one pure function.

Theory of operation
-------------------
Send side, one table per channel. The requester (the migration thread) and the channel
thread share two request flags, never a counter (spec 6.4):

* ``pending_job``: a batch of pages was handed over; set by ``HAND_JOB`` (allowed only while
  neither flag is set), cleared by ``PAGES_SENT``.
* ``pending_sync``: a SYNC packet was requested; set by ``REQUEST_SYNC``, cleared by
  ``SYNC_SENT``.

Every request is followed by one post of the channel's ``sem``; each ``WAKE`` (one acquire)
serves exactly one request, the job first, and leaves the flags untouched while the
thread writes: the flag is cleared by the matching ``*_SENT`` event once the bytes are on
the socket. So a job and a sync that arrive together are two wake-ups and two packets --
pages without SYNC, then a SYNC without pages. A counter merged them into one wake-up that
sent a SYNC packet carrying pages and then an empty packet (the race QEMU 9.0 fixed).

Receive side, one table per channel. A channel thread reads packets in order; it applies a
packet's pages *before* it steps the table, so pages inside an old sender's SYNC packet are
in memory before the SYNC is honoured. At a SYNC a ``RUNNING`` channel parks
(``AT_SYNC_POSTED``: it has told the loader it reached the sync). The loader, at each
marker of the main stream, waits until every channel is parked, then releases them all
(``RELEASE``, a two-phase barrier); a released thread takes ``WAKE`` and runs again.
``FINISH`` ends the migration: SYNCs stop being honoured (QEMU 9.1/9.2 senders send
trailing SYNCs without a marker), parked threads are freed, and each thread reads to end of
stream. A clean end of stream before ``FINISH`` is remembered (``EOF_SEEN``) so that the
loader fails fast instead of waiting for a SYNC that cannot come.

A missing ``(state, event)`` pair is a broken protocol or a bug: :func:`step` raises
:class:`IllegalTransitionError`. The engine threads take every decision through these tables,
and an interleaving explorer can enumerate the same tables.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeVar, overload


class IllegalTransitionError(RuntimeError):
    """An event that the handshake does not allow in the current state."""


# --- send side -----------------------------------------------------------------------------


class SendState(NamedTuple):
    """The request flags of one send channel (QEMU ``MultiFDSendParams``).

    A named tuple: looked up in the table several times per packet, it hashes in C.
    """

    pending_job: bool = False  # pending_job: a batch is handed over
    pending_sync: bool = False  # pending_sync: a SYNC packet is requested


class SendEvent(enum.Enum):
    # Enum members compare by identity, so identity hashing is consistent with equality;
    # it runs in C, where Enum.__hash__ (several table lookups per packet) is Python.
    __hash__ = object.__hash__

    HAND_JOB = "hand_job"  # requester swapped a full batch in (only when no job is pending)
    REQUEST_SYNC = "request_sync"  # requester asks for one SYNC packet
    WAKE = "wake"  # channel thread acquired its sem
    PAGES_SENT = "pages_sent"  # channel thread wrote the page packet
    SYNC_SENT = "sync_sent"  # channel thread wrote the SYNC packet


class SendAction(enum.Enum):
    __hash__ = object.__hash__  # as in SendEvent

    NONE = "none"  # nothing to do (a wake-up with no request: shutdown)
    POST_SEM = "post_sem"  # requester: post the channel's sem after setting a flag
    SEND_PAGES = "send_pages"  # thread: write the batch as one packet without SYNC
    SEND_SYNC = "send_sync"  # thread: write one SYNC packet without pages
    POST_CHANNELS_READY = "post_channels_ready"  # thread: the channel can take a batch
    POST_SEM_SYNC = "post_sem_sync"  # thread: tell the requester the SYNC is written


_IDLE: Final = SendState(pending_job=False, pending_sync=False)
_JOB: Final = SendState(pending_job=True, pending_sync=False)
_SYNC: Final = SendState(pending_job=False, pending_sync=True)
_BOTH: Final = SendState(pending_job=True, pending_sync=True)
_S = SendEvent
_SA = SendAction

_SEND_STEPS: Final[dict[tuple[SendState, SendEvent], tuple[SendState, SendAction]]] = {
    # The requester. A job is handed only to a channel with no job and no sync
    # pending: a batch is never overwritten, and a job handed after a sync request
    # would be written before that SYNC, i.e. in the wrong epoch.
    (_IDLE, _S.HAND_JOB): (_JOB, _SA.POST_SEM),
    (_IDLE, _S.REQUEST_SYNC): (_SYNC, _SA.POST_SEM),
    (_JOB, _S.REQUEST_SYNC): (_BOTH, _SA.POST_SEM),
    # The channel thread: a wake-up serves the job first, else the sync; the flag
    # stays set while the bytes are written and is cleared once they are out.
    (_JOB, _S.WAKE): (_JOB, _SA.SEND_PAGES),
    (_BOTH, _S.WAKE): (_BOTH, _SA.SEND_PAGES),
    (_SYNC, _S.WAKE): (_SYNC, _SA.SEND_SYNC),
    (_IDLE, _S.WAKE): (_IDLE, _SA.NONE),
    (_JOB, _S.PAGES_SENT): (_IDLE, _SA.POST_CHANNELS_READY),
    (_BOTH, _S.PAGES_SENT): (_SYNC, _SA.POST_CHANNELS_READY),
    (_SYNC, _S.SYNC_SENT): (_IDLE, _SA.POST_SEM_SYNC),
}
SEND_TABLE: Final[Mapping[tuple[SendState, SendEvent], tuple[SendState, SendAction]]] = (
    MappingProxyType(_SEND_STEPS)
)
"""Send channel: ``(state, event) -> (next state, action)``."""

SEND_INITIAL: Final = _IDLE


# --- receive side --------------------------------------------------------------------------


class RecvState(enum.Enum):
    __hash__ = object.__hash__  # as in SendEvent

    RUNNING = "running"  # reading packets; SYNCs are honoured
    AT_SYNC_POSTED = "at_sync_posted"  # read a SYNC, told the loader, parked until released
    RELEASED = "released"  # the loader let it go; the thread has not woken yet
    DRAINING = "draining"  # after finish(): reading to end of stream, SYNCs not honoured
    EOF_SEEN = "eof_seen"  # clean end of stream before finish(): can never reach a SYNC
    DONE = "done"  # clean end of stream after finish()


class RecvEvent(enum.Enum):
    __hash__ = object.__hash__  # as in SendEvent

    PACKET = "packet"  # thread: read (and applied) a packet without SYNC
    SYNC = "sync"  # thread: read (and applied) a packet with SYNC
    EOF = "eof"  # thread: end of stream exactly at a packet boundary
    WAKE = "wake"  # thread: woke up after parking
    RELEASE = "release"  # loader: every channel is parked, let this one go
    FINISH = "finish"  # loader: end of migration


class RecvAction(enum.Enum):
    __hash__ = object.__hash__  # as in SendEvent

    CONTINUE = "continue"  # thread: read the next packet
    PARK = "park"  # thread: wake the loader, then wait until released
    NOTIFY = "notify"  # loader: wake the parked thread
    EXIT = "exit"  # thread: stop reading
    NONE = "none"  # nothing to do


_R = RecvState
_E = RecvEvent
_A = RecvAction

_RECV_STEPS: Final[dict[tuple[RecvState, RecvEvent], tuple[RecvState, RecvAction]]] = {
    (_R.RUNNING, _E.PACKET): (_R.RUNNING, _A.CONTINUE),
    (_R.RUNNING, _E.SYNC): (_R.AT_SYNC_POSTED, _A.PARK),
    (_R.RUNNING, _E.EOF): (_R.EOF_SEEN, _A.EXIT),
    (_R.RUNNING, _E.FINISH): (_R.DRAINING, _A.NONE),
    (_R.AT_SYNC_POSTED, _E.RELEASE): (_R.RELEASED, _A.NOTIFY),
    (_R.AT_SYNC_POSTED, _E.FINISH): (_R.DRAINING, _A.NOTIFY),
    (_R.RELEASED, _E.WAKE): (_R.RUNNING, _A.CONTINUE),
    (_R.RELEASED, _E.FINISH): (_R.DRAINING, _A.NONE),
    (_R.DRAINING, _E.WAKE): (_R.DRAINING, _A.CONTINUE),
    (_R.DRAINING, _E.PACKET): (_R.DRAINING, _A.CONTINUE),
    (_R.DRAINING, _E.SYNC): (_R.DRAINING, _A.CONTINUE),
    (_R.DRAINING, _E.EOF): (_R.DONE, _A.EXIT),
    (_R.DRAINING, _E.FINISH): (_R.DRAINING, _A.NONE),
    (_R.EOF_SEEN, _E.FINISH): (_R.DONE, _A.NONE),
    (_R.DONE, _E.FINISH): (_R.DONE, _A.NONE),
}
RECV_TABLE: Final[Mapping[tuple[RecvState, RecvEvent], tuple[RecvState, RecvAction]]] = (
    MappingProxyType(_RECV_STEPS)
)
"""Receive channel: ``(state, event) -> (next state, action)``."""

RECV_QUIET: Final = frozenset(
    pair
    for pair, (after, action) in _RECV_STEPS.items()
    if after is pair[0] and action is RecvAction.CONTINUE
)
"""The ``(state, event)`` pairs that change nothing and let the thread read on.

A channel thread may take these without the barrier's lock: the step writes no state and
wakes nobody, so it is the same as taking it the moment the thread read its state.
"""

RECV_INITIAL: Final = RecvState.RUNNING

# States in which a thread waits for the loader rather than reading its socket.
RECV_PARKED: Final = frozenset({RecvState.AT_SYNC_POSTED})


# --- the transition function --------------------------------------------------------------

S = TypeVar("S")
E = TypeVar("E")
A = TypeVar("A")


def lookup(table: Mapping[tuple[S, E], tuple[S, A]], state: S, event: E) -> tuple[S, A]:
    """The next state and the action for ``event`` in ``state`` according to ``table``.

    Raises:
        IllegalTransitionError: the table has no entry for ``(state, event)``.
    """
    try:
        return table[state, event]
    except KeyError:
        raise IllegalTransitionError(f"{event} is not allowed in state {state}") from None


def send_step(state: SendState, event: SendEvent) -> tuple[SendState, SendAction]:
    """:func:`step` on :data:`SEND_TABLE`, without the dispatch: the engine's per-packet path.

    Raises:
        IllegalTransitionError: the event is not allowed in this state.
    """
    return lookup(_SEND_STEPS, state, event)


def recv_step(state: RecvState, event: RecvEvent) -> tuple[RecvState, RecvAction]:
    """:func:`step` on :data:`RECV_TABLE`, without the dispatch.

    Raises:
        IllegalTransitionError: the event is not allowed in this state.
    """
    return lookup(_RECV_STEPS, state, event)


@overload
def step(state: SendState, event: SendEvent) -> tuple[SendState, SendAction]: ...
@overload
def step(state: RecvState, event: RecvEvent) -> tuple[RecvState, RecvAction]: ...
@overload
def step(state: S, event: E, *, table: Mapping[tuple[S, E], tuple[S, A]]) -> tuple[S, A]: ...
def step(state: object, event: object, *, table: Mapping[Any, Any] | None = None) -> Any:
    """One transition: ``(state, event) -> (next state, action)``.

    Without ``table`` the handshake is chosen by the type of ``state``: :data:`SEND_TABLE`
    for a :class:`SendState`, :data:`RECV_TABLE` for a :class:`RecvState`. Passing another
    ``table`` runs an alternative handshake (tests and the interleaving explorer do).

    Raises:
        IllegalTransitionError: the event is not allowed in this state.
    """
    if table is None:
        table = SEND_TABLE if isinstance(state, SendState) else RECV_TABLE
    return lookup(table, state, event)
