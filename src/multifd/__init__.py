"""multifd: live memory migration for Python, wire-compatible with QEMU's multifd."""

import logging

from multifd.api import Received, receive, send
from multifd.errors import (
    ChannelError,
    ChannelRefused,
    ConfigError,
    MigrationCancelled,
    MigrationFailed,
    MultifdError,
    ProtocolError,
)
from multifd.migration.limits import ReceiveLimits
from multifd.migration.stats import ChannelStats, MigrationStats, Status
from multifd.ram import Ram, RamBlock
from multifd.tls import TlsConfig

# A library stays quiet unless its user configures logging.
logging.getLogger("multifd").addHandler(logging.NullHandler())

__all__ = [
    "ChannelError",
    "ChannelRefused",
    "ChannelStats",
    "ConfigError",
    "MigrationCancelled",
    "MigrationFailed",
    "MigrationStats",
    "MultifdError",
    "ProtocolError",
    "Ram",
    "RamBlock",
    "ReceiveLimits",
    "Received",
    "Status",
    "TlsConfig",
    "receive",
    "send",
]
