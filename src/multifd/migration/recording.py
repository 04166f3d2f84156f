"""Record an incoming migration into a directory; replay it into a destination later.

A recording holds what a destination needs to resume the machine, split where the relay
splits the stream (:mod:`multifd.migration.relay`)::

    DIR/manifest.json        what is there, with sizes and SHA-256 checksums
    DIR/configuration.bin    the configuration record, as the source sent it
    DIR/ram/<block>          each RAM block's final content (name quoted as a file name)
    DIR/tail.bin             everything after the ram section: device state, EOF, VM
                             description, undecoded

The manifest is written last, so a recording without one is incomplete. :func:`replay`
checks the manifest and every checksum before it connects anywhere, then sends a one-pass
migration: the configuration, every page of every block (zero pages included: the
destination's own copy of a firmware block holds its own content), the ``ram`` END and
the tail, so a QEMU started with ``-incoming`` resumes the machine where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import numpy as np

from multifd import transport
from multifd.address import Address, listen_address, target_address
from multifd.errors import ChannelRefused, ConfigError, MigrationFailed, MultifdError
from multifd.migration.destination import block_filename
from multifd.migration.incoming import Incoming
from multifd.migration.relay import AS_SOURCE
from multifd.migration.source import RamSection, Source
from multifd.migration.stats import MigrationStats, Status
from multifd.migration.ticker import ticking
from multifd.ram import Ram, RamBlock
from multifd.tls import TlsConfig
from multifd.wire import stream
from multifd.wire.compat import PROFILES, PeerProfile, SyncMode, ZeroPageMode

log = logging.getLogger("multifd.recording")

FORMAT: Final = "multifd-recording"
FORMAT_VERSION: Final = 1
MANIFEST: Final = "manifest.json"
CONFIGURATION: Final = "configuration.bin"
TAIL: Final = "tail.bin"
RAM_DIR: Final = "ram"
_CHUNK: Final = 1 << 20  # bytes hashed or forwarded per step
_T = TypeVar("_T")


class RecordingError(ConfigError):
    """A recording is missing, incomplete, corrupt or truncated."""


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a recording: its path relative to the directory, size and SHA-256."""

    file: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class BlockEntry:
    """One RAM block of a recording."""

    name: str
    data: FileEntry


