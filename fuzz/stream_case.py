"""One fuzz input: a main stream and a multifd stream, received by a real destination.

An input is ``config (1 byte) | be32 main length | main bytes | multifd bytes``:

* config bits 0-1: compression (0 none, 1 zlib, 2 zstd, 3 none); bit 2: multifd off (no
  multifd channel; every byte after the main part is ignored); bit 3: receive into blocks
  the harness provides (when the main part announces blocks it can provide) rather than
  blocks the destination creates.
* the harness writes ``QEVM`` before the main bytes and a valid init packet (channel 0)
  before the multifd bytes: a connection without its magic is refused during setup and
  only costs a setup timeout, so those few bytes are not worth mutating here (the
  hypothesis properties of the decoders cover them).

:func:`run` feeds both over Unix sockets to :func:`multifd.receive` with short timeouts and
returns what happened; :func:`check` raises :class:`Finding` when an invariant breaks:

* only ``MigrationFailed`` may come out, caused only by ``ProtocolError`` / ``ChannelError``
  (an ``OSError`` only below a ``ChannelError``);
* the receiver ends within ``WATCHDOG`` seconds, and leaves no thread behind;
* in provided blocks, a page changes only if the input addressed it (a page record, or an
  offset of a multifd packet naming that block);
* the process's peak RSS during the run (``VmHWM``, reset before each run through
  ``/proc/self/clear_refs``) exceeds its RSS before the run by no more than the limits
  allow: no allocation follows an untrusted length beyond them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np

import multifd
from multifd.errors import ChannelError, ConfigError, MigrationFailed, ProtocolError
from multifd.migration.limits import ReceiveLimits
from multifd.wire import stream
from multifd.wire.constants import (
    PACKET_FIXED_SIZE,
    PACKET_HEADER_SIZE,
    PAGE_SIZE,
    PAGES_PER_PACKET,
    QEMU_VM_FILE_MAGIC,
)
from multifd.wire.packets import RAMBLOCK_AT, InitPacket

COMPRESSION: Final = ("none", "zlib", "zstd", "none")
MULTIFD_OFF: Final = 0x04
PROVIDED: Final = 0x08
HEADER: Final = struct.Struct(">BI")
IO_TIMEOUT: Final = 0.25
SETUP_TIMEOUT: Final = 0.5
WATCHDOG: Final = 10.0  # a receiver still running after this is a hang
MAX_RAM: Final = 32 << 20  # what the destination may be told to allocate
# Peak RSS may grow by the blocks, the decoder's own bounds (VM description 16 MiB, FULL
# section 1 MiB, compressed payloads 1 MiB a channel) and the interpreter's noise.
RSS_SLACK: Final = MAX_RAM + (16 << 20) + (64 << 20)
FILL: Final = 0xA5  # what provided blocks hold before the run
_COUNTS: Final = struct.Struct(">IIIIIIQI")  # fixed header fields up to zero_pages
_NAME_SIZE: Final = 256


class Finding(Exception):
    """An invariant broke: a bug in the receive path (or in this harness)."""


@dataclass(frozen=True)
class Case:
    """A decoded fuzz input."""

    compression: str
    multifd: bool
    provided: bool
    main: bytes
    channel: bytes

    @classmethod
    def parse(cls, data: bytes) -> Case:
        if len(data) < HEADER.size:
            data = data + bytes(HEADER.size - len(data))
        config, main_length = HEADER.unpack_from(data)
        body = data[HEADER.size :]
        main_length = min(main_length, len(body))
        return cls(
            compression=COMPRESSION[config & 3],
            multifd=not config & MULTIFD_OFF,
            provided=bool(config & PROVIDED),
            main=body[:main_length],
            channel=body[main_length:],
        )

    def encode(self) -> bytes:
        config = COMPRESSION.index(self.compression)
        config |= 0 if self.multifd else MULTIFD_OFF
        config |= PROVIDED if self.provided else 0
        return HEADER.pack(config, len(self.main)) + self.main + self.channel


@dataclass
class Outcome:
    error: BaseException | None = None
    received: multifd.Received | None = None
    seconds: float = 0.0
    hung: bool = False
    leftover: list[str] = field(default_factory=list)  # threads alive after the receiver
    rss_before: int = 0  # bytes resident when the run began (the peak was reset then)
    provided: multifd.Ram | None = None
    before: dict[str, bytes] = field(default_factory=dict)


_QUIET = ("multifd", "multifd.recv", "multifd.destination")


class Receiver:
    """Runs fuzz cases against ``multifd.receive`` over a Unix socket in a private folder."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="multifd-fuzz-")
        self._threads = set(threading.enumerate())  # those that ran before any case
        self.address = f"unix:{os.path.join(self._folder.name, 'dest.sock')}"
        # Failures are the point: keep quiet until close(), which restores the loggers
        # (a test after this harness may read what they say).
        self._quieted = [logging.getLogger(name) for name in _QUIET]
        self._was_disabled = [logger.disabled for logger in self._quieted]
        for logger in self._quieted:
            logger.disabled = True

    def run(self, case: Case) -> Outcome:
        outcome = Outcome()
        if case.provided:
            outcome.provided = provided_blocks(case.main)
            if outcome.provided is not None:
                outcome.before = {b.name: bytes(b.view) for b in outcome.provided}
        outcome.rss_before = _reset_peak_rss()
        listening = threading.Event()  # signals: the destination accepts connections
        thread = threading.Thread(
            target=self._receive, args=(case, outcome, listening), name="fuzz-receiver"
        )
        start = time.monotonic()
        thread.start()
        try:
            if listening.wait(WATCHDOG):
                _feed(self.address, case)
        finally:
            thread.join(WATCHDOG)
        outcome.seconds = time.monotonic() - start
        outcome.hung = thread.is_alive()
        outcome.leftover = [t.name for t in threading.enumerate() if t not in self._threads]
        return outcome

    def _receive(self, case: Case, outcome: Outcome, listening: threading.Event) -> None:
        try:
            outcome.received = multifd.receive(
                self.address,
                channels=1 if case.multifd else 0,
                compression=case.compression,
                io_timeout=IO_TIMEOUT,
                setup_timeout=SETUP_TIMEOUT,
                limits=ReceiveLimits(max_ram=MAX_RAM),
                into=outcome.provided,
                on_listening=lambda _address: listening.set(),
            )
        except BaseException as exc:  # noqa: BLE001 - check() judges it
            outcome.error = exc
        finally:
            listening.set()

    def close(self) -> None:
        self._folder.cleanup()
        for logger, was in zip(self._quieted, self._was_disabled, strict=True):
            logger.disabled = was


