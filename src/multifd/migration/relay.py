"""A relay between two QEMUs: one migration comes in, another one goes out.

Theory of operation. A relay is a destination and a source sharing one copy of the RAM.
The incoming side (:class:`~multifd.migration.incoming.Incoming`) loads the source's
migration into blocks that note every page whose write has landed. The outgoing side is
a :class:`~multifd.migration.source.Source` driven by one thread, the forwarder, which
keeps taking the changed pages and sending them in rounds (a section, a SYNC on every
channel, the marker the destination expects), while pages go on arriving. A page's flag
is set after its bytes are in place, so a page taken is read after its last counted
write; one written again after the take is flagged again and goes in a later round.

The destination sets the pace. After each incoming packet with pages, a channel's thread
waits while more than 16 MiB are written and not sent yet (until half as many are), and
at each incoming marker, while every incoming channel is parked, the loader waits the
same way for the forwarder: the source sees the relay's end-to-end speed, so its
estimate of the downtime (when to stop its VM) stays honest, and the backlog when it
stops stays small. At the last marker of the ``ram`` END the forwarder stops and the
loader sends what is left in the outgoing END: the time the relay adds while the source's
VM is stopped is that last round, not a copy of the whole END section.

Only the ``ram`` section is decoded and re-encoded. The configuration record is passed on
byte for byte and the ``ram`` section keeps the ids the source announced. Whatever follows
the ``ram`` END (a real machine's device state, EOF, the VM description) is forwarded
undecoded, in order, as it arrives, and only after the outgoing END is written: a
destination never sees EOF unless it has every page. A failure on either side fails both:
the incoming channels are shut down (the QEMU source's migration fails and its VM runs
on) and the outgoing ones are shut down before anything more is written. With QEMU's
return path (on by default towards the destination, and answered to a source that opens
it) the relay waits, after the last byte, for the destination's SHUT and passes its
verdict on: a destination failing while it loads the device state fails the source's
migration too, instead of leaving a stopped source and no running VM.

What the destination needs but the source did not send, or the reverse, comes from the
outgoing peer profile (sync marker, zero pages, ``MIG_CMD_SWITCHOVER_START``). With
``as-source`` the relay copies the source: its sync mode (learnt at the first marker),
zero pages as ZERO records (understood by every QEMU), its switchover-start passed on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from multifd import transport
from multifd.address import Address, listen_address, target_address
from multifd.errors import ChannelRefused, ConfigError, MigrationFailed, MultifdError
from multifd.migration.incoming import Incoming
from multifd.migration.page_sets import (
    Pages,
    count_pages,
    merge_pages,
    split_pages,
    take_changes,
)
from multifd.migration.source import RamSection, Source
from multifd.migration.stats import ChannelStats, MigrationStats
from multifd.migration.ticker import ticking
from multifd.ram import Ram
from multifd.tls import TlsConfig
from multifd.wire.compat import PROFILES, PeerProfile, SyncMode, ZeroPageMode

log = logging.getLogger("multifd.relay")

_T = TypeVar("_T")

AS_SOURCE: Final = "as-source"
OUT_PEERS: Final = (AS_SOURCE, *sorted(PROFILES))
# A round goes out once this many pages (8 MiB) changed, or once the first of them has
# waited _ROUND_WAIT. Each round ends with a SYNC on every channel, which parks the
# destination's channels until its marker: a round of 1400 pages went at half the rate of
# one of 8192. With 256 pages and 2 ms, a relayed real guest's switchover (QEMU's
# downtime) took a median 122 ms over 24 pairs; with these, 50.5 ms in the same run
# (4096 pages and 16 ms measured no better).
_ROUND_PAGES: Final = 2048
_ROUND_WAIT: Final = 0.008
# At most this many pages per round (32 MiB): the switchover waits for the round in
# progress, so a backlog is sent in slices.
_ROUND_MAX: Final = 8192
# At an incoming marker the loader waits for the forwarder only if more pages than this
# (16 MiB) wait to go: the two hops then move pages at once, and the lag stays bounded.
# (A full wait at every marker, with 8 MiB slices, added a median 155 ms to a real
# guest's pause; a 64 MiB lag measured the same as 16.)
_LAG_PAGES: Final = 4096
# Between markers each incoming channel, after a packet, waits while more than this many
# pages (16 MiB) wait to go, until half as many do: the source moves pages no faster than
# the destination takes them, so its estimate of what is left to send (its switchover
# decision against the downtime limit) counts the relay's hop too, and the backlog when
# its VM stops stays small.
_BACKLOG_PAGES: Final = 4096
# Waits on the forwarder wake up this often to notice that it failed.
_SLICE: Final = 0.25


@dataclass(frozen=True, slots=True)
class OutSettings:
    """The outgoing migration's settings (none of them has to match the incoming one).

    Attributes:
        channels: multifd channels (0: every page on the main channel).
        compression: ``none``, ``zlib`` or ``zstd``.
        level: compression level; None for QEMU's default.
        peer: a profile of :data:`~multifd.wire.compat.PROFILES`, or ``as-source``.
        uuid: the UUID of the outgoing init packets; None reuses the source's.
        return_path: open QEMU's return path to the destination and succeed only once it
            says it completed (a source with a return path then hears the same verdict).
    """

    channels: int = 2
    compression: str = "none"
    level: int | None = None
    peer: str = AS_SOURCE
    uuid: bytes | None = None
    return_path: bool = True


@dataclass(frozen=True, slots=True)
class RelayStats:
    """What one relayed migration did.

    Attributes:
        incoming: the incoming side's statistics.
        outgoing: the outgoing channels' traffic, main channel first.
        machine: the machine type of the configuration record.
        sync_mode: the incoming sync mode.
        out_profile: the profile the outgoing side used.
        rounds: outgoing sections with pages before the END.
        pages: pages forwarded, zero pages included (a page may go more than once).
        tail_bytes: bytes passed through after the ``ram`` END.
        complete_ms: the outgoing END (the last pages, a sync): what the relay adds while
            the source's VM is stopped, before the device state goes on.
    """

    incoming: MigrationStats
    outgoing: tuple[ChannelStats, ...]
    machine: str | None
    sync_mode: str | None
    out_profile: str
    rounds: int
    pages: int
    tail_bytes: int
    complete_ms: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {
            "status": self.incoming.status.value,
            "machine": self.machine,
            "sync-mode": self.sync_mode,
            "out-profile": self.out_profile,
            "rounds": self.rounds,
            "pages": self.pages,
            "tail-bytes": self.tail_bytes,
            "complete-ms": round(self.complete_ms, 3),
            "incoming": self.incoming.to_json(),
            "outgoing": [
                {"channel": ch.channel, "packets": ch.packets, "bytes": ch.bytes}
                for ch in self.outgoing
            ],
        }


class _Forwarder:
    """The forwarder thread: sends the pages the incoming side wrote, round after round.

    Sharing: ``source`` belongs to the thread from :meth:`start` until :meth:`stop` or
    :meth:`abort` returns, and to the caller's thread before and after. ``_cond`` guards
    ``_wanted``, ``_stopping``, ``_commands``, ``_error`` and ``_done`` (which only the
    thread writes). The thread alone touches ``_held``, ``_held_since``, ``rounds`` and
    ``pages`` until it has been joined.

    Args:
        source: the outgoing migration, set up (its setup section sent).
        ram: the relay's blocks, tracking changes.
        on_failure: called from the thread with its error (fails the incoming side).
    """

    def __init__(
        self, source: Source, ram: Ram, on_failure: Callable[[BaseException], None]
    ) -> None:
        self.source = source
        self.ram = ram
        self._on_failure = on_failure
        # Guards the fields below; signals a request to the thread, a round to the waiter.
        self._cond = threading.Condition()
        self._wanted = 0  # catch-ups asked for by the loader
        self._done = 0  # catch-ups served: every page written before the request was sent
        self._stopping = False
        self._commands: list[bytes] = []  # records to write between two rounds
        self._error: BaseException | None = None
        self._held: dict[str, Pages] = {}  # taken, not sent yet
        self._held_pages = 0  # how many pages _held has, published under _cond
        self._held_since = 0.0
        self.rounds = 0
        self.pages = 0
        self._thread = threading.Thread(target=self._run, name="relay-out")

    def start(self) -> None:
        self._thread.start()

    def catch_up(self, lag: int = 0) -> None:
        """Return once every page written before the call has been sent, or at once if at
        most ``lag`` pages are waiting to be sent.

        Raises:
            MigrationFailed: the forwarder failed.
        """
        with self._cond:
            self._raise_if_failed()
        if lag and self._backlog() <= lag:
            return
        with self._cond:
            self._wanted += 1
            wanted = self._wanted
            self._cond.notify_all()
            while self._done < wanted:
                self._raise_if_failed()
                self._cond.wait(_SLICE)  # notified by every round and by a failure

    def hold_back(self, limit: int) -> None:
        """Return at once if at most ``limit`` pages wait to be sent, else once at most
        half as many do, or the forwarder stopped.

        Raises:
            MigrationFailed: the forwarder failed.
        """
        if self._backlog() <= limit:
            return
        with self._cond:
            while not self._stopping and self._backlog() > limit // 2:
                self._raise_if_failed()
                self._cond.wait(_SLICE)  # notified by every round and by a failure
            self._raise_if_failed()

    def _backlog(self) -> int:
        """Pages written and not sent yet: taken by the thread, or not taken yet."""
        return self._held_pages + sum(block.pending_changes() for block in self.ram)

    def write(self, record: bytes) -> None:
        """Have ``record`` written on the main channel between two rounds."""
        with self._cond:
            self._commands.append(record)
            self._cond.notify_all()

    def stop(self) -> dict[str, Pages]:
        """Stop after the current round; returns the pages taken and not sent yet.

        Raises:
            MigrationFailed: the forwarder failed (the source is then the caller's too).
        """
        self._halt()
        with self._cond:
            self._raise_if_failed()
            commands, self._commands = self._commands, []
        if commands:
            self.source.forward(*commands)
        return self._held

    def abort(self, exc: BaseException) -> BaseException | None:
        """Fail the outgoing side and wait for the thread; returns its own error, if any."""
        self.source.abort(exc)  # wakes the thread out of any write
        self._halt()
        return self._error

    def _halt(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.ident is not None:
            while self._thread.is_alive():  # its writes are bounded by the io timeout
                self._thread.join(_SLICE)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise MigrationFailed(str(self._error)) from self._error

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._round():
                pass
        except BaseException as exc:  # noqa: BLE001 - handed to the loader and the incoming side
            with self._cond:
                self._error = exc
                self._cond.notify_all()
            self._on_failure(exc)

    def _round(self) -> bool:
        """One step: take what changed; send a round if it is due or asked for."""
        with self._cond:
            if self._stopping:
                return False
            wanted = self._wanted
            commands, self._commands = self._commands, []
        if commands:
            self.source.forward(*commands)
        if not self._held:
            self._held_since = time.monotonic()
        self._held = merge_pages(self._held, take_changes(self.ram))
        count = count_pages(self._held)
        with self._cond:
            self._held_pages = count
        asked = wanted > self._done
        due = count >= _ROUND_PAGES or time.monotonic() - self._held_since >= _ROUND_WAIT
        if count and (asked or due):
            pages, self._held = split_pages(self._held, _ROUND_MAX)
            self.source.send_pass(pages)
            self.rounds += 1
            self.pages += count_pages(pages)
            with self._cond:
                self._held_pages = count_pages(self._held)
                self._cond.notify_all()  # a channel held back may go on
            if self._held:
                return True  # the rest goes next, before the request counts as served
        elif not asked:
            with self._cond:
                if not self._stopping and self._wanted == wanted:
                    self._cond.wait(_ROUND_WAIT)  # notified by a request or stop
            return True
        with self._cond:
            self._done = wanted
            self._cond.notify_all()
        return True


class Relay:
    """Forwards one migration from a source to a destination, re-encoding its RAM.

    One thread runs :meth:`run`: it loads the incoming stream and calls back into the
    relay (the sink methods); the forwarder thread sends rounds meanwhile (see the module
    notes for who owns the outgoing :class:`Source` when).

    Args:
        target: where the destination listens.
        out: the outgoing migration's settings.
        channels: the incoming multifd channel count (0: multifd off).
        compression: the incoming compression method.
        io_timeout: seconds any channel, on either side, may stall.
        setup_timeout: seconds for every incoming channel to connect.
        connect_timeout: seconds for each outgoing connection.
        on_refused: told about each incoming connection refused during setup (a source
            whose TLS certificate is not trusted, say), as it is.
    """

    def __init__(
        self,
        target: Address,
        out: OutSettings,
        *,
        channels: int = 2,
        compression: str = "none",
        io_timeout: float = 30.0,
        setup_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        on_refused: Callable[[ChannelRefused], None] | None = None,
    ) -> None:
        if out.peer != AS_SOURCE and out.peer not in PROFILES:
            known = ", ".join(OUT_PEERS)
            raise ConfigError(f"unknown outgoing peer {out.peer!r} (known: {known})")
        self.target = target
        self.out = out
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self.incoming = Incoming(
            self,
            track_changes=True,
            backpressure=self._hold_back,
            channels=channels,
            compression=compression,
            io_timeout=io_timeout,
            setup_timeout=setup_timeout,
            on_refused=on_refused,
        )
        # Owned by the thread in run(); the incoming channels' threads read _forwarder
        # (set once, at the first marker) to hold themselves back.
        self._source: Source | None = None
        self._forwarder: _Forwarder | None = None
        self._configuration: bytes | None = None
        self._completed = False
        self._pages = 0
        self._complete_ms = 0.0

    # -- the whole relay --------------------------------------------------------------------
    def run(self, listener: transport.Listener) -> RelayStats:
        """Accept the source on ``listener`` and relay its migration to the target.

        Raises:
            MigrationFailed: either side failed; both were torn down.
        """
        try:
            incoming = self.incoming.run(listener)
            self._check_completed()
        except BaseException as exc:
            outgoing = self._abort(exc)
            if outgoing is not None:
                raise self._failed(outgoing) from outgoing
            raise
        finally:
            if self._source is not None:
                self._source.close()
            self.incoming.ram.close()
        return self._stats(incoming)

    def _abort(self, exc: BaseException) -> BaseException | None:
        if self._forwarder is not None:
            return self._forwarder.abort(exc)
        if self._source is not None:
            self._source.abort(exc)
        return None

    def _check_completed(self) -> None:
        if not self._completed:
            raise MigrationFailed("the incoming migration had no complete ram section")

    def _failed(self, exc: BaseException) -> MigrationFailed:
        return MigrationFailed(f"outgoing migration to {self.target}: {exc}")

    def _stats(self, incoming: MigrationStats) -> RelayStats:
        source, forwarder = self._source, self._forwarder
        mode = self.incoming.sync_mode
        return RelayStats(
            incoming=incoming,
            outgoing=source.channel_stats() if source is not None else (),
            machine=self.incoming.machine,
            sync_mode=mode.value if mode is not None else None,
            out_profile=source.profile.name if source is not None else self.out.peer,
            rounds=forwarder.rounds if forwarder is not None else 0,
            pages=self._pages + (forwarder.pages if forwarder is not None else 0),
            tail_bytes=self.incoming.tail_bytes,
            complete_ms=self._complete_ms,
        )

    # -- the sink: called by the incoming side ----------------------------------------------
    def configuration(self, raw: bytes) -> None:
        self._configuration = raw

    def command(self, cmd: int, raw: bytes) -> None:
        # An explicit profile says whether the destination gets switchover-start; as-source
        # passes the source's on, between two outgoing sections as it came.
        if self.out.peer == AS_SOURCE and self._forwarder is not None:
            self._forwarder.write(raw)

    def marker(self, marker: str, *, in_end: bool) -> None:
        if self._forwarder is None:
            self._open(marker)
            return
        if in_end and marker == "EOS" and self.incoming.sync_mode is SyncMode.PER_SECTION:
            self._complete()  # the last marker: every page of the END is in
            return
        self._outgoing(lambda _: self._require_forwarder().catch_up(_LAG_PAGES))

    def _hold_back(self) -> None:
        # On a channel's thread: no forwarder yet means no backlog either.
        forwarder = self._forwarder
        if forwarder is not None:
            forwarder.hold_back(_BACKLOG_PAGES)

    def ram_end(self) -> None:
        if self._forwarder is None:
            self._open("EOS")
        if not self._completed:
            self._complete()

    def tail(self, data: bytes) -> None:
        if not self._completed:
            raise MigrationFailed("the tail came before the outgoing ram section was complete")
        self._outgoing(lambda source: source.forward(data))

    def end_of_stream(self) -> None:
        # Everything went on: the destination's verdict is the relay's (and, with a
        # return path, the source's).
        self._outgoing(lambda source: source.await_destination())

    # -- the outgoing side ------------------------------------------------------------------
    def _open(self, marker: str) -> None:
        incoming = self.incoming
        profile = self._profile(marker)
        log.info("outgoing: %s, %d channels, %s", profile.name, self.out.channels,
                 self.out.compression)  # fmt: skip
        source = self._source = Source(
            incoming.ram,
            profile,
            channels=self.out.channels,
            uuid=self.out.uuid or incoming.peer_uuid or bytes(16),
            compression=self.out.compression,
            level=self.out.level,
            io_timeout=self.io_timeout,
            configuration=self._configuration,
            ram_section=incoming.ram_section or RamSection(),
            device_state=False,
            return_path=self.out.return_path,
        )
        self._outgoing(self._connect)
        self._forwarder = _Forwarder(source, incoming.ram, incoming.interrupt)
        self._forwarder.start()

    def _connect(self, source: Source) -> None:
        source.open(self.target, connect_timeout=self.connect_timeout)
        source.setup()

    def _profile(self, marker: str) -> PeerProfile:
        if self.out.peer != AS_SOURCE:
            return PROFILES[self.out.peer]
        # The first marker tells: a MULTIFD_FLUSH in the setup section means per-round.
        mode = SyncMode.PER_ROUND if marker == "MULTIFD_FLUSH" else SyncMode.PER_SECTION
        return PeerProfile(
            AS_SOURCE,
            mode,
            ZeroPageMode.LEGACY,
            switchover_start=False,
            description="the source's sync mode; its switchover-start passed on",
        )

    def _complete(self) -> None:
        began = time.monotonic()
        held = self._outgoing(lambda _: self._require_forwarder().stop())
        pages = merge_pages(held, take_changes(self.incoming.ram))
        self._outgoing(lambda source: source.complete(pages))
        self._pages += count_pages(pages)
        self._complete_ms = (time.monotonic() - began) * 1e3
        self._completed = True
        log.info(
            "outgoing ram complete: %d pages in %.1f ms", count_pages(pages), self._complete_ms
        )

    def _require_forwarder(self) -> _Forwarder:
        assert self._forwarder is not None, "the forwarder starts at the first marker"
        return self._forwarder

    def _outgoing(self, step: Callable[[Source], _T]) -> _T:
        """Run one step of the outgoing migration; its failure fails the relay."""
        assert self._source is not None
        try:
            return step(self._source)
        except MultifdError as exc:
            raise self._failed(exc) from exc


def relay(
    listen: str,
    target: str,
    *,
    channels: int = 2,
    compression: str = "none",
    out: OutSettings | None = None,
    io_timeout: float = 30.0,
    setup_timeout: float = 60.0,
    connect_timeout: float = 10.0,
    tls: TlsConfig | None = None,
    out_tls: TlsConfig | None = None,
    on_listening: Callable[[str], None] | None = None,
    on_refused: Callable[[ChannelRefused], None] | None = None,
    progress: Callable[[MigrationStats], None] | None = None,
    progress_interval: float = 0.25,
) -> RelayStats:
    """Listen at ``listen``, accept one migration and relay it to ``target``.

    Args:
        listen: ``tcp:HOST:PORT`` (port 0 picks one) or ``unix:PATH``.
        target: the destination's address (a QEMU started with ``-incoming``).
        channels: the source's multifd channel count (0: multifd off).
        compression: the source's compression method.
        out: the outgoing settings (default: 2 channels, no compression, as-source).
        io_timeout: seconds any channel may stall.
        setup_timeout: seconds for the source's channels to connect.
        connect_timeout: seconds for each outgoing connection.
        tls: the relay's credentials towards the source: every incoming channel must then
            run TLS 1.3 (see ``docs/tls.md``); None: plain sockets.
        out_tls: its credentials towards ``target``, the same way; None: plain sockets.
        on_listening: called with the real listening address.
        on_refused: told about each incoming connection refused during setup, as it is.
        progress: called with the incoming side's statistics every ``progress_interval``
            seconds, and once more at the end (see :func:`multifd.receive`).
        progress_interval: seconds between two ``progress`` calls.

    Raises:
        ConfigError: an address, a setting or the credentials are invalid.
        MigrationFailed: the migration failed on either side (both are torn down).
    """
    listen_at = listen_address(listen, tls)
    worker = Relay(
        target_address(target, out_tls),
        out or OutSettings(),
        channels=channels,
        compression=compression,
        io_timeout=io_timeout,
        setup_timeout=setup_timeout,
        connect_timeout=connect_timeout,
        on_refused=on_refused,
    )
    with transport.listen(listen_at) as listener:
        if on_listening is not None:
            on_listening(str(listener.address))
        with ticking(worker.incoming.stats, progress, progress_interval):
            return worker.run(listener)
