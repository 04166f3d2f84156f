"""A real ``qemu-system-x86_64`` driven over QMP, for interop tests and benchmarks.

Theory of operation: each :class:`QemuVm` is a RAM-only machine (``-M none``) whose RAM is
one ``memory-backend-file`` called ``mem`` with ``share=on``, so the guest's RAM *is* the
backing file: a source's memory is whatever the test wrote into the file before starting
QEMU, and a destination's file holds the migrated memory as soon as the destination
reports ``completed`` (QEMU writes the pages through its shared mapping).

QMP runs over one end of a ``socketpair`` handed to QEMU as ``-chardev socket,fd=N``: no
socket file, no connect race, and QEMU dying shows up as EOF. The async
:class:`qemu.qmp.QMPClient` runs on a private event loop that only turns while a call is
in progress, so no thread is left behind; every call is bounded by a timeout. Migration
status changes are awaited as QMP ``MIGRATION`` events (the ``events`` capability is
always switched on), in short slices so a QEMU that died is noticed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import numpy as np
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

PAGE_SIZE: Final = 4096
BLOCK_NAME: Final = "mem"  # a memory-backend's id is its RAMBlock name (spec 7.4)
QEMU_BINARY: Final = "qemu-system-x86_64"
# Statuses after which a migration never changes again.
TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
# How long one wait for an event lasts before the harness checks that QEMU is alive.
_EVENT_SLICE: Final = 0.25
# How long a QEMU that dropped QMP gets to finish exiting before an error reports it.
_EXIT_GRACE: Final = 2.0
# Images are generated, written and compared in slices this large, so a 2 GiB image needs
# no 2 GiB temporary (and the benchmark's own peak RSS stays low, see ram_mismatch).
_IMAGE_CHUNK: Final = 16 << 20

_T = TypeVar("_T")


class QemuError(Exception):
    """QEMU failed to start, died, refused a command or missed a deadline."""


@dataclass(frozen=True, slots=True)
class MigrationState:
    """The outcome of :meth:`QemuVm.wait_for_status`.

    Attributes:
        status: the status that ended the wait.
        info: ``query-migrate`` as it stood right after the wait.
        event_time: host wall-clock time (``time.time()`` scale) at which QEMU announced
            ``status`` in a ``MIGRATION`` event, or None if no event was seen for it.
    """

    status: str
    info: dict[str, Any]
    event_time: float | None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def write_ram_image(path: Path, size: int, *, seed: int, pattern: str = "mixed") -> None:
    """Write a deterministic RAM image of ``size`` bytes to ``path``.

    Args:
        path: the file to create or overwrite.
        size: a positive multiple of the page size.
        seed: the random seed; the same seed gives the same bytes.
        pattern: ``"random"`` (every page random) or ``"mixed"``: per page, at random,
            random bytes, all zeros, one repeated byte, or a copy of one template page,
            so zero-page detection, compression and plain pages are all exercised.
    """
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"image size {size} is not a positive multiple of {PAGE_SIZE}")
    if pattern not in {"random", "mixed"}:
        raise ValueError(f"unknown image pattern {pattern!r}")
    rng = np.random.default_rng(seed)
    template = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    with path.open("wb") as out:
        for start in range(0, size, _IMAGE_CHUNK):
            length = min(_IMAGE_CHUNK, size - start)
            out.write(_image_chunk(rng, length, template, mixed=pattern == "mixed").data)


def _image_chunk(
    rng: np.random.Generator, length: int, template: np.ndarray[Any, Any], *, mixed: bool
) -> np.ndarray[Any, Any]:
    pages = np.frombuffer(rng.bytes(length), dtype=np.uint8).reshape(-1, PAGE_SIZE).copy()
    if mixed:
        kind = rng.integers(0, 4, len(pages))
        pages[kind == 1] = 0
        fills = rng.integers(1, 256, len(pages), dtype=np.uint8)
        pages[kind == 2] = fills[kind == 2, None]
        pages[kind == 3] = template
    return pages


class QemuVm:
    """A ``qemu-system-x86_64 -M none`` process with file-backed RAM, driven over QMP.

    Use it as a context manager: entering starts QEMU and connects QMP; leaving always
    kills QEMU, closes the event loop and removes the VM's scratch directory (its log and,
    when the caller gave no ``ram_file``, its RAM file).

    Not thread-safe: one thread drives a VM. All attributes are set in ``__init__`` or by
    :meth:`start` and are touched only by the driving thread.
    """

    def __init__(
        self,
        size: int,
        *,
        ram_file: Path | None = None,
        name: str = "vm",
        uuid: str | None = None,
        incoming: bool = False,
        paused: bool = False,
        prealloc: bool = False,
        binary: str = QEMU_BINARY,
        scratch_parent: Path | None = None,
        timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Describe a VM; :meth:`start` (or ``with``) runs it.

        Args:
            size: RAM size in bytes (a multiple of the page size).
            ram_file: the backing file; created by QEMU if missing. None means a file in
                the VM's scratch directory, removed on close.
            name: used for ``-name``, the QMP client and the scratch directory.
            uuid: passed as ``-uuid`` (multifd init packets carry it, spec 2.3).
            incoming: start with ``-incoming defer`` (a migration destination).
            paused: start with ``-S``.
            prealloc: pre-allocate the backing memory (``prealloc=on``).
            binary: the QEMU executable.
            scratch_parent: where the scratch directory goes (default: the temp dir).
            timeout: the bound on starting QEMU and on every QMP command.
            extra_args: appended to the command line as given, e.g.
                ``("-global", "migration.send-switchover-start=off")``.
        """
        self.size: Final = size
        self.name: Final = name
        self.timeout: Final = timeout
        self.uuid: Final = uuid
        self._flags = {"incoming": incoming, "paused": paused, "prealloc": prealloc}
        self._binary = binary
        self._extra_args = tuple(extra_args)
        self._scratch = Path(tempfile.mkdtemp(prefix=f"qemu-{name}-", dir=scratch_parent))
        self.ram_path: Final = ram_file if ram_file is not None else self._scratch / "ram"
        self.log_path: Final = self._scratch / "qemu.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._qmp: QMPClient | None = None
        self._events = EventListener("MIGRATION")

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> QemuVm:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def command_line(self, qmp_fd: int) -> list[str]:
        """The QEMU command line, with QMP on the already connected socket ``qmp_fd``."""
        flags = self._flags
        backend = (
            f"memory-backend-file,id={BLOCK_NAME},size={self.size},"
            f"mem-path={_qemu_escape(str(self.ram_path))},share=on"
        )
        args = [self._binary, "-name", self.name, "-M", f"none,memory-backend={BLOCK_NAME}"]
        args += ["-object", backend + (",prealloc=on" if flags["prealloc"] else "")]
        args += ["-nodefaults", "-display", "none"]
        args += ["-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control"]
        args += ["-uuid", self.uuid] if self.uuid else []
        args += ["-incoming", "defer"] if flags["incoming"] else []
        args += ["-S"] if flags["paused"] else []
        return args + list(self._extra_args)

    def start(self) -> None:
        """Start QEMU and connect QMP; raises :class:`QemuError` if QEMU does not come up."""
        if self._proc is not None:
            raise QemuError(f"{self.name}: already started")
        ours, theirs = socket.socketpair()
        try:
            with theirs, self.log_path.open("wb") as log:
                self._proc = subprocess.Popen(
                    self.command_line(theirs.fileno()),
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        except OSError as exc:
            ours.close()
            self.close()
            raise QemuError(f"{self.name}: cannot run {self._binary}: {exc}") from exc
        self._loop = asyncio.new_event_loop()
        self._qmp = QMPClient(self.name)
        self._qmp.register_listener(self._events)
        try:
            self._call(self._qmp.connect(ours), "connect")
        except QemuError:
            ours.close()
            self.close()
            raise

    def quit(self) -> int:
        """Ask QEMU to quit and wait for it; returns its exit status."""
        with contextlib.suppress(QemuError):
            self.execute("quit")
        proc = self._require_proc()
        try:
            return proc.wait(self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise QemuError(f"{self.name}: did not exit after quit") from exc

    def close(self) -> None:
        """Kill QEMU, close QMP and the loop, remove the scratch directory (idempotent)."""
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(self.timeout)
            if self._qmp is not None and self._loop is not None:
                # EOF or a reset from a QEMU that is gone is the expected end here.
                with contextlib.suppress(QMPError, OSError, EOFError, QemuError):
                    self._call(self._qmp.disconnect(), "disconnect")
        finally:
            if self._loop is not None:
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
                self._loop.close()
            self._qmp = self._loop = None
            shutil.rmtree(self._scratch, ignore_errors=True)

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs (or before it started)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self._require_proc().pid

    def log(self) -> str:
        """Everything QEMU wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- QMP -------------------------------------------------------------------------------
    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises:
            QemuError: the command failed, QEMU is gone, or no reply came in time.
        """
        qmp = self._require_qmp()
        return self._call(qmp.execute(command, arguments or None), command)

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (e.g. ``info ramblock``) and return its output."""
        return str(self.execute("human-monitor-command", **{"command-line": command_line}))

    def set_capabilities(self, *, multifd: bool, **others: bool) -> None:
        """Set migration capabilities; ``events`` is always on (the waits rely on it).

        Args:
            multifd: the ``multifd`` capability.
            **others: more capabilities, ``snake_case`` or ``kebab-case`` names.
        """
        states = {"events": True, "multifd": multifd} | {
            _kebab(key): value for key, value in others.items()
        }
        caps = [{"capability": key, "state": value} for key, value in states.items()]
        self.execute("migrate-set-capabilities", capabilities=caps)

    def set_parameters(self, **params: Any) -> None:
        """``migrate-set-parameters``; ``multifd_channels`` means ``multifd-channels``."""
        self.execute("migrate-set-parameters", **{_kebab(k): v for k, v in params.items()})

    def configure(
        self,
        channels: int,
        *,
        max_bandwidth: int | None = None,
        compression: str = "none",
        level: int | None = None,
    ) -> None:
        """Multifd with ``channels`` channels, or plain migration when ``channels`` is 0.

        Args:
            channels: the multifd channel count; 0 switches multifd off.
            max_bandwidth: bytes per second; None keeps QEMU's default (128 MiB/s in 7.2,
                which would make every source the bottleneck).
            compression: ``multifd-compression`` (``none``, ``zlib`` or ``zstd``); only
                set when it is not ``none``, so QEMU's default stays untouched otherwise.
            level: ``multifd-zlib-level`` or ``multifd-zstd-level`` (by ``compression``);
                None keeps QEMU's default.
        """
        self.set_capabilities(multifd=channels > 0)
        params: dict[str, Any] = {"multifd-channels": channels} if channels else {}
        if compression != "none":
            params["multifd-compression"] = compression
        if level is not None:
            params[f"multifd-{compression}-level"] = level
        if max_bandwidth is not None:
            params["max-bandwidth"] = max_bandwidth
        if params:
            self.set_parameters(**params)

    def migrate(self, uri: str) -> None:
        """Start an outgoing migration to ``uri`` (e.g. ``tcp:127.0.0.1:4444``)."""
        self.execute("migrate", uri=uri)

    def migrate_incoming(self, uri: str) -> None:
        """Start listening for an incoming migration (needs ``incoming=True``)."""
        self.execute("migrate-incoming", uri=uri)

    def listen(self, host: str = "127.0.0.1") -> str:
        """``migrate-incoming`` on a free TCP port of ``host``; returns the URI.

        QEMU has bound the port when the command returns, so a source may connect at once.
        """
        uri = f"tcp:{host}:{free_port(host)}"
        self.migrate_incoming(uri)
        return uri

    def query_migrate(self) -> dict[str, Any]:
        """``query-migrate``; an empty dict before any migration."""
        info: dict[str, Any] = self.execute("query-migrate")
        return info

    def wait_for_status(self, statuses: str | Iterable[str], timeout: float) -> MigrationState:
        """Wait until the migration status is one of ``statuses``.

        Raises:
            QemuError: the migration ended in another terminal status (the message holds
                QEMU's ``error-desc`` and log), QEMU died, or ``timeout`` seconds passed.
        """
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)
        deadline = time.monotonic() + timeout
        stamps = {_event_status(e): _event_time(e) for e in self._events.clear()}
        status = self.query_migrate().get("status")
        while status not in wanted:
            if status in TERMINAL_STATUSES:
                raise self._failure(f"migration {status}, wanted {sorted(wanted)}")
            if time.monotonic() >= deadline:
                now = status or "not started"
                raise self._failure(f"migration still {now!r} after {timeout:.1f}s")
            event = self._next_event(min(_EVENT_SLICE, deadline - time.monotonic()))
            if event is not None:
                status = _event_status(event)
                stamps[status] = _event_time(event)
        info = self.query_migrate()
        # QMP messages are read only while this VM's event loop runs: a status reached
        # while the caller was busy elsewhere has its event queued by the query above.
        # QEMU stamped it when it happened; the time of this call is later.
        stamps.update((_event_status(e), _event_time(e)) for e in self._events.clear())
        return MigrationState(str(status), info, stamps.get(str(status)))

    # -- internals -------------------------------------------------------------------------
    def _next_event(self, timeout: float) -> Mapping[str, Any] | None:
        try:
            event: Mapping[str, Any] = self._call(self._events.get(), "event", max(timeout, 0.0))
        except QemuError:
            if self.returncode is not None:
                raise
            return None
        return event

    def _call(self, coro: Coroutine[Any, Any, _T], what: str, timeout: float | None = None) -> _T:
        if self._loop is None:
            coro.close()
            raise QemuError(f"{self.name}: not running")
        bound = self.timeout if timeout is None else timeout
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, bound))
        except TimeoutError as exc:
            raise self._failure(f"{what}: no answer within {bound:.2f}s") from exc
        except ExecuteError as exc:
            raise self._failure(f"{what}: {exc}") from exc
        except (QMPError, OSError, EOFError) as exc:
            # A lost connection usually means QEMU is exiting: let the message say how.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._require_proc().wait(_EXIT_GRACE)
            raise self._failure(f"{what}: {exc}") from exc

    def _failure(self, message: str) -> QemuError:
        error = ""
        if self._qmp is not None and self._loop is not None and self.returncode is None:
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                info = self._loop.run_until_complete(
                    asyncio.wait_for(self._qmp.execute("query-migrate"), self.timeout)
                )
                error = (
                    f"; error-desc: {info.get('error-desc')!r}" if isinstance(info, dict) else ""
                )
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return QemuError(f"{self.name}: {message}{error} (QEMU {state}; log: {self.log()!r})")

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise QemuError(f"{self.name}: not started")
        return self._proc

    def _require_qmp(self) -> QMPClient:
        if self._qmp is None:
            raise QemuError(f"{self.name}: not connected")
        return self._qmp


def _qemu_escape(value: str) -> str:
    # QEMU option values escape a literal comma by doubling it.
    return value.replace(",", ",,")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _event_status(event: Mapping[str, Any]) -> str:
    return str(event["data"]["status"])


def _event_time(event: Mapping[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


def ram_mismatch(expected: Path, actual: Path) -> str | None:
    """Describe how two RAM images differ (size, pages), or None when they are equal.

    Reads both files in chunks rather than mapping them: a mapping would count towards
    this process's peak RSS, which Linux then reports as the peak RSS of every child it
    spawns later (see ``tests/interop/cli.py``).
    """
    if not actual.exists():
        return f"{actual} does not exist"
    sizes = expected.stat().st_size, actual.stat().st_size
    if sizes[0] != sizes[1]:
        return f"{actual} has {sizes[1]} bytes, expected {sizes[0]}"
    bad: list[int] = []
    with expected.open("rb") as left, actual.open("rb") as right:
        for first, (a, b) in enumerate(zip(_page_chunks(left), _page_chunks(right), strict=True)):
            differ = np.flatnonzero(np.any(a != b, axis=1))
            bad.extend(int(i) + first * (_IMAGE_CHUNK // PAGE_SIZE) for i in differ)
    if not bad:
        return None
    pages = sizes[0] // PAGE_SIZE
    return f"{len(bad)} of {pages} pages differ, first at offset {bad[0] * PAGE_SIZE:#x}"


def zero_page_count(image: Path) -> int:
    """How many pages of ``image`` are all zeros (QEMU's ``duplicate`` counter)."""
    with image.open("rb") as file:
        return sum(int(np.count_nonzero(~pages.any(axis=1))) for pages in _page_chunks(file))


def _page_chunks(file: io.BufferedReader) -> Iterator[np.ndarray[Any, Any]]:
    # One reused buffer per file; each chunk is a (pages, PAGE_SIZE) view valid until the
    # next iteration.
    buffer = bytearray(_IMAGE_CHUNK)
    while length := file.readinto(buffer):
        usable = length - length % PAGE_SIZE
        yield np.frombuffer(buffer, dtype=np.uint8, count=usable).reshape(-1, PAGE_SIZE)