def _feed(address: str, case: Case) -> None:
    """Connect like a source and write both streams, then half-close them."""
    path = address.removeprefix("unix:")
    streams = [QEMU_VM_FILE_MAGIC.to_bytes(4, "big") + case.main]
    if case.multifd:
        streams.append(InitPacket(0).pack() + case.channel)
    sockets = []
    try:
        for data in streams:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.settimeout(WATCHDOG)
            with contextlib.suppress(OSError):  # the receiver may refuse or fail first
                sock.connect(path)
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
        for sock in sockets:  # wait for the receiver to hang up, as a real source's kernel would
            with contextlib.suppress(OSError):
                while sock.recv(4096):
                    pass
    finally:
        for sock in sockets:
            sock.close()


def provided_blocks(main: bytes) -> multifd.Ram | None:
    """Blocks matching the MEM_SIZE record of ``main``, filled with ``FILL``; None if none."""
    decoder = stream.StreamDecoder()
    decoder.feed(QEMU_VM_FILE_MAGIC.to_bytes(4, "big") + main)
    try:
        for event in decoder.events():
            if isinstance(event, stream.RamMemSize):
                if event.total > MAX_RAM:
                    return None
                return multifd.Ram(
                    [multifd.RamBlock.from_bytes(n, bytes([FILL]) * s) for n, s in event.blocks]
                )
    except (ProtocolError, ConfigError):  # undecodable, or blocks no caller could provide
        return None
    return None


