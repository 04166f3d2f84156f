"""A real guest (``scripts/guest.sh``) under QEMU, its migration, and the check of one.

Theory of operation: :class:`Guest` is a :class:`~tests.interop.qemu.QemuVm` (QMP over a
socketpair, event-driven waits, one idempotent close) with another command line: a q35
machine booting the Debian cloud kernel and the busybox initramfs under TCG, its serial
console on a unix socket read by :class:`~tests.vm.console.SerialConsole`. QEMU connects
to that socket while it starts (a client chardev), so the connection waits in our
listener's backlog and no output is lost.

:func:`migrate` runs one migration to completion; :func:`check_migration` then proves
the guest went on where it stopped: the source ends ``postmigrate`` and the destination
``running``, the destination's first heartbeat is the source's last plus one, the beats
on each side are consecutive and every checksum line on both sides matches the beats it
covers. It measures the guest-visible pause (the host-side gap between the source's last
heartbeat and the destination's first) beside QEMU's own ``downtime``.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from multifd.migration.relay import OutSettings, RelayStats, relay
from tests.interop.cli import as_uri
from tests.interop.qemu import QemuError, QemuVm
from tests.relay.helpers import Listening
from tests.vm.console import Beat, Checksum, Line, SerialConsole, Transcript, gaps, parse

_T = TypeVar("_T")

MACHINE: Final = "pc-q35-7.2"
MEMORY_MIB: Final = 256
# Lifts the 128 MiB/s max-bandwidth default, which would throttle every source.
FAST: Final = 10 << 30
# The guest dirties RAM all the time; this bound on the stop-and-copy phase lets every
# migration converge on a loaded 2-core host (QEMU's default is 300 ms).
DOWNTIME_LIMIT_MS: Final = 300
# A boot takes 2-3 s under TCG; this bound allows for a busy host.
BOOT_TIMEOUT: Final = 30.0
MIGRATION_TIMEOUT: Final = 30.0
_REPO: Final = Path(__file__).resolve().parents[2]
# A first build downloads about 37 MB (package lists and packages); later runs only hash.
_BUILD_TIMEOUT: Final = 600.0
LOCAL: Final = "tcp:127.0.0.1:0"  # where a relay or a recorder listens
# The guest prints a checksum every 10 beats (about 1.2 s): a wait for one is bounded so.
CHECKSUM_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class GuestKernel:
    """The two files ``scripts/guest.sh`` builds."""

    vmlinuz: Path
    initrd: Path

    @classmethod
    def build(cls, out: Path, timeout: float = _BUILD_TIMEOUT) -> GuestKernel:
        """Run ``scripts/guest.sh`` into ``out`` (a no-op once the guest is built there).

        Raises:
            RuntimeError: the script failed (its stderr says why); OSError or
                ``subprocess.TimeoutExpired`` if it could not run or took too long.
        """
        built = subprocess.run(
            ["bash", str(_REPO / "scripts" / "guest.sh"), str(out)],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if built.returncode != 0:
            raise RuntimeError(f"scripts/guest.sh failed: {built.stderr.strip()[-2000:]}")
        return cls(out / "vmlinuz", out / "initrd.gz")


@dataclass(frozen=True, slots=True)
class Settings:
    """One side's multifd settings (``channels=0`` is plain migration)."""

    channels: int = 2
    compression: str = "none"
    level: int | None = None


