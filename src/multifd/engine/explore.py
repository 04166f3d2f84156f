"""Exhaustive interleaving checks of both multifd handshakes over the engine's own tables.

The send side (:mod:`multifd.engine.explore_send`) runs the requester and 1-3 channel
threads over :data:`~multifd.engine.handshake.SEND_TABLE` for every workload of up to
four page jobs and two ``sync()`` calls, in any order, and checks I1, I2, I3, that
``sync()`` returns only after the SYNCs are written, and that nothing deadlocks. The same
model runs QEMU's pre-9.0 handshake (a counter and a shared ``flags`` field) and finds its
race. The receive side (:mod:`multifd.engine.explore_recv`) runs the loader and the
channel threads over :data:`~multifd.engine.handshake.RECV_TABLE` for every packet
sequence the send side can produce, old and new, plus trailing SYNCs (QEMU 9.1/9.2) and
streams that end early.

``python -m multifd.engine.explore`` prints the state counts and the old race;
``--promela`` prints the send table for the SPIN models in ``verify/``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from multifd.engine.explore_core import Result, Step, Violation, search
from multifd.engine.explore_designs import (
    OLD,
    OLD_SEND_TABLE,
    OUR_EFFECTS,
    OURS,
    OldSendState,
    Packet,
    SendDesign,
    Write,
)
from multifd.engine.explore_recv import (
    EMPTY,
    EOF,
    PAGES,
    SYNC,
    SYNC_PAGES,
    RecvWorkload,
    explore_recv,
)
from multifd.engine.explore_send import SendResult, SendWorkload, explore_send
from multifd.engine.handshake import SEND_TABLE, SendAction, SendEvent, SendState

__all__ = [
    "OLD",
    "OLD_SEND_TABLE",
    "OURS",
    "OUR_EFFECTS",
    "OldSendState",
    "Packet",
    "RecvWorkload",
    "Result",
    "Row",
    "SendDesign",
    "SendResult",
    "SendWorkload",
    "Step",
    "Violation",
    "Write",
    "explore_recv",
    "explore_send",
    "main",
    "measure",
    "old_race",
    "promela_send_table",
    "recv_workloads",
    "search",
]

CHANNELS: Final = (1, 2, 3)
JOBS: Final = 4
SYNCS: Final = 2
RACE: Final = frozenset({"I1", "I2"})  # the old race: a SYNC with pages, an empty packet


def old_race() -> Violation:
    """The shortest schedule in which QEMU < 9.0 writes a SYNC with pages, then an empty packet.

    One channel, ``send_pages()`` of one batch then ``sync()``: the README's design section.
    """
    result = explore_send(OLD, SendWorkload(1, program="JS"), until=RACE.issubset)
    return result.violation("I2")


# --- receive workloads --------------------------------------------------------------------


def recv_workloads(
    channels: int, design: SendDesign[Any, Any] = OURS, jobs: int = JOBS, syncs: int = SYNCS
) -> list[RecvWorkload]:
    """The streams ``design``'s sender can write on ``channels`` channels, and variants.

    Every distinct per-channel packet sequence of the send exploration; each again as
    QEMU < 9.0 writes it (the pages before a SYNC inside it, an empty packet after); with
    a trailing SYNC on every channel (QEMU 9.1/9.2 send one without a marker at the end);
    and with channel 0's last SYNC missing, where the loader must fail fast.
    """
    result = explore_send(design, SendWorkload(channels, jobs, syncs))
    plain = sorted({RecvWorkload.from_packets(out) for out in result.outputs}, key=str)
    old = sorted({_merged(w) for w in plain} - set(plain), key=str)
    trailing = [
        RecvWorkload(tuple((*s[:-1], SYNC, EOF) for s in w.streams), w.markers) for w in plain
    ]
    early = [_early_eof(w) for w in plain if w.markers]
    return plain + old + trailing + early


def _merged(workload: RecvWorkload) -> RecvWorkload:
    """The streams as QEMU < 9.0 writes them when a job and a sync meet at one wake-up."""
    streams = []
    for stream in workload.streams:
        items = list(stream)
        for i in range(len(items) - 1):
            if items[i] == PAGES and items[i + 1] == SYNC:
                items[i : i + 2] = [SYNC_PAGES, EMPTY]
        streams.append(tuple(items))
    return RecvWorkload(tuple(streams), workload.markers)


def _early_eof(workload: RecvWorkload) -> RecvWorkload:
    first, *rest = workload.streams
    last = max(i for i, item in enumerate(first) if item in {SYNC, SYNC_PAGES})
    shorter = (*first[:last], *first[last + 1 :])
    return RecvWorkload((shorter, *rest), workload.markers, may_fail=True)


# --- the table of state counts ------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of :func:`measure`'s table."""

    side: str  # send or recv
    design: str  # the sender's handshake (send) or the table (recv)
    channels: int
    what: str  # the workloads covered
    states: int  # distinct states, summed over the runs
    transitions: int
    seconds: float
    verdict: str  # "0 violations" or the kinds found, with their shortest schedule

    def __str__(self) -> str:
        return (
            f"{self.side:<4} {self.design:<8} {self.channels:>2}  {self.what:<40} "
            f"{self.states:>7} {self.transitions:>11} {self.seconds:>7.2f}  {self.verdict}"
        )


