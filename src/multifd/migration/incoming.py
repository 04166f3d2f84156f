"""The incoming side of a relay or a recorder: a destination that reports the stream.

Theory of operation. :class:`Incoming` is a :class:`~multifd.migration.destination.Destination`
(same channel set-up, loader, barrier and limits) whose loader also tells a
:class:`StreamSink` what it decoded, in stream order: the configuration record's bytes,
the switchover-start command, each sync marker (called while every receive channel is
parked, so nothing writes RAM meanwhile), the end of the ``ram`` section and, undecoded,
every byte after it. A real machine's device state follows the ``ram`` END; its sections'
lengths are known only from each device's vmstate description, so the decoder's tail mode
hands it over as it arrives, and the only check left, when the stream ends, is that it
ends with EOF and (optionally) a VM description. Then the sink hears ``end_of_stream``
(a relay waits there for its destination's verdict) before the destination's own end:
with a return path, the source's SHUT carries the sink's outcome too.

With ``track_changes`` each block notes the pages whose writes have landed
(``RamBlock.track_changes``), for a relay to forward them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from multifd import transport
from multifd.errors import MAIN
from multifd.migration.destination import Destination
from multifd.migration.source import RamSection
from multifd.ram import RamBlock
from multifd.wire import stream
from multifd.wire.constants import MIG_CMD_SWITCHOVER_START


class StreamSink(Protocol):
    """What an :class:`Incoming` side reports, in stream order, from its loader thread."""

    def configuration(self, raw: bytes) -> None:
        """The configuration record, as received."""

    def command(self, cmd: int, raw: bytes) -> None:
        """A command the destination may need (only ``MIG_CMD_SWITCHOVER_START`` passes)."""

    def marker(self, marker: str, *, in_end: bool) -> None:
        """A sync marker, while no incoming channel writes RAM."""

    def ram_end(self) -> None:
        """The ``ram`` END section was closed; the tail follows."""

    def tail(self, data: bytes) -> None:
        """Bytes after the ``ram`` END, undecoded."""

    def end_of_stream(self) -> None:
        """The stream is over and looks whole; raising fails the migration (with a return
        path, the source then hears SHUT(1) rather than SHUT(0))."""


class Incoming(Destination):
    """A destination that reports the stream to a :class:`StreamSink` as it loads it.

    Same threads and sharing as :class:`Destination`; the sink is called from the loader
    thread only. Everything after the ``ram`` END goes to the sink undecoded.

    Args:
        sink: told about the configuration, markers, the ``ram`` END and the tail.
        track_changes: note the pages written into each block (a relay needs them).
        backpressure: called by each multifd channel's thread after a packet with pages;
            may block to hold the source back (see :class:`~multifd.engine.recv.Receiver`).
        **options: passed to :class:`Destination`.
    """

    def __init__(
        self,
        sink: StreamSink,
        *,
        track_changes: bool,
        backpressure: Callable[[], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.sink = sink
        self._track = track_changes
        self._backpressure = backpressure
        self._decoder = stream.StreamDecoder(
            MAIN,
            max_blocks=self.limits.max_blocks,
            max_name_len=self.limits.max_name_len,
            keep_raw=(stream.Configuration, stream.Command),
            tail_after_ram=True,
        )
        self.ram_section: RamSection | None = None
        self.switchover_seen = False
        self._in_end = False

    @property
    def peer_uuid(self) -> bytes | None:
        """The UUID in the source's multifd init packets (None without multifd)."""
        return None if self._receiver is None else self._receiver.peer_uuid

    def interrupt(self, exc: BaseException) -> None:
        """Fail the migration from another thread: every incoming channel is shut down and
        the loader raises (a relay's outgoing side uses it when it fails)."""
        if self._receiver is not None:
            self._receiver.abort(exc)
        if self._main is not None:
            transport.shutdown_quietly(self._main)

    def _raw(self) -> bytes:
        raw = self._decoder.raw
        assert raw is not None, "keep_raw covers the configuration and commands"
        return raw

    def _new_block(self, name: str, size: int) -> RamBlock:
        block = super()._new_block(name, size)
        if self._track:
            block.track_changes()
        return block

    def _handle(self, event: stream.Event) -> None:
        match event:
            case stream.Configuration():
                super()._handle(event)
                self.sink.configuration(self._raw())
            case stream.Command(cmd=cmd) if cmd == MIG_CMD_SWITCHOVER_START:
                self.switchover_seen = True
                self.sink.command(cmd, self._raw())
            case stream.SectionStart(idstr=stream.RAM_IDSTR):
                super()._handle(event)
                self.ram_section = RamSection(event.section_id, event.instance_id, event.version_id)
            case stream.SectionEnd():
                super()._handle(event)
                self._in_end = True
            case stream.SectionFooter() if self._in_end:
                super()._handle(event)
                self._in_end = False
                self._eof_seen = True  # EOF is in the tail, checked when the stream ends
                self.sink.ram_end()
            case _:
                super()._handle(event)

    def _at_marker(self, marker: str) -> None:
        self.sink.marker(marker, in_end=self._in_end)

    def _tail(self, data: bytes) -> None:
        self.sink.tail(data)

    def _load(self, early: bytes = b"") -> None:
        super()._load(early)  # checks that the tail ends the stream whole
        self.sink.end_of_stream()