@dataclass(frozen=True, slots=True)
class Migration:
    """A completed migration as the host saw it.

    Attributes:
        elapsed: seconds from the ``migrate`` command to the source's ``completed``.
        info: the source's ``query-migrate`` right after completion.
    """

    elapsed: float
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Report:
    """What :func:`check_migration` found and measured.

    Attributes:
        last_source_beat: the source's last heartbeat.
        first_dest_beat: the destination's first heartbeat (``last_source_beat.n + 1``).
        pause: seconds between those two beats arriving, as the host saw them.
        beat_period: the median interval of the source's beats (the pause a beat
            takes when nothing stops the guest).
        downtime_ms: QEMU's ``downtime`` of the migration.
        total_time_ms: QEMU's ``total-time`` of the migration.
        checksums: how many checksum lines were verified (both sides).
    """

    last_source_beat: Beat
    first_dest_beat: Beat
    pause: float
    beat_period: float
    downtime_ms: int
    total_time_ms: int
    checksums: int

    def summary(self) -> str:
        """One line for logs and reports."""
        return (
            f"beats {self.last_source_beat.n}->{self.first_dest_beat.n}, "
            f"pause {self.pause * 1e3:.0f} ms (beat period {self.beat_period * 1e3:.0f} ms), "
            f"QEMU downtime {self.downtime_ms} ms, total {self.total_time_ms} ms, "
            f"{self.checksums} checksums ok"
        )