def addressed_pages(case: Case) -> set[tuple[str, int]]:
    """Every (block, page) the input names as a page to write, on either channel."""
    pages: set[tuple[str, int]] = set()
    decoder = stream.StreamDecoder()
    decoder.feed(QEMU_VM_FILE_MAGIC.to_bytes(4, "big") + case.main)
    with contextlib.suppress(ProtocolError):
        for event in decoder.events():
            if isinstance(event, stream.RamPage | stream.RamZero):
                pages.add((event.block, event.offset // PAGE_SIZE))
    if case.multifd:
        pages |= _packet_pages(case.channel, compressed=case.compression != "none")
    return pages


def _packet_pages(data: bytes, *, compressed: bool) -> set[tuple[str, int]]:
    """Pages named by each packet header, read raw: a superset of what a receiver may write."""
    pages: set[tuple[str, int]] = set()
    at = 0
    while at + PACKET_HEADER_SIZE <= len(data):
        header = data[at : at + PACKET_HEADER_SIZE]
        _magic, _version, _flags, _alloc, normal, size, _num, zero = _COUNTS.unpack_from(header)
        count = min(normal + zero, PAGES_PER_PACKET)
        raw = header[RAMBLOCK_AT : RAMBLOCK_AT + _NAME_SIZE].split(b"\0", 1)[0]
        name = raw.decode(errors="replace")
        offsets = struct.unpack_from(f">{count}Q", header, PACKET_FIXED_SIZE)
        pages |= {(name, offset // PAGE_SIZE) for offset in offsets if not offset % PAGE_SIZE}
        at += PACKET_HEADER_SIZE + (size if compressed and normal else normal * PAGE_SIZE)
    return pages


def check(case: Case, outcome: Outcome) -> None:
    """Raise :class:`Finding` if ``outcome`` breaks an invariant (see the module notes)."""
    try:
        if outcome.hung:
            raise Finding(f"the receiver still runs after {WATCHDOG} s")
        if outcome.leftover:
            raise Finding(f"threads outlived the receiver: {', '.join(outcome.leftover)}")
        if outcome.error is not None:
            _check_error(outcome.error)
        if outcome.provided is not None:
            _check_writes(case, outcome)
        grown = _peak_rss() - outcome.rss_before
        if grown > RSS_SLACK:
            raise Finding(f"peak RSS grew by {grown >> 20} MiB (limit {RSS_SLACK >> 20} MiB)")
    finally:
        if outcome.received is not None:
            outcome.received.ram.close()
        if outcome.provided is not None:
            outcome.provided.close()


def _check_error(error: BaseException) -> None:
    if not isinstance(error, MigrationFailed):
        raise Finding(f"receive raised {type(error).__name__}, not MigrationFailed") from error
    cause = error.__cause__
    above: BaseException = error
    while cause is not None:
        allowed = isinstance(cause, ProtocolError | ChannelError | MigrationFailed) or (
            isinstance(cause, OSError) and isinstance(above, ChannelError)
        )
        if not allowed:
            raise Finding(f"a {type(cause).__name__} under {type(above).__name__}") from error
        above, cause = cause, cause.__cause__


def _check_writes(case: Case, outcome: Outcome) -> None:
    assert outcome.provided is not None
    addressed = addressed_pages(case)
    for block in outcome.provided:
        before = np.frombuffer(outcome.before[block.name], dtype=np.uint8).reshape(-1, PAGE_SIZE)
        for page in np.flatnonzero((block.pages != before).any(axis=1)).tolist():
            if (block.name, page) not in addressed:
                how = "zeroed" if not block.pages[page].any() else "written"
                raise Finding(f"page {page} of {block.name!r} {how}, never addressed")


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise Finding(f"no {field_name} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs`` 5); the current RSS."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024
