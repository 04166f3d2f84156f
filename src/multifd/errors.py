"""The multifd exception tree.

Every error the package raises derives from :class:`MultifdError`. Errors about one
channel name it (``"main"`` for the main migration stream, ``"multifd/N"`` for multifd
channel N, ``"multifd/?"`` before a channel has told its id); protocol errors also carry
what the decoder expected and what it received, so a log line is enough to see which end
is wrong.
"""

from __future__ import annotations

MAIN = "main"
UNIDENTIFIED = "multifd/?"


def multifd_channel(index: int) -> str:
    """The name of multifd channel ``index`` used in logs and errors."""
    return f"multifd/{index}"


class MultifdError(Exception):
    """Base of every error raised by this package."""


class ConfigError(MultifdError):
    """A setting or an argument is invalid; nothing was sent or received yet."""


class ChannelError(MultifdError):
    """A channel failed at the transport level (reset, EOF, timeout, refused)."""

    def __init__(self, message: str, *, channel: str) -> None:
        super().__init__(f"{channel}: {message}")
        self.channel = channel
        self.reason = message


class ProtocolError(MultifdError):
    """The peer sent bytes that break the protocol.

    Attributes:
        channel: the channel the bytes came from.
        expected: what the decoder expected (a value or a description).
        received: what it got instead.
    """

    def __init__(self, what: str, *, channel: str, expected: object, received: object) -> None:
        super().__init__(f"{channel}: {what}: expected {expected}, received {received}")
        self.channel = channel
        self.what = what
        self.expected = expected
        self.received = received


class MigrationFailed(MultifdError):
    """A migration ended in failure; ``__cause__`` holds the first error seen."""

    def __init__(self, message: str, *, channel: str | None = None) -> None:
        super().__init__(message if channel is None else f"{channel}: {message}")
        self.channel = channel


class MigrationCancelled(MultifdError):
    """A migration was cancelled on request; the source is left as it was."""


UNCLASSIFIED = "unclassified"  # a connection before its first bytes said which channel it is


class ChannelRefused(ChannelError):
    """The destination refused a connection during setup and goes on without it.

    A peer that fails the TLS handshake, closes before it says which channel it is, takes
    too long to do so, or comes beyond the channels expected. The destination logs it and
    keeps it in ``Destination.refused``; the migration fails only if the channels it
    needs never arrive.

    Attributes:
        reason: why, without the peer.
        peer: the peer's address (``HOST:PORT``, or ``a unix peer``).
    """

    def __init__(self, message: str, *, peer: str, channel: str = UNCLASSIFIED) -> None:
        super().__init__(f"connection from {peer} refused: {message}", channel=channel)
        self.reason = message
        self.peer = peer