class Guest(QemuVm):
    """The test guest under one QEMU binary; a migration source, or a destination.

    Use it as a context manager, like :class:`QemuVm`; leaving kills QEMU and joins the
    console reader. Not thread-safe: one thread drives a guest (the console reader is
    internal and shares only through :class:`SerialConsole`).

    Attributes:
        started_at: ``time.monotonic()`` just before QEMU was started (None before).
    """

    def __init__(
        self,
        binary: str,
        kernel: GuestKernel,
        *,
        name: str = "guest",
        incoming: bool = False,
        machine: str = MACHINE,
        memory_mib: int = MEMORY_MIB,
        console_log: Path | None = None,
        scratch_parent: Path | None = None,
        timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Describe a guest; :meth:`start` (or ``with``) runs it.

        Args:
            binary: the QEMU executable (7.2 or the 10.0 wrapper).
            kernel: the kernel and initramfs to boot.
            name: used for ``-name``, the QMP client and thread names.
            incoming: start with ``-incoming defer`` (a migration destination).
            machine: the machine type; both ends of a migration need the same.
            memory_mib: the guest's RAM.
            console_log: a file that receives the raw console output too.
            scratch_parent: where the scratch directory goes (default: the temp dir).
            timeout: the bound on starting QEMU and on every QMP command.
            extra_args: appended to the command line as given.
        """
        super().__init__(
            memory_mib << 20,
            name=name,
            binary=binary,
            scratch_parent=scratch_parent,
            timeout=timeout,
            extra_args=extra_args,
        )
        self.kernel: Final = kernel
        self.machine: Final = machine
        self.incoming: Final = incoming
        self._memory_mib = memory_mib
        self._console_log = console_log
        # A short private directory: a unix socket path must stay under 108 bytes.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="guest-"))
        self._socket_path = self._socket_dir / "console.sock"
        self._console: SerialConsole | None = None
        self.started_at: float | None = None

    def __enter__(self) -> Guest:
        self.start()
        return self

    def command_line(self, qmp_fd: int) -> list[str]:
        """The QEMU command line, with QMP on the already connected socket ``qmp_fd``."""
        args = [self._binary, "-name", self.name, "-M", self.machine, "-accel", "tcg"]
        args += ["-m", f"{self._memory_mib}M", "-nographic", "-nodefaults"]
        args += ["-kernel", str(self.kernel.vmlinuz), "-initrd", str(self.kernel.initrd)]
        args += ["-append", "console=ttyS0"]
        args += ["-chardev", "socket,id=console,path=" + str(self._socket_path).replace(",", ",,")]
        args += ["-serial", "chardev:console"]
        args += ["-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]
        args += ["-incoming", "defer"] if self.incoming else []
        return args + list(self._extra_args)

    def start(self) -> None:
        """Start QEMU, connect QMP and start reading the console."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(self._socket_path))
            listener.listen(1)
            self.started_at = time.monotonic()
            super().start()
            # QEMU connected while creating its chardevs, before QMP came up.
            listener.settimeout(self.timeout)
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                self.close()
                raise QemuError(f"{self.name}: QEMU did not connect its console") from exc
        self._socket_path.unlink()
        conn.settimeout(None)
        self._console = SerialConsole(conn, self.name, self._console_log)
        self._console.start()

    def close(self) -> None:
        """Kill QEMU, stop the console reader, remove scratch files (idempotent)."""
        try:
            super().close()
        finally:
            if self._console is not None:
                self._console.close(self.timeout)
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()
            with contextlib.suppress(OSError):
                self._socket_dir.rmdir()

    def shutdown(self) -> None:
        """Quit QEMU and read its console to the end (every byte it printed is then seen)."""
        self.quit()
        if not self.console.join(self.timeout):
            raise QemuError(f"{self.name}: console still open after QEMU exited")

    @property
    def console(self) -> SerialConsole:
        """The serial console (after :meth:`start`)."""
        if self._console is None:
            raise QemuError(f"{self.name}: not started")
        return self._console

    def run_state(self) -> str:
        """The VM's run state (``running``, ``postmigrate``, ``inmigrate``, ...)."""
        return str(self.execute("query-status")["status"])

    def wait_for_beat(self, after: int = 0, timeout: float = BOOT_TIMEOUT) -> Beat:
        """The first heartbeat numbered above ``after``; waits up to ``timeout`` seconds.

        ``wait_for_beat(0).at - started_at`` is the boot time (QEMU start to first beat).
        """
        beat = self.console.wait(lambda t: _first(b for b in t.beats if b.n > after), timeout)
        if beat is None:
            raise self._stuck(f"no heartbeat after {after} within {timeout:.1f}s")
        return beat

    def wait_for_checksum(self, after: int, timeout: float = CHECKSUM_TIMEOUT) -> Checksum:
        """The first checksum line over more than ``after`` beats."""
        found = self.console.wait(lambda t: _first(c for c in t.checksums if c.n > after), timeout)
        if found is None:
            raise self._stuck(f"no checksum after beat {after} within {timeout:.1f}s")
        return found

    def wait_until_booted(self) -> Beat:
        """Wait for the first heartbeat and then a checksum line: the guest's workload runs.

        Returns the first heartbeat (its ``at`` minus ``started_at`` is the boot time).
        """
        first = self.wait_for_beat(0, BOOT_TIMEOUT)
        self.wait_for_checksum(first.n)
        return first

    def configure_migration(self, settings: Settings, *, source: bool) -> None:
        """Multifd capability and parameters; a source also gets bandwidth and downtime."""
        self.configure(
            settings.channels,
            compression=settings.compression,
            level=settings.level,
            max_bandwidth=FAST if source else None,
        )
        if source:
            self.set_parameters(downtime_limit=DOWNTIME_LIMIT_MS)

    def _stuck(self, message: str) -> QemuError:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return QemuError(
            f"{self.name}: {message} (QEMU {state}; log: {self.log()!r}; "
            f"console tail:\n{self.console.text()})"
        )


def _first(items: Iterable[_T]) -> _T | None:
    return next(iter(items), None)


def start_migration(src: Guest, dst: Guest, source: Settings, dest: Settings | None = None) -> str:
    """Configure both ends (``dest`` defaults to ``source``), listen, migrate; returns the URI."""
    dst.configure_migration(source if dest is None else dest, source=False)
    uri = dst.listen()
    src.configure_migration(source, source=True)
    src.migrate(uri)
    return uri


def migrate(
    src: Guest,
    dst: Guest,
    source: Settings,
    dest: Settings | None = None,
    timeout: float = MIGRATION_TIMEOUT,
) -> Migration:
    """Migrate ``src`` into ``dst`` and wait (up to ``timeout`` s) until both completed."""
    started = time.monotonic()
    start_migration(src, dst, source, dest)
    done = src.wait_for_status("completed", timeout)
    elapsed = time.monotonic() - started
    dst.wait_for_status("completed", timeout)
    return Migration(elapsed, done.info)


def migrate_via_relay(
    src: Guest,
    dst: Guest,
    source: Settings,
    out: OutSettings,
    dest: Settings,
    *,
    downtime_limit_ms: int | None = None,
) -> RelayStats:
    """Migrate ``src`` into ``dst`` through ``multifd relay`` (on a thread of this process)
    and wait until both QEMUs completed; returns what the relay did."""
    dst.configure_migration(dest, source=False)
    relayed = Listening(
        relay,
        LOCAL,
        dst.listen(),
        channels=source.channels,
        compression=source.compression,
        out=out,
    )
    address = relayed.start()
    src.configure_migration(source, source=True)
    if downtime_limit_ms is not None:
        src.set_parameters(downtime_limit=downtime_limit_ms)
    src.migrate(as_uri(address))
    src.wait_for_status("completed", MIGRATION_TIMEOUT)
    dst.wait_for_status("completed", MIGRATION_TIMEOUT)
    return relayed.result()


def check_migration(src: Guest, dst: Guest, timeout: float = CHECKSUM_TIMEOUT) -> Report:
    """Assert that the guest resumed on ``dst`` exactly where it stopped on ``src``.

    The source is shut down on the way (so that its console is read to the end); the
    destination keeps running until it has printed a checksum line after the resume.

    Raises:
        AssertionError: a check failed; the message says which and shows the consoles.
    """
    info = src.query_migrate()
    assert info.get("status") == "completed", f"source migration: {info}"
    assert src.run_state() == "postmigrate", f"source is {src.run_state()}"
    first = dst.wait_for_beat(0, timeout)
    assert dst.run_state() == "running", f"destination is {dst.run_state()}"
    dst.wait_for_checksum(first.n, timeout)
    src.shutdown()
    source, dest = transcripts(src.console, dst.console)
    problems = continuity_problems(source, dest)
    context = f"\n--- source:\n{src.console.text()}\n--- destination:\n{dst.console.text()}"
    assert not problems, "; ".join(problems) + context
    last, resumed = source.beats[-1], dest.beats[0]
    periods = [b.at - a.at for a, b in itertools.pairwise(source.beats)]
    return Report(
        last_source_beat=last,
        first_dest_beat=resumed,
        pause=resumed.at - last.at,
        beat_period=statistics.median(periods) if periods else 0.0,
        downtime_ms=int(info.get("downtime", -1)),
        total_time_ms=int(info.get("total-time", -1)),
        checksums=len(source.checksums) + len(dest.checksums),
    )


def continuity_problems(source: Transcript, dest: Transcript) -> list[str]:
    """Why the two consoles do not show one guest going on across the migration.

    Empty when each side's beats are consecutive, the destination's first beat is the
    source's last plus one, every checksum line is right and no line is garbled.
    """
    problems: list[str] = []
    for side, transcript in (("source", source), ("destination", dest)):
        if transcript.garbled:
            problems.append(f"{side}: garbled lines {list(transcript.garbled)}")
        if not transcript.beats:
            problems.append(f"{side}: no heartbeat")
        if skips := gaps(transcript.beats):
            problems.append(f"{side}: beats skip {skips}")
        if bad := [c.n for c in transcript.checksums if not c.correct]:
            problems.append(f"{side}: wrong checksums at beats {bad}")
    if source.beats and dest.beats and dest.beats[0].n != source.beats[-1].n + 1:
        last, resumed = source.beats[-1].n, dest.beats[0].n
        problems.append(f"source ended at beat {last}, destination resumed at {resumed}")
    return problems


def transcripts(src: SerialConsole, dst: SerialConsole) -> tuple[Transcript, Transcript]:
    """What the source and the destination consoles say, the line cut by the stop mended.

    The guest may have been stopped in the middle of a line: its start is then the
    source's unterminated tail and its end the destination's first line; it counts as
    the destination's, stamped when it was completed there.
    """
    dest_lines = dst.lines()
    tail = src.partial()
    if tail and dest_lines:
        dest_lines[0] = Line(tail + dest_lines[0].text, dest_lines[0].at)
    return parse(src.lines()), parse(dest_lines)
