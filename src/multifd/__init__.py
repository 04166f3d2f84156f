"""multifd: live memory migration for Python, wire-compatible with QEMU's multifd."""

from multifd.api import Received, receive, send
from multifd.errors import (
    ChannelError,
    ConfigError,
    MigrationCancelled,
    MigrationFailed,
    MultifdError,
    ProtocolError,
)
from multifd.migration.stats import ChannelStats, MigrationStats, Status
from multifd.ram import Ram, RamBlock

__all__ = [
    "ChannelError",
    "ChannelStats",
    "ConfigError",
    "MigrationCancelled",
    "MigrationFailed",
    "MigrationStats",
    "MultifdError",
    "ProtocolError",
    "Ram",
    "RamBlock",
    "Received",
    "Status",
    "receive",
    "send",
]
