"""``uuid=`` / ``--uuid``: a multifd channel carrying another UUID fails the migration with an
error that names the channel and both UUIDs; a source with the right UUID migrates after."""

from __future__ import annotations

import contextlib
import socket
import uuid as uuidlib

import pytest

import multifd
from multifd.errors import MigrationFailed, ProtocolError
from multifd.tls import TlsConfig
from tests.migration.helpers import ReceiverThread, assert_same, make_ram
from tests.tls.helpers import WAIT, first_bytes, tcp_target
from tests.tls.pki import Pki

EXPECTED = uuidlib.UUID("12345678-9abc-def0-1122-334455667788")
OTHER = uuidlib.UUID("00000000-0000-0000-0000-00000000abcd")
CHANNELS = 3
SIZES = {"mem": 1 << 20}


def _check_refusal(receiver: ReceiverThread, channel: str | None) -> None:
    with pytest.raises(MigrationFailed) as info:
        receiver.result()
    cause = info.value.__cause__
    assert isinstance(cause, ProtocolError)
    assert cause.what == "init packet uuid"
    assert cause.channel == channel if channel else cause.channel.startswith("multifd/")
    assert (cause.expected, cause.received) == (EXPECTED, OTHER)
    assert str(EXPECTED) in str(info.value)
    assert str(OTHER) in str(info.value)


def _migrate(dest_tls: TlsConfig | None = None, source_tls: TlsConfig | None = None) -> None:
    source = make_ram(3, SIZES)
    options = {"channels": CHANNELS, "uuid": str(EXPECTED), "tls": dest_tls}
    receiver = ReceiverThread(options)
    address = receiver.start("tcp:127.0.0.1:0")
    multifd.send(address, source, channels=CHANNELS, uuid=str(EXPECTED), tls=source_tls)
    got = receiver.result()
    assert_same(source, got.ram)
    got.ram.close()


@pytest.mark.parametrize("bad", range(CHANNELS))
def test_each_channel_with_another_uuid_is_refused(bad: int) -> None:
    receiver = ReceiverThread({"channels": CHANNELS, "uuid": str(EXPECTED)})
    address = receiver.start("tcp:127.0.0.1:0")
    with contextlib.ExitStack() as stack:
        main = stack.enter_context(socket.create_connection(tcp_target(address), timeout=WAIT))
        main.sendall(first_bytes("main"))
        for index in range(bad + 1):  # the destination fails at the bad one
            uuid = OTHER if index == bad else EXPECTED
            channel = stack.enter_context(socket.create_connection(tcp_target(address), WAIT))
            channel.sendall(first_bytes("multifd", index, uuid.bytes))
        _check_refusal(receiver, f"multifd/{bad}")
        with contextlib.suppress(ConnectionResetError):  # unread bytes make a close a reset
            assert main.recv(1) == b""  # the destination closed everything
    _migrate()


def test_a_certified_source_with_another_uuid_is_refused(pki: Pki) -> None:
    receiver = ReceiverThread({"channels": CHANNELS, "uuid": str(EXPECTED), "tls": pki.dest})
    address = receiver.start("tcp:127.0.0.1:0")
    with contextlib.suppress(MigrationFailed):  # the source learns only if a write fails
        multifd.send(
            address, make_ram(4, SIZES), channels=CHANNELS, uuid=str(OTHER), tls=pki.source
        )
    _check_refusal(receiver, None)
    _migrate(pki.dest, pki.source)
