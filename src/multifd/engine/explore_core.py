"""Breadth-first search over every interleaving of a small concurrent model.

A model is a start state, a function that lists the moves possible in a state (one per
process that can take its next atomic step) and a check of the states where nobody can
move. States are hashable values (tuples); each is expanded once, so the search is over
the reachable state graph, not over the far larger tree of schedules. Breadth-first order
makes the first schedule found for each kind of violation a shortest one.

A move may report violations (a bad packet was written, a table refused an event). The
search records the first schedule per kind and, if the move still has a next state, goes
on from it, so that one run can show a bug and its consequences (the old design's SYNC
packet with pages, and the empty packet after it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar

St = TypeVar("St", bound=Hashable)
L = TypeVar("L")  # a move's label


class Step(NamedTuple):
    """One atomic step of a schedule, as shown to a reader."""

    actor: str  # "requester", "loader" or a channel name such as "multifd/0"
    event: str  # a table event (HAND_JOB, WAKE, ...) or a model step (WRITE, POST, ...)
    text: str  # what happened, in words

    def __str__(self) -> str:
        return f"{self.actor:<10} {self.event:<13} {self.text}"


class Finding(NamedTuple):
    """A violated property: its kind (I1, I2, I3, WAITER, DEADLOCK, ...) and what happened."""

    kind: str
    message: str


class Move(NamedTuple, Generic[St, L]):
    """One step a process can take: its label, the next state (None: none) and findings.

    The label is whatever the model's ``render`` turns into a :class:`Step`: a cheap
    tuple, since only the steps of reported schedules are ever rendered.
    """

    label: L
    state: St | None
    findings: tuple[Finding, ...] = ()


class Model(Protocol[St, L]):
    """What :func:`search` needs from a model."""

    def initial(self) -> St: ...

    def moves(self, state: St) -> Iterable[Move[St, L]]: ...

    def at_end(self, state: St) -> tuple[Finding, ...]:
        """Findings in a state where no process can move (deadlock, lost work)."""
        ...

    def render(self, label: L) -> Step:
        """The step a move's label stands for."""
        ...


@dataclass(frozen=True)
class Violation:
    """The first (so shortest) schedule found that violates one property."""

    kind: str
    message: str
    schedule: tuple[Step, ...]

    def render(self) -> str:
        """The violation and its numbered schedule, one step per line."""
        lines = [f"{self.kind}: {self.message}"]
        lines += [f"{n:3}. {step}" for n, step in enumerate(self.schedule, 1)]
        return "\n".join(lines)


@dataclass(frozen=True)
class Result:
    """What one exhaustive search found."""

    name: str  # the design and configuration searched
    states: int  # distinct reachable states
    transitions: int  # moves taken (edges of the state graph)
    ends: int  # reachable states where nobody can move
    depth: int  # longest shortest schedule: the BFS depth
    seconds: float
    complete: bool  # False: stopped early, once the violations asked for were found
    violations: tuple[Violation, ...]  # in the order found: shortest first

    @property
    def ok(self) -> bool:
        """True if no property was violated in any interleaving."""
        return not self.violations

    @property
    def counterexample(self) -> Violation | None:
        """The shortest schedule that violates any property, if there is one."""
        return self.violations[0] if self.violations else None

    def kinds(self) -> list[str]:
        """The kinds of the properties violated, in the order found."""
        return [v.kind for v in self.violations]

    def violation(self, kind: str) -> Violation:
        """The shortest schedule found for ``kind``.

        Raises:
            KeyError: no violation of that kind was found.
        """
        for found in self.violations:
            if found.kind == kind:
                return found
        raise KeyError(kind)


class _Tree(Generic[St, L]):
    """Parent pointers of the BFS tree: they turn a state back into its schedule."""

    def __init__(self, root: St) -> None:
        self.parent: dict[St, tuple[St, L] | None] = {root: None}

    def labels(self, state: St) -> list[L]:
        labels: list[L] = []
        link = self.parent[state]
        while link is not None:
            state, label = link
            labels.append(label)
            link = self.parent[state]
        labels.reverse()
        return labels


def search(
    model: Model[St, L],
    name: str,
    *,
    max_states: int = 5_000_000,
    until: Callable[[frozenset[str]], bool] | None = None,
) -> Result:
    """Every interleaving of ``model``, breadth first, with each state expanded once.

    Args:
        model: the start state, the moves and the end-state check.
        name: names the result.
        max_states: a bound that turns a model too large for the test suite into an
            error instead of an endless run.
        until: called with the kinds of violation found so far whenever a new one is
            found; True stops the search (``until=bool`` stops at the first).

    Raises:
        RuntimeError: more than ``max_states`` states are reachable.
    """
    start = time.perf_counter()
    root = model.initial()
    tree: _Tree[St, L] = _Tree(root)
    found: dict[str, Violation] = {}
    queue: deque[tuple[St, int]] = deque([(root, 0)])
    transitions = ends = depth = 0
    complete = True
    kinds = 0
    while queue:
        state, level = queue.popleft()
        depth = max(depth, level)
        moved = False
        for move in model.moves(state):
            moved = True
            transitions += 1
            for finding in move.findings:
                if finding.kind not in found:
                    path = tuple(map(model.render, (*tree.labels(state), move.label)))
                    found[finding.kind] = Violation(finding.kind, finding.message, path)
            if move.state is not None and move.state not in tree.parent:
                tree.parent[move.state] = (state, move.label)
                queue.append((move.state, level + 1))
        if not moved:
            ends += 1
            for finding in model.at_end(state):
                if finding.kind not in found:
                    path = tuple(map(model.render, tree.labels(state)))
                    found[finding.kind] = Violation(finding.kind, finding.message, path)
        if len(tree.parent) > max_states:
            raise RuntimeError(f"{name}: more than {max_states} states")
        if until is not None and len(found) > kinds and until(frozenset(found)):
            complete = False
            break
        kinds = len(found)
    violations = sorted(found.values(), key=lambda v: len(v.schedule))
    return Result(
        name=name,
        states=len(tree.parent),
        transitions=transitions,
        ends=ends,
        depth=depth,
        seconds=time.perf_counter() - start,
        complete=complete,
        violations=tuple(violations),
    )