HEADER: Final = (
    f"{'side':<4} {'design':<8} {'ch':>2}  {'workloads':<40} {'states':>7} "
    f"{'transitions':>11} {'seconds':>7}  result"
)


def _verdict(results: Sequence[Result]) -> str:
    found: dict[str, int] = {}
    for result in results:
        for violation in result.violations:
            steps = len(violation.schedule)
            found[violation.kind] = min(found.get(violation.kind, steps), steps)
    if not found:
        return "0 violations"
    return ", ".join(f"{kind} ({steps} steps)" for kind, steps in found.items())


def _row(
    side: str, design: str, channels: int, *, what: str, results: Sequence[Result], seconds: float
) -> Row:
    return Row(
        side,
        design,
        channels,
        what,
        sum(r.states for r in results),
        sum(r.transitions for r in results),
        seconds,
        _verdict(results),
    )


def measure(channels: Iterable[int] = CHANNELS) -> list[Row]:
    """Run every configuration and return the table ``main`` prints."""
    rows = []
    orders = _orders(JOBS, SYNCS)
    for count in channels:
        workload = SendWorkload(count, JOBS, SYNCS)
        designs: tuple[tuple[SendDesign[Any, Any], Any], ...] = ((OURS, None), (OLD, RACE.issubset))
        for design, until in designs:
            result = explore_send(design, workload, until=until)
            what = f"all {orders} programs of <={JOBS} J, <={SYNCS} S"
            what += "" if result.complete else ", to I1+I2"
            rows.append(
                _row(
                    "send", design.name, count, what=what, results=[result], seconds=result.seconds
                )
            )
        start = time.perf_counter()
        results = [explore_recv(w) for w in recv_workloads(count)]
        what = f"{len(results)} stream sets (see recv_workloads)"
        seconds = time.perf_counter() - start
        rows.append(_row("recv", "ours", count, what=what, results=results, seconds=seconds))
    return rows


def _orders(jobs: int, syncs: int) -> int:
    """The number of J/S programs with at most ``jobs`` J and ``syncs`` S."""
    return sum(math.comb(j + s, s) for j in range(jobs + 1) for s in range(syncs + 1))


# --- SPIN ---------------------------------------------------------------------------------


def promela_send_table(
    table: Mapping[tuple[SendState, SendEvent], tuple[SendState, SendAction]] = SEND_TABLE,
) -> str:
    """The send table as a Promela ``inline``, for ``verify/send_table.pml``.

    A state is a byte: bit 0 ``pending_job``, bit 1 ``pending_sync``.
    """
    lines = [
        "/* Generated from multifd.engine.handshake.SEND_TABLE by",
        "   `python -m multifd.engine.explore --promela`: do not edit (tests/model checks it).",
        "   A state is a byte: bit 0 pending_job, bit 1 pending_sync. */",
        "mtype = { " + ", ".join(e.name for e in SendEvent) + " };",
        "mtype = { " + ", ".join(a.name for a in SendAction) + " };",
        "#define PENDING_JOB(s) ((s) & 1)",
        "#define PENDING_SYNC(s) (((s) >> 1) & 1)",
        "",
        "inline send_step(s, e, next, act) {",
        "    if",
    ]
    for (state, event), (after, action) in table.items():
        lines.append(
            f"    :: s == {_code(state)} && e == {event.name} -> "
            f"next = {_code(after)}; act = {action.name}"
        )
    lines += ["    :: else -> assert(false) /* IllegalTransitionError */", "    fi", "}", ""]
    return "\n".join(lines)


def _code(state: SendState) -> int:
    return int(state.pending_job) | int(state.pending_sync) << 1


# --- main ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Print the state counts and the old race (or, with ``--promela``, the send table)."""
    parser = argparse.ArgumentParser(prog="python -m multifd.engine.explore", description=__doc__)
    parser.add_argument("--promela", action="store_true", help="print verify/send_table.pml")
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS))
    args = parser.parse_args(argv)
    if args.promela:
        sys.stdout.write(promela_send_table())
        return 0
    print(HEADER)
    failed = False
    for row in measure(args.channels):
        print(row, flush=True)
        failed |= (row.design == "ours") != (row.verdict == "0 violations")
    print()
    print("The old race (QEMU < 9.0), shortest schedule:")
    print(old_race().render())
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
