"""QEMU's return path: the messages a destination writes back to its source (sans-IO).

Plain precopy has no acknowledgement: a source knows only that its bytes left. QEMU's
answer is the return path. The source puts ``MIG_CMD_OPEN_RETURN_PATH`` on the main stream
(a ``QEMU_VM_COMMAND`` record right after the configuration, as QEMU's migration thread
does after ``qemu_savevm_state_header``); from then on the destination may write messages
on the main channel's socket, in the reverse direction. Each message is a be16 type, a be16
payload length and the payload (``migrate_send_rp_message`` in QEMU's
``migration/migration.c``). Plain precopy uses three of them:

* ``MIG_RP_MSG_SHUT`` (be32 status): the destination is done with the return path; 0 means
  the incoming migration completed, anything else that it failed. A source with a return
  path reports ``completed`` only after a SHUT with status 0.
* ``MIG_RP_MSG_PONG`` (be32 value): the answer to ``MIG_CMD_PING`` (QEMU sources ping once,
  with value 1, right after opening the return path).
* ``MIG_RP_MSG_SWITCHOVER_ACK`` (no payload): only with the ``switchover-ack`` capability
  (QEMU 8.1+); we accept it and do not wait for it.

The postcopy messages (page requests, received bitmaps, resume acks) are refused: nothing
here asks for them. :class:`ReturnPathDecoder` parses what a destination sends, with every
length checked against the message's fixed size before its payload is awaited.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from multifd.errors import ProtocolError

RETURN_PATH: Final = "main (return path)"  # the channel named in errors

# enum qemu_vm_cmd (migration/savevm.c): the main stream's commands for the return path.
MIG_CMD_OPEN_RETURN_PATH: Final = 0x0001  # no argument
MIG_CMD_PING: Final = 0x0002  # be32 value, answered by a PONG

# enum mig_rp_message_type (migration/migration.c).
MIG_RP_MSG_SHUT: Final = 1
MIG_RP_MSG_PONG: Final = 2
MIG_RP_MSG_REQ_PAGES_ID: Final = 3
MIG_RP_MSG_REQ_PAGES: Final = 4
MIG_RP_MSG_RECV_BITMAP: Final = 5
MIG_RP_MSG_RESUME_ACK: Final = 6
MIG_RP_MSG_SWITCHOVER_ACK: Final = 7

HEADER: Final = struct.Struct(">HH")  # type, payload length
_BE32: Final = struct.Struct(">I")

# Payload length of each message we accept (QEMU's rp_cmd_args).
_LENGTHS: Final = {MIG_RP_MSG_SHUT: 4, MIG_RP_MSG_PONG: 4, MIG_RP_MSG_SWITCHOVER_ACK: 0}
_POSTCOPY: Final = {
    MIG_RP_MSG_REQ_PAGES_ID: "REQ_PAGES_ID",
    MIG_RP_MSG_REQ_PAGES: "REQ_PAGES",
    MIG_RP_MSG_RECV_BITMAP: "RECV_BITMAP",
    MIG_RP_MSG_RESUME_ACK: "RESUME_ACK",
}
_ACCEPTED: Final = "SHUT (1), PONG (2) or SWITCHOVER_ACK (7)"


@dataclass(frozen=True, slots=True)
class Shut:
    """``MIG_RP_MSG_SHUT``: 0 if the destination completed, non-zero if it failed."""

    status: int


@dataclass(frozen=True, slots=True)
class Pong:
    """``MIG_RP_MSG_PONG``: the value of the ``MIG_CMD_PING`` it answers."""

    value: int


@dataclass(frozen=True, slots=True)
class SwitchoverAck:
    """``MIG_RP_MSG_SWITCHOVER_ACK`` (``switchover-ack`` capability only)."""


Message = Shut | Pong | SwitchoverAck


def _message(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def shut(status: int) -> bytes:
    """A SHUT message: status 0 for a completed migration, 1 for a failed one."""
    return _message(MIG_RP_MSG_SHUT, _BE32.pack(status))


def pong(value: int) -> bytes:
    """A PONG message answering ``MIG_CMD_PING`` ``value``."""
    return _message(MIG_RP_MSG_PONG, _BE32.pack(value))


def switchover_ack() -> bytes:
    """A SWITCHOVER_ACK message."""
    return _message(MIG_RP_MSG_SWITCHOVER_ACK, b"")


def ping_value(data: bytes) -> int:
    """The be32 value of a ``MIG_CMD_PING`` command's argument (4 bytes, checked by the
    stream decoder)."""
    (value,) = _BE32.unpack(data)
    return int(value)


class ReturnPathDecoder:
    """Incremental decoder of the return path (never blocks, never reads a socket).

    ``feed()`` what arrived, pull messages with :meth:`next_message`. SHUT is the last
    message: a byte after it is an error, as is an unknown type, a postcopy message or a
    length other than the message's fixed one. Every error is a
    :class:`~multifd.errors.ProtocolError` naming ``main (return path)``; after one, every
    call raises it again. The buffer never holds more than one message beyond what was
    fed in one call.

    Not thread-safe: one thread feeds and drains a decoder.
    """

    def __init__(self, channel: str = RETURN_PATH) -> None:
        self.channel: Final = channel
        self._buf = bytearray()
        self._offset = 0  # return-path offset of _buf[0], for error messages
        self._shut = False
        self._error: ProtocolError | None = None

    @property
    def shut_seen(self) -> bool:
        """Whether SHUT was decoded (nothing may follow it)."""
        return self._shut

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the destination (copied)."""
        self._buf += data

    def next_message(self) -> Message | None:
        """The next message, or ``None`` until more bytes are fed.

        Raises:
            ProtocolError: the destination sent something else (raised again later).
        """
        if self._error is not None:
            raise self._error
        try:
            return self._read()
        except ProtocolError as exc:
            self._error = exc
            raise

    def messages(self) -> Iterator[Message]:
        """Yield decoded messages until more bytes are needed."""
        while (message := self.next_message()) is not None:
            yield message

    def close(self) -> None:
        """Declare the end of input (the destination closed the connection).

        Raises:
            ProtocolError: the input ended inside a message.
        """
        if self._error is not None:
            raise self._error
        if self._buf:
            self._error = self._fail(
                "return path ended inside a message",
                "a whole message",
                f"{len(self._buf)} bytes, then the end of input",
            )
            raise self._error

    def _fail(self, what: str, expected: object, received: object) -> ProtocolError:
        return ProtocolError(
            f"{what} (return-path offset {self._offset})",
            channel=self.channel,
            expected=expected,
            received=received,
        )

    def _read(self) -> Message | None:
        if not self._buf:
            return None
        if self._shut:
            raise self._fail("data after SHUT", "nothing", f"{len(self._buf)} bytes")
        if len(self._buf) < HEADER.size:
            return None
        kind, length = HEADER.unpack_from(self._buf)
        self._check(kind, length)
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        self._offset += end
        if kind == MIG_RP_MSG_SHUT:
            self._shut = True
            return Shut(_BE32.unpack(payload)[0])
        if kind == MIG_RP_MSG_PONG:
            return Pong(_BE32.unpack(payload)[0])
        return SwitchoverAck()

    def _check(self, kind: int, length: int) -> None:
        known = _LENGTHS.get(kind)
        if known is None:
            name = _POSTCOPY.get(kind)
            if name is not None:
                raise self._fail(
                    "postcopy message on a precopy return path", _ACCEPTED, f"{name} ({kind})"
                )
            raise self._fail("unknown return-path message type", _ACCEPTED, f"{kind:#06x}")
        if length != known:
            raise self._fail(f"length of return-path message {kind}", known, length)
