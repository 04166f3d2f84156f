"""The library API: migrate RAM blocks from Python programs.

Example::

    import multifd

    # destination (one process)
    result = multifd.receive("tcp:0.0.0.0:4444", channels=2)
    data = result.ram["mem"].view

    # source (another process)
    multifd.send("tcp:dest:4444", {"mem": bytearray(64 << 20)}, channels=2)

With TLS, each end passes its own credentials (see ``docs/tls.md``)::

    tls = TlsConfig(cert=Path("dest.pem"), key=Path("dest.key"), ca=Path("ca.pem"))
    multifd.receive("tcp:0.0.0.0:4444", tls=tls)
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from multifd import transport
from multifd.address import listen_address, target_address
from multifd.engine.trace import TraceHook
from multifd.errors import ChannelRefused, ConfigError
from multifd.migration.destination import Destination
from multifd.migration.limits import ReceiveLimits
from multifd.migration.precopy import Hooks, Limits, Precopy, StaticTracker, Tracker
from multifd.migration.stats import MigrationStats, PassStats
from multifd.migration.ticker import ticking
from multifd.ram import Ram, RamBlock
from multifd.tls import TlsConfig
from multifd.wire.compat import profile

__all__ = [
    "BlockSource",
    "ReceiveLimits",
    "Received",
    "TlsConfig",
    "as_ram",
    "check_channels",
    "parse_uuid",
    "receive",
    "send",
]

BlockSource = RamBlock | bytes | bytearray | memoryview | str | os.PathLike[str]

DEFAULT_CHANNELS = 2  # QEMU's multifd-channels default
MAX_CHANNELS = 255  # the init packet's id is one byte


def parse_uuid(text: str | None) -> bytes | None:
    """The 16 raw bytes of a textual UUID, in the order QEMU puts on the wire."""
    if text is None:
        return None
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise ConfigError(f"not a UUID: {text!r}") from None


def check_channels(channels: int) -> int:
    if not 0 <= channels <= MAX_CHANNELS:
        raise ConfigError(f"channels must be 0..{MAX_CHANNELS}, got {channels}")
    return channels


def as_ram(blocks: Ram | Mapping[str, BlockSource]) -> Ram:
    """Build a :class:`Ram` from blocks, byte buffers or file paths, keyed by block name."""
    if isinstance(blocks, Ram):
        return blocks
    ram = Ram()
    for name, item in blocks.items():
        if isinstance(item, RamBlock):
            if item.name != name:
                raise ConfigError(f"block {item.name!r} given under the name {name!r}")
            ram.add(item)
        elif isinstance(item, bytes | bytearray | memoryview):
            ram.add(RamBlock.from_bytes(name, bytes(item)))
        else:
            ram.add(RamBlock.from_file(name, Path(item)))
    if not len(ram):
        raise ConfigError("nothing to send: no blocks")
    return ram


def send(
    address: str,
    blocks: Ram | Mapping[str, BlockSource] | Tracker,
    *,
    channels: int = DEFAULT_CHANNELS,
    peer: str = "native",
    uuid: str | None = None,
    compression: str = "none",
    level: int | None = None,
    connect_timeout: float = 10.0,
    io_timeout: float = 30.0,
    limits: Limits | None = None,
    hooks: Hooks | None = None,
    tls: TlsConfig | None = None,
    trace: TraceHook | None = None,
    on_pass: Callable[[PassStats], None] | None = None,
    progress: Callable[[MigrationStats], None] | None = None,
    return_path: bool = True,
) -> MigrationStats:
    """Migrate ``blocks`` to the destination listening at ``address``.

    Static blocks go in one pass. For memory that is written while it moves, pass a
    tracker instead (:class:`~multifd.dirty.DirtyLog` for writers in this process,
    :class:`~multifd.dirty.ShadowTracker` for other processes): the migration then runs
    pre-copy passes until the rest fits ``limits.downtime_limit``, and calls ``hooks``
    around the switchover.

    Args:
        address: ``tcp:HOST:PORT`` or ``unix:PATH``.
        blocks: a :class:`Ram`; a mapping of block name to a :class:`RamBlock`, a buffer or
            a file path (mapped; its size must be a multiple of 4096); or a tracker.
        channels: multifd channels (0 sends every page on the main channel).
        peer: ``native``, ``qemu-7.2`` or ``qemu-10.0`` (see :mod:`multifd.wire.compat`).
        uuid: the UUID written into every multifd init packet (QEMU's ``-uuid``).
        compression: ``none``, ``zlib`` or ``zstd``.
        level: compression level (QEMU's ``multifd-zlib-level``/``multifd-zstd-level``).
        connect_timeout: seconds allowed for each connection.
        io_timeout: seconds a channel may stall before the migration fails.
        limits: downtime limit, bandwidth cap, pass and time bounds.
        hooks: pause / resume / stopped callbacks around switchover.
        tls: this end's certificate, key and CA: every channel then runs TLS 1.3, and
            the destination's certificate must name the host of ``address`` (or
            ``tls.hostname``, required for ``unix:`` addresses).
        trace: sees every packet and marker sent.
        on_pass: called with each pass's figures.
        progress: called with statistics snapshots while pages are sent.
        return_path: open QEMU's return path and complete only once the destination says
            it completed (its SHUT, awaited up to ``io_timeout`` after the last byte);
            every peer profile answers it, QEMU 7.2 and 10.0 included. False: completed
            once the last byte left, even if the destination then fails.

    Returns:
        The final statistics.

    Raises:
        ConfigError: an argument is invalid.
        MigrationFailed: the migration failed; ``__cause__`` is the first error.
        MigrationCancelled: the migration was cancelled (Ctrl-C in the sending thread).
    """
    target = target_address(address, tls)  # a ConfigError before anything starts
    tracker = blocks if isinstance(blocks, Tracker) else StaticTracker(as_ram(blocks))
    migration = Precopy(
        tracker,
        profile(peer),
        limits=limits,
        hooks=hooks,
        on_pass=on_pass,
        progress=progress,
        channels=check_channels(channels),
        uuid=parse_uuid(uuid) or bytes(16),
        compression=compression,
        level=level,
        io_timeout=io_timeout,
        trace=trace,
        return_path=return_path,
    )
    return migration.migrate(target, connect_timeout=connect_timeout)


@dataclass(frozen=True)
class Received:
    """What :func:`receive` returns: the statistics and the received blocks.

    Attributes:
        stats: the final statistics.
        ram: the received blocks; the caller closes them.
        refused: connections refused during setup while waiting for the source (TLS
            failures, strangers, channels beyond those expected).
    """

    stats: MigrationStats
    ram: Ram
    refused: tuple[ChannelRefused, ...] = ()


def receive(
    address: str,
    *,
    channels: int = DEFAULT_CHANNELS,
    output: str | Path | None = None,
    uuid: str | None = None,
    compression: str = "none",
    io_timeout: float = 30.0,
    setup_timeout: float = 60.0,
    limits: ReceiveLimits | None = None,
    prealloc: Mapping[str, int] | None = None,
    into: Ram | None = None,
    tls: TlsConfig | None = None,
    on_listening: Callable[[str], None] | None = None,
    on_refused: Callable[[ChannelRefused], None] | None = None,
    progress: Callable[[MigrationStats], None] | None = None,
    progress_interval: float = 0.25,
    trace: TraceHook | None = None,
) -> Received:
    """Listen at ``address`` and receive one migration.

    Args:
        address: ``tcp:HOST:PORT`` (port 0 picks a free port) or ``unix:PATH``.
        channels: multifd channels the source uses (0: multifd off).
        output: folder for the blocks (one file per block); None keeps them in memory.
        uuid: if set, a multifd channel with another UUID fails the migration, with an
            error naming the channel and both UUIDs (QEMU's check).
        compression: the method the source uses.
        io_timeout: seconds without progress after which the migration fails.
        setup_timeout: seconds to wait for all channels to connect.
        limits: what a hostile source may announce (:class:`ReceiveLimits`).
        tls: this end's certificate, key and CA: every channel must run TLS 1.3 with a
            client certificate signed by the CA; other connections are refused (logged)
            and the migration goes on waiting for the right source.
        on_listening: called with the real address once connections are accepted.
        on_refused: called with each connection refused during setup, as it is (they are
            also in :attr:`Received.refused`).
        progress: called with a statistics snapshot every ``progress_interval`` seconds
            from a thread of its own, from the moment the address listens, and once more
            with the final figures when the migration has ended (also when it failed).
        progress_interval: seconds between two ``progress`` calls.
        trace: sees every packet and marker received.
        prealloc: block names and sizes to allocate and pre-fault before listening, as a
            QEMU destination is started with its RAM; the source must announce exactly these.
        into: receive into these existing blocks instead (the source must announce exactly
            them); they stay the caller's to close, also on failure.

    A source that opens QEMU's return path (ours by default, QEMU's with the
    ``return-path`` capability) is answered: a PONG for each PING, and a SHUT with the
    outcome at the end.

    Returns:
        The statistics and the blocks; the caller closes ``ram`` when done.

    Raises:
        ConfigError: an argument is invalid.
        MigrationFailed: the migration failed; ``__cause__`` is the first error.
    """
    if into is not None and (prealloc or output is not None):
        raise ConfigError("into= replaces prealloc= and output=")
    destination = Destination(
        channels=check_channels(channels),
        output=Path(output) if output is not None else None,
        uuid=parse_uuid(uuid),
        compression=compression,
        io_timeout=io_timeout,
        setup_timeout=setup_timeout,
        limits=limits,
        trace=trace,
        on_refused=on_refused,
    )
    listen_at = listen_address(address, tls)  # a ConfigError before listening
    try:
        if into is not None:
            destination.adopt(into)
        elif prealloc:
            destination.preallocate(prealloc)
        with transport.listen(listen_at) as listener:
            if on_listening is not None:
                on_listening(str(listener.address))
            with ticking(destination.stats, progress, progress_interval):
                stats = destination.run(listener)
    except BaseException:
        if into is None:
            destination.ram.close()
        raise
    return Received(stats=stats, ram=destination.ram, refused=tuple(destination.refused))
