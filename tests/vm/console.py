"""The guest's serial console: a reader thread that stamps lines, and their meaning.

Theory of operation: QEMU's serial chardev is a unix socket whose far end is ours, so the
reader thread blocks in ``recv`` and stamps each line with ``time.monotonic()`` the moment
its newline arrives: no polling, and a guest-visible pause can be measured on the host.
QEMU writes every byte the guest puts in the UART at once, so a line's stamp is the time
the guest printed it (to within the host's scheduling). The thread ends at EOF, i.e.
when QEMU exits; readers wait on a condition with a timeout.

The guest of ``scripts/guest.sh`` prints ``HB <n>`` (heartbeat n, about every 100 ms,
after appending ``"<n>\\n"`` to a file) and, every 10th beat, ``CK <n> <md5>`` (the md5 of
that file, which then holds ``"1\\n"`` .. ``"<n>\\n"``): :func:`expected_md5` recomputes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, TypeVar

_BEAT: Final = re.compile(r"HB (\d+)")
_CHECKSUM: Final = re.compile(r"CK (\d+) ([0-9a-f]{32})")
# A line that starts like one of ours but does not match it was garbled on the way.
_OURS: Final = ("HB", "CK")
_RECV_SIZE: Final = 65536

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Line:
    """One console line (``\\r`` and ``\\n`` stripped) and its host arrival time."""

    text: str
    at: float


@dataclass(frozen=True, slots=True)
class Beat:
    """Heartbeat ``n`` and its arrival time (``time.monotonic()``)."""

    n: int
    at: float


@dataclass(frozen=True, slots=True)
class Checksum:
    """A ``CK`` line: the md5 the guest computed over beats 1..``n``."""

    n: int
    md5: str
    at: float

    @property
    def correct(self) -> bool:
        """Whether ``md5`` is what the file of beats 1..``n`` hashes to."""
        return self.md5 == expected_md5(self.n)


@dataclass(frozen=True, slots=True)
class Transcript:
    """What a run of console lines says.

    Attributes:
        beats: the heartbeats, in order of arrival.
        checksums: the checksum lines, in order of arrival.
        garbled: lines that start like a heartbeat or checksum but do not parse.
    """

    beats: tuple[Beat, ...]
    checksums: tuple[Checksum, ...]
    garbled: tuple[str, ...]


def expected_md5(n: int) -> str:
    """The md5 of ``"1\\n2\\n...<n>\\n"``: the guest's beat file after beat ``n``."""
    beats = "".join(f"{i}\n" for i in range(1, n + 1)).encode()
    return hashlib.md5(beats, usedforsecurity=False).hexdigest()


def parse(lines: Sequence[Line]) -> Transcript:
    """Sort ``lines`` into heartbeats, checksum lines and garbled lines (others are ignored)."""
    beats: list[Beat] = []
    checksums: list[Checksum] = []
    garbled: list[str] = []
    for line in lines:
        if beat := _BEAT.fullmatch(line.text):
            beats.append(Beat(int(beat[1]), line.at))
        elif check := _CHECKSUM.fullmatch(line.text):
            checksums.append(Checksum(int(check[1]), check[2], line.at))
        elif line.text.startswith(_OURS):
            garbled.append(line.text)
    return Transcript(tuple(beats), tuple(checksums), tuple(garbled))


def gaps(beats: Sequence[Beat]) -> list[str]:
    """Where ``beats`` are not consecutive numbers (empty when they are)."""
    return [f"{a.n} -> {b.n}" for a, b in itertools.pairwise(beats) if b.n != a.n + 1]


class SerialConsole:
    """Reads a guest's console from a connected socket in a thread until EOF.

    Sharing: ``name`` and ``_log`` are immutable after ``__init__``; ``_lines``,
    ``_partial`` and ``_eof`` are guarded by ``_changed``; the socket and the log file
    belong to the reader thread once :meth:`start` ran (``close`` only shuts the socket
    down, which wakes the thread, and joins it).
    """

    def __init__(self, conn: socket.socket, name: str, log: Path | None = None) -> None:
        """Wrap ``conn`` (QEMU's serial chardev); ``log`` receives the raw bytes too."""
        self.name: Final = name
        self._conn = conn
        self._log = log
        # Guards _lines/_partial/_eof; notified on every new line and at EOF.
        self._changed = threading.Condition()
        self._lines: list[Line] = []
        self._partial = b""
        self._eof = False
        self._thread = threading.Thread(target=self._run, name=f"console-{name}", daemon=True)

    def start(self) -> None:
        """Start the reader thread."""
        self._thread.start()

    def close(self, timeout: float) -> None:
        """Stop reading (what is already in the socket may be dropped) and join the thread."""
        if self._thread.is_alive():
            # OSError: already disconnected, the thread is ending on its own.
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
            self._thread.join(timeout)
        self._conn.close()

    def join(self, timeout: float) -> bool:
        """Wait for EOF (QEMU exited) and the thread's end; returns whether it ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def lines(self) -> list[Line]:
        """The complete lines so far."""
        with self._changed:
            return list(self._lines)

    def partial(self) -> str:
        """The bytes after the last newline: a line the guest has not finished yet."""
        with self._changed:
            return self._partial.decode(errors="replace").strip("\r")

    def transcript(self) -> Transcript:
        """:func:`parse` of the complete lines so far."""
        return parse(self.lines())

    def text(self, last: int = 40) -> str:
        """The last ``last`` lines, for error messages."""
        return "\n".join(line.text for line in self.lines()[-last:])

    def wait(self, what: Callable[[Transcript], _T | None], timeout: float) -> _T | None:
        """Wait until ``what(transcript)`` is not None and return it; None on timeout or EOF."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (found := what(parse(self._lines))) is None and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return found

    def _run(self) -> None:
        log: BinaryIO | None = None
        try:
            log = self._log.open("wb") if self._log is not None else None
            while data := self._conn.recv(_RECV_SIZE):
                at = time.monotonic()
                if log is not None:
                    log.write(data)
                    log.flush()
                self._take(data, at)
        except OSError:
            pass  # The socket was shut down by close(): the same end as EOF.
        finally:
            if log is not None:
                log.close()
            with self._changed:
                self._eof = True
                self._changed.notify_all()

    def _take(self, data: bytes, at: float) -> None:
        with self._changed:
            *complete, self._partial = (self._partial + data).split(b"\n")
            for raw in complete:
                self._lines.append(Line(raw.decode(errors="replace").strip("\r"), at))
            if complete:
                self._changed.notify_all()
