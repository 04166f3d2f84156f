"""The cells of the fault matrix: which fault, where, and what each end must report.

A phase names a place in the stream of :mod:`tests.faults.live` (three passes, five SYNC
rounds per channel); each is a unit of the main stream and a unit of a multifd channel,
with a cut (bytes into the unit where ``close``/``reset``/``stall`` strike, mid-record) and
the byte ``corrupt`` inverts (one the decoders check: a record type, a flags byte, a magic).

Note on ``main``: the source writes a section header together with the round's marker, so
``SectionPart`` reaches the wire after that pass's pages; a fault there strikes at the end of
the pass, before its sync.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Final

from multifd.errors import MAIN, ProtocolError
from tests.faults.harness import At, Fault, Kind, Side
from tests.faults.live import IO_TIMEOUT, Attempt


@dataclass(frozen=True, slots=True)
class Place:
    unit: str
    nth: int
    cut: int  # bytes into the unit for close, reset and stall
    flip: int  # the byte corrupt inverts


PHASES: Final[dict[str, tuple[Place, Place]]] = {
    # (main, multifd)
    "setup": (Place("RamMemSize", 1, 9, 7), Place("init", 1, 30, 0)),
    "pass": (Place("SectionPart", 2, 2, 0), Place("packet", 4, 2000, 0)),
    "sync": (Place("RamMultifdFlush", 3, 4, 7), Place("sync", 3, 600, 0)),
    "switchover": (Place("SectionEnd", 1, 2, 0), Place("sync", 4, 1344, 1344)),
    "completion": (Place("Eof", 1, 0, 0), Place("sync", 5, 0, 0)),
}
KINDS: Final[tuple[tuple[Kind, Side], ...]] = (
    ("close", "source"),
    ("close", "destination"),
    ("reset", "source"),
    ("reset", "destination"),
    ("stall", "destination"),  # both legs stop: the side does not matter
    ("corrupt", "destination"),  # only this direction carries data
)
CHANNELS: Final = ("main", "multifd/1")

# The side that sees the fault on its own socket fails within FAST of it; everything else
# within SLOW: a silent channel is found by the I/O timeout, which the kernel restarts on
# every partial write (measured: up to 3 x io_timeout on the sending side).
FAST: Final = 1.0
SLOW: Final = 3 * IO_TIMEOUT + 1.0

_CAUSES: Final[dict[str, tuple[str, ...]]] = {
    "close": (
        "EOF",
        "ended early",
        "end of stream",
        "peer closed",
        "truncated",
        "Broken pipe",
        "reset",
    ),
    "reset": ("reset", "Broken pipe"),
    "stall": ("timed out", "no data", "no SYNC within"),
}


@dataclass(frozen=True, slots=True)
class Cell:
    kind: Kind
    side: Side
    channel: str
    phase: str

    @property
    def id(self) -> str:
        return f"{self.phase}-{self.channel.replace('/', '')}-{self.kind}-{self.side[:3]}"

    def fault(self) -> Fault:
        main, multifd = PHASES[self.phase]
        place = main if self.channel == MAIN else multifd
        delta = place.flip if self.kind == "corrupt" else place.cut
        return Fault(self.kind, At(self.channel, place.unit, place.nth, delta), self.side)

    @property
    def seen_by(self) -> Side | None:
        """The end whose own socket carries the fault (None for a stall: nobody's)."""
        return None if self.kind == "stall" else self.side

    def names(self) -> set[str]:
        """Names the end that sees the fault may give the channel."""
        if self.channel == MAIN:
            return {MAIN}
        if self.phase == "setup":  # the init packet was cut: the id may be unknown
            return {self.channel, "multifd/?", "unclassified"}
        return {self.channel}

    def cause_ok(self, error: BaseException) -> bool:
        if self.kind == "corrupt":
            return isinstance(error, ProtocolError)
        return any(word in str(error) for word in _CAUSES[self.kind])


def every_cell() -> list[Cell]:
    return [
        Cell(kind, side, channel, phase)
        for phase in PHASES
        for channel in CHANNELS
        for kind, side in KINDS
    ]


def root_cause(error: BaseException) -> BaseException:
    """The first error of the package in the chain (below it: the OSError, if any)."""
    while isinstance(error.__cause__, Exception) and hasattr(error.__cause__, "channel"):
        error = error.__cause__
    return error


def log_cell(cell: Cell, attempt: Attempt) -> None:
    """Append the cell's measurements to $MULTIFD_FAULT_LOG (JSON lines), if set."""
    path = os.environ.get("MULTIFD_FAULT_LOG")
    if not path:
        return
    source_t, destination_t = attempt.fail_times()
    source = attempt.source_error
    destination = attempt.destination.error
    line = {
        "cell": cell.id,
        "fault": str(cell.fault()),
        "source": "completed" if source is None else str(root_cause(source)),
        "source_s": round(source_t, 3),
        "destination": str(root_cause(destination)) if destination else "completed",
        "destination_s": round(destination_t, 3),
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")
