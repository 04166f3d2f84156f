"""multifd: live memory migration for Python, wire-compatible with QEMU's multifd."""

import logging

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

# A library stays quiet unless its user configures logging.
logging.getLogger("multifd").addHandler(logging.NullHandler())

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