@dataclass(frozen=True, slots=True)
class SourceSeen:
    """What the recorded source did that a destination must match (spec 11.4)."""

    sync_mode: str  # "per-section" or "per-round"
    zero_pages: str  # "legacy", "multifd" or "none seen"
    switchover_start: bool
    channels: int
    compression: str
    uuid: str | None  # hex of the multifd init packets' UUID

    def profile(self) -> PeerProfile:
        """A peer profile that sends what this source sent (zero pages as ZERO records)."""
        return PeerProfile(
            AS_SOURCE,
            SyncMode(self.sync_mode),
            ZeroPageMode.LEGACY,
            switchover_start=self.switchover_start,
            description="as the recorded source",
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """The contents of ``manifest.json``."""

    machine: str
    configuration: FileEntry
    ram_section: RamSection
    blocks: tuple[BlockEntry, ...]
    tail: FileEntry
    source: SourceSeen

    def to_json(self) -> dict[str, Any]:
        section = self.ram_section
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "machine": self.machine,
            "configuration": self.configuration.to_json(),
            "ram_section": {
                "section_id": section.section_id,
                "instance_id": section.instance_id,
                "version_id": section.version_id,
            },
            "blocks": [{"name": b.name, **b.data.to_json()} for b in self.blocks],
            "tail": self.tail.to_json(),
            "source": {
                "sync_mode": self.source.sync_mode,
                "zero_pages": self.source.zero_pages,
                "switchover_start": self.source.switchover_start,
                "channels": self.source.channels,
                "compression": self.source.compression,
                "uuid": self.source.uuid,
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse a manifest; raises ``KeyError``, ``TypeError`` or ``ValueError`` if bad."""
        if data["format"] != FORMAT or data["version"] != FORMAT_VERSION:
            raise ValueError(f"format {data['format']!r} version {data['version']!r}")
        section = data["ram_section"]
        source = data["source"]
        return cls(
            machine=_typed(data["machine"], str),
            configuration=_file_entry(data["configuration"]),
            ram_section=RamSection(
                _typed(section["section_id"], int),
                _typed(section["instance_id"], int),
                _typed(section["version_id"], int),
            ),
            blocks=tuple(
                BlockEntry(_typed(b["name"], str), _file_entry(b)) for b in data["blocks"]
            ),
            tail=_file_entry(data["tail"]),
            source=SourceSeen(
                sync_mode=SyncMode(source["sync_mode"]).value,
                zero_pages=_typed(source["zero_pages"], str),
                switchover_start=_typed(source["switchover_start"], bool),
                channels=_typed(source["channels"], int),
                compression=_typed(source["compression"], str),
                uuid=source["uuid"] if source["uuid"] is None else _typed(source["uuid"], str),
            ),
        )


def _typed(value: Any, kind: type[_T]) -> _T:
    if not isinstance(value, kind):
        raise TypeError(f"{value!r} is not {kind.__name__}")
    return value


def _file_entry(data: Any) -> FileEntry:
    size = _typed(data["size"], int)
    if size < 0:
        raise ValueError(f"negative size {size}")
    return FileEntry(_typed(data["file"], str), size, _typed(data["sha256"], str))


# -- record ------------------------------------------------------------------------------------
class Recorder:
    """Receives one migration into a recording directory.

    One thread runs :meth:`run`; the incoming side calls the sink methods from it.

    Args:
        directory: where the recording goes; it must not hold one already.
        channels: the source's multifd channel count (0: multifd off).
        compression: the source's compression method.
        io_timeout: seconds a channel may stall.
        setup_timeout: seconds for every channel to connect.
        on_refused: told about each connection refused during setup, as it is.
    """

    def __init__(
        self,
        directory: Path,
        *,
        channels: int = 2,
        compression: str = "none",
        io_timeout: float = 30.0,
        setup_timeout: float = 60.0,
        on_refused: Callable[[ChannelRefused], None] | None = None,
    ) -> None:
        if (directory / MANIFEST).exists():
            raise ConfigError(f"{directory} already holds a recording")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.channels = channels
        self.compression = compression
        self.incoming = Incoming(
            self,
            track_changes=False,
            channels=channels,
            compression=compression,
            output=directory / RAM_DIR,
            io_timeout=io_timeout,
            setup_timeout=setup_timeout,
            on_refused=on_refused,
        )
        # Owned by the thread in run().
        self._configuration: FileEntry | None = None
        self._tail: IO[bytes] | None = None
        self._tail_hash = hashlib.sha256()
        self._manifest: Manifest | None = None

    def run(self, listener: transport.Listener) -> tuple[MigrationStats, Manifest]:
        """Receive the migration from ``listener`` and write the recording.

        Raises:
            MigrationFailed: the migration failed; no manifest is written.
        """
        try:
            stats = self.incoming.run(listener)
        finally:
            if self._tail is not None:
                self._tail.close()
            self.incoming.ram.close()
        assert self._manifest is not None, "written at the end of the stream"
        return stats, self._manifest

    # -- the sink --------------------------------------------------------------------------
    def configuration(self, raw: bytes) -> None:
        (self.directory / CONFIGURATION).write_bytes(raw)
        self._configuration = FileEntry(CONFIGURATION, len(raw), hashlib.sha256(raw).hexdigest())

    def command(self, cmd: int, raw: bytes) -> None:
        """Switchover-start is noted by the incoming side; replay emits it per profile."""

    def marker(self, marker: str, *, in_end: bool) -> None:
        """Pages land in the block files directly: nothing to do at a marker."""

    def ram_end(self) -> None:
        self._tail = (self.directory / TAIL).open("wb")

    def tail(self, data: bytes) -> None:
        assert self._tail is not None, "the tail follows the ram END"
        self._tail.write(data)
        self._tail_hash.update(data)

    def end_of_stream(self) -> None:
        # The recording is on disk before the source hears SHUT(0) on a return path.
        manifest = self._make_manifest(self.incoming.stats())
        for block in self.incoming.ram:
            block.flush()
        _write_json(self.directory / MANIFEST, manifest.to_json())
        self._manifest = manifest

    # -- the manifest ----------------------------------------------------------------------
    def _make_manifest(self, stats: MigrationStats) -> Manifest:
        incoming = self.incoming
        assert self._configuration is not None, "the configuration comes first"
        assert self._tail is not None, "the ram END came"
        assert incoming.machine is not None, "the configuration names it"
        assert incoming.sync_mode is not None, "set by the first EOS"
        self._tail.flush()
        blocks = tuple(
            BlockEntry(
                block.name,
                FileEntry(
                    f"{RAM_DIR}/{block_filename(block.name)}", block.size, _digest(block.view)
                ),
            )
            for block in incoming.ram
        )
        main, *multifd = stats.channels
        zero = "multifd" if any(ch.zero_pages for ch in multifd) else "none seen"
        uuid = incoming.peer_uuid
        return Manifest(
            machine=incoming.machine,
            configuration=self._configuration,
            ram_section=incoming.ram_section or RamSection(),
            blocks=blocks,
            tail=FileEntry(TAIL, incoming.tail_bytes, self._tail_hash.hexdigest()),
            source=SourceSeen(
                sync_mode=incoming.sync_mode.value,
                zero_pages="legacy" if main.zero_pages else zero,
                switchover_start=incoming.switchover_seen,
                channels=self.channels,
                compression=self.compression,
                uuid=uuid.hex() if uuid is not None else None,
            ),
        )


def _digest(view: memoryview) -> str:
    digest = hashlib.sha256()
    for start in range(0, len(view), _CHUNK):
        digest.update(view[start : start + _CHUNK])
    return digest.hexdigest()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``path`` whole or not at all: a reader never sees half a manifest."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def record(
    listen: str,
    directory: str | Path,
    *,
    channels: int = 2,
    compression: str = "none",
    io_timeout: float = 30.0,
    setup_timeout: float = 60.0,
    tls: TlsConfig | None = None,
    on_listening: Callable[[str], None] | None = None,
    on_refused: Callable[[ChannelRefused], None] | None = None,
    progress: Callable[[MigrationStats], None] | None = None,
    progress_interval: float = 0.25,
) -> tuple[MigrationStats, Manifest]:
    """Listen at ``listen``, receive one migration and store it in ``directory``.

    With ``tls`` (this end's credentials), every channel must run TLS 1.3; the recording
    holds the migration's content, never its encryption. ``on_refused`` is told about each
    connection refused during setup, as it is; ``progress`` gets the statistics every
    ``progress_interval`` seconds and once more at the end (see :func:`multifd.receive`).

    Raises:
        ConfigError: bad address or credentials, or ``directory`` already holds a
            recording.
        MigrationFailed: the migration failed (no manifest is written).
    """
    listen_at = listen_address(listen, tls)
    recorder = Recorder(
        Path(directory),
        channels=channels,
        compression=compression,
        io_timeout=io_timeout,
        setup_timeout=setup_timeout,
        on_refused=on_refused,
    )
    with transport.listen(listen_at) as listener:
        if on_listening is not None:
            on_listening(str(listener.address))
        with ticking(recorder.incoming.stats, progress, progress_interval):
            return recorder.run(listener)


# -- load and replay ---------------------------------------------------------------------------
@dataclass
class Recording:
    """A verified recording, its blocks mapped (privately: replay never writes the files).

    Use it as a context manager, or call :meth:`close`.
    """

    directory: Path
    manifest: Manifest
    configuration: bytes
    ram: Ram
    tail: bytes

    @classmethod
    def load(cls, directory: str | Path) -> Recording:
        """Read and verify a recording: the manifest, then every file's size and SHA-256.

        Raises:
            RecordingError: something is missing, truncated or corrupt; the message names
                the file.
        """
        root = Path(directory)
        manifest = _read_manifest(root)
        configuration = _checked_bytes(root, manifest.configuration)
        _check_configuration(root / manifest.configuration.file, configuration, manifest)
        tail = _checked_bytes(root, manifest.tail)
        ram = Ram()
        try:
            for entry in manifest.blocks:
                ram.add(_checked_block(root, entry))
        except BaseException:
            ram.close()
            raise
        return cls(root, manifest, configuration, ram, tail)

    def close(self) -> None:
        self.ram.close()

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordingError(f"{path}: missing (not a recording, or an incomplete one)") from None
    except (OSError, ValueError) as exc:
        raise RecordingError(f"{path}: unreadable: {exc}") from exc
    try:
        return Manifest.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordingError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest: {exc!r}") from exc


def _inside(root: Path, entry: FileEntry) -> Path:
    path = root / entry.file
    if not path.resolve().is_relative_to(root.resolve()):
        raise RecordingError(f"{root / MANIFEST}: {entry.file!r} is outside the recording")
    return path


def _check(path: Path, entry: FileEntry, size: int, digest: str) -> None:
    if size != entry.size:
        raise RecordingError(
            f"{path}: {size} bytes, the manifest says {entry.size} (truncated or replaced)"
        )
    if digest != entry.sha256:
        raise RecordingError(
            f"{path}: SHA-256 {digest} differs from the manifest's {entry.sha256} (corrupt)"
        )


def _checked_bytes(root: Path, entry: FileEntry) -> bytes:
    path = _inside(root, entry)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecordingError(f"{path}: {exc.strerror or exc}") from exc
    _check(path, entry, len(data), hashlib.sha256(data).hexdigest())
    return data


def _checked_block(root: Path, entry: BlockEntry) -> RamBlock:
    path = _inside(root, entry.data)
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if not size:
                raise RecordingError(f"{path}: empty, the manifest says {entry.data.size} bytes")
            if size != entry.data.size:
                _check(path, entry.data, size, "")  # raises: the size differs
            # A private mapping: the sender may touch pages, the file stays as recorded.
            mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)
    except OSError as exc:
        raise RecordingError(f"{path}: {exc.strerror or exc}") from exc
    try:
        _check(path, entry.data, size, _digest(memoryview(mapping)))
        return RamBlock(entry.name, mapping)
    except BaseException:
        mapping.close()
        raise


def _check_configuration(path: Path, raw: bytes, manifest: Manifest) -> None:
    decoder = stream.StreamDecoder()
    decoder.feed(stream.file_header() + raw)
    try:
        events = list(decoder.events())
    except MultifdError as exc:
        raise RecordingError(f"{path}: not a configuration record: {exc}") from exc
    machines = [e.machine for e in events if isinstance(e, stream.Configuration)]
    if machines != [manifest.machine] or decoder.offset != len(raw) + 8:
        raise RecordingError(f"{path}: not the configuration of machine {manifest.machine!r}")


def replay(
    directory: str | Path,
    target: str,
    *,
    channels: int = 2,
    compression: str = "none",
    level: int | None = None,
    peer: str = AS_SOURCE,
    uuid: bytes | None = None,
    return_path: bool = True,
    io_timeout: float = 30.0,
    connect_timeout: float = 10.0,
    tls: TlsConfig | None = None,
) -> MigrationStats:
    """Send a recording to the destination at ``target`` as a one-pass migration.

    Everything is verified before the first connection.

    Args:
        directory: the recording.
        target: the destination's address (a QEMU started with ``-incoming``).
        channels: multifd channels (0: multifd off).
        compression: ``none``, ``zlib`` or ``zstd``.
        level: compression level; None for QEMU's default.
        peer: a profile name, or ``as-source`` for what the recorded source did.
        uuid: the multifd UUID; None reuses the recorded source's.
        return_path: open QEMU's return path and succeed only once the destination says
            it completed.
        io_timeout: seconds a channel may stall.
        connect_timeout: seconds for each connection.
        tls: this end's credentials: every channel then runs TLS 1.3 (see ``docs/tls.md``).

    Raises:
        RecordingError: the recording is missing, truncated or corrupt (nothing was sent).
        ConfigError: another argument is invalid.
        MigrationFailed: the migration failed.
    """
    address = target_address(target, tls)
    if peer != AS_SOURCE and peer not in PROFILES:
        raise ConfigError(f"unknown peer {peer!r} (known: {AS_SOURCE}, {', '.join(PROFILES)})")
    with Recording.load(directory) as recording:
        manifest = recording.manifest
        recorded_uuid = bytes.fromhex(manifest.source.uuid) if manifest.source.uuid else None
        source = Source(
            recording.ram,
            manifest.source.profile() if peer == AS_SOURCE else PROFILES[peer],
            channels=channels,
            uuid=uuid or recorded_uuid or bytes(16),
            compression=compression,
            level=level,
            io_timeout=io_timeout,
            configuration=recording.configuration,
            ram_section=manifest.ram_section,
            device_state=False,
            return_path=return_path,
        )
        started = time.monotonic()
        _send(source, recording, address, connect_timeout)
        return MigrationStats(
            status=Status.COMPLETED,
            total_time_ms=(time.monotonic() - started) * 1e3,
            setup_time_ms=source.setup_ms,
            total=recording.ram.total_size,
            dirty_sync_count=source.syncs,
            channels=source.channel_stats(),
        )


def _send(source: Source, recording: Recording, address: Address, connect_timeout: float) -> None:
    try:
        source.open(address, connect_timeout=connect_timeout)
        source.setup()
        source.send_pass({b.name: np.arange(b.page_count, dtype=np.int64) for b in recording.ram})
        source.complete({})
        tail = memoryview(recording.tail)
        for start in range(0, len(tail), _CHUNK):
            source.forward(tail[start : start + _CHUNK])
        source.await_destination()
    except MultifdError as exc:
        source.abort(exc)
        if isinstance(exc, MigrationFailed):
            raise
        raise MigrationFailed(f"replay to {address}: {exc}") from exc
    except BaseException as exc:
        source.abort(exc)
        raise
    finally:
        source.close()
