"""TLS 1.3 with mutual authentication: migrations, refused peers, names, the wire itself."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import multifd
from multifd.errors import ChannelError, ConfigError, MigrationFailed, ProtocolError
from multifd.migration.limits import ReceiveLimits
from multifd.ram import Ram, RamBlock
from multifd.wire.constants import PAGE_SIZE
from tests.migration.helpers import ReceiverThread, assert_same, make_ram
from tests.tls.helpers import WAIT, Relay, attempt, bad_tls_context, first_bytes, tcp_target
from tests.tls.pki import Pki

SIZES = {"mem": 2 << 20, "rom": 64 << 10}
SECRET = b"plaintext that must never be seen on the wire. "


def _received(receiver: ReceiverThread, source: Ram) -> multifd.Received:
    got = receiver.result()
    assert got.stats.status is multifd.Status.COMPLETED
    assert_same(source, got.ram)
    got.ram.close()
    return got


@pytest.mark.parametrize(
    ("channels", "compression"), [(0, "none"), (1, "none"), (3, "none"), (2, "zstd")]
)
def test_tls_migration_is_exact(pki: Pki, channels: int, compression: str) -> None:
    source = make_ram(channels, SIZES)
    options = {"channels": channels, "compression": compression}
    receiver = ReceiverThread({**options, "tls": pki.dest})
    address = receiver.start("tcp:127.0.0.1:0")
    stats = multifd.send(address, source, tls=pki.source, **options)  # type: ignore[arg-type]
    assert stats.status is multifd.Status.COMPLETED
    assert _received(receiver, source).refused == ()


def test_tls_over_a_unix_socket_checks_the_name_given(pki: Pki, tmp_path: Path) -> None:
    source = make_ram(5, SIZES)
    receiver = ReceiverThread({"channels": 2, "tls": pki.dest})
    address = receiver.start(f"unix:{tmp_path}/s")
    with pytest.raises(ConfigError, match="tls-hostname"):
        multifd.send(address, source, channels=2, tls=pki.source)  # no name to check
    named = pki.config("source", hostname="dest.test")
    multifd.send(address, source, channels=2, tls=named)
    _received(receiver, source)


@pytest.mark.parametrize("tls", [True, False])
def test_every_channel_is_encrypted(pki: Pki, tls: bool) -> None:
    """The bytes of every connection start a TLS handshake and never show the RAM; the
    same migration without TLS shows it (so the check can fail)."""
    size = 64 * PAGE_SIZE
    source = Ram([RamBlock.from_bytes("mem", (SECRET * (size // len(SECRET) + 1))[:size])])
    receiver = ReceiverThread({"channels": 2, "tls": pki.dest if tls else None})
    address = receiver.start("tcp:127.0.0.1:0")
    with Relay(tcp_target(address), count=3) as relay:
        multifd.send(relay.address, source, channels=2, tls=pki.source if tls else None)
        _received(receiver, source)
    assert len(relay.sent) == 3
    assert all((sent[:2] == b"\x16\x03") is tls for sent in relay.sent)  # a TLS record first
    assert any(SECRET in sent for sent in relay.sent) is not tls


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("none", "the client sent no certificate"),
        ("stranger", "client certificate rejected: unable to get local issuer certificate"),
        ("plain", "not a TLS client"),
    ],
)
def test_bad_clients_are_refused_on_every_channel_then_the_source_migrates(
    pki: Pki, client: str, reason: str
) -> None:
    source = make_ram(6, SIZES)
    receiver = ReceiverThread({"channels": 2, "tls": pki.dest})
    address = receiver.start("tcp:127.0.0.1:0")
    context = None if client == "plain" else bad_tls_context(pki.folder, _cert(client))
    answers = [
        attempt(address, context, first_bytes(kind, index))
        for kind, index in (("main", 0), ("multifd", 0), ("multifd", 1))
    ]
    expected = {"none": "TLSV13_ALERT_CERTIFICATE_REQUIRED", "stranger": "TLSV1_ALERT_UNKNOWN_CA"}
    assert all(answer == expected.get(client, answer) for answer in answers), answers
    multifd.send(address, source, channels=2, tls=pki.source)
    refused = _received(receiver, source).refused
    assert len(refused) == 3
    assert all(reason in exc.reason and exc.peer.startswith("127.0.0.1:") for exc in refused)


def _cert(client: str) -> str | None:
    return None if client == "none" else client


def test_a_source_with_an_untrusted_certificate_hears_why(pki: Pki) -> None:
    source = make_ram(7, SIZES)
    receiver = ReceiverThread({"channels": 2, "tls": pki.dest})
    address = receiver.start("tcp:127.0.0.1:0")
    with pytest.raises(MigrationFailed) as info:
        multifd.send(address, source, channels=2, tls=pki.stranger)
    cause = info.value.__cause__
    assert isinstance(cause, ChannelError)
    assert cause.channel in {"main", "multifd/0", "multifd/1"}  # the first to fail
    assert "TLS: the receiver does not trust our certificate (unknown CA)" in str(cause)
    multifd.send(address, source, channels=2, tls=pki.source)
    refused = _received(receiver, source).refused
    assert refused
    assert all("unable to get local issuer certificate" in r.reason for r in refused)


def test_the_source_checks_the_destination_name(pki: Pki) -> None:
    source = make_ram(8, SIZES)
    receiver = ReceiverThread({"channels": 1, "tls": pki.dest})
    address = receiver.start("tcp:127.0.0.1:0")
    wrong = pki.config("source", hostname="wrong.test")
    with pytest.raises(MigrationFailed, match=r"not trusted: Hostname mismatch.*wrong\.test"):
        multifd.send(address, source, channels=1, tls=wrong)
    multifd.send(address, source, channels=1, tls=pki.config("source", hostname="dest.test"))
    assert len(_received(receiver, source).refused) == 1  # the aborted handshake


def test_the_source_refuses_a_destination_from_another_ca(pki: Pki) -> None:
    receiver = ReceiverThread({"channels": 1, "tls": pki.impostor, "setup_timeout": 1.0})
    address = receiver.start("tcp:127.0.0.1:0")
    with pytest.raises(MigrationFailed, match="not trusted: unable to get local issuer"):
        multifd.send(address, make_ram(9, SIZES), channels=1, tls=pki.source)
    with pytest.raises(MigrationFailed, match=r"no main channel.*1 connection.*refused"):
        receiver.result()


def test_a_tls_source_and_a_plain_destination_both_say_so(pki: Pki) -> None:
    receiver = ReceiverThread({"channels": 1})
    address = receiver.start("tcp:127.0.0.1:0")
    with pytest.raises(MigrationFailed, match=r"during the TLS handshake \(does it use TLS"):
        multifd.send(address, make_ram(10, SIZES), channels=1, tls=pki.source)
    with pytest.raises(MigrationFailed) as info:
        receiver.result()
    assert isinstance(info.value.__cause__, ProtocolError)
    assert "TLS ClientHello" in str(info.value.__cause__)


def test_a_stalled_handshake_holds_up_nobody(pki: Pki) -> None:
    source = make_ram(11, SIZES)
    limits = ReceiveLimits(handshake_timeout=1000.0)  # the stallers outlive the migration
    receiver = ReceiverThread({"channels": 2, "tls": pki.dest, "limits": limits})
    address = receiver.start("tcp:127.0.0.1:0")
    with (
        socket.create_connection(tcp_target(address), timeout=WAIT) as silent,
        socket.create_connection(tcp_target(address), timeout=WAIT) as halfway,
    ):
        halfway.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello
        multifd.send(address, source, channels=2, tls=pki.source)
        refused = _received(receiver, source).refused
        assert [exc.reason for exc in refused] == ["setup is over: every channel is there"] * 2
        assert silent.recv(1) == b""  # closed when setup ended
        assert halfway.recv(1) == b""


def test_a_handshake_that_takes_too_long_is_refused(pki: Pki) -> None:
    source = make_ram(12, SIZES)
    limits = ReceiveLimits(handshake_timeout=1.0)
    receiver = ReceiverThread({"channels": 1, "tls": pki.dest, "limits": limits})
    address = receiver.start("tcp:127.0.0.1:0")
    with socket.create_connection(tcp_target(address), timeout=WAIT) as silent:
        assert silent.recv(1) == b""  # the destination gave up on it
    multifd.send(address, source, channels=1, tls=pki.source)
    (refused,) = _received(receiver, source).refused
    assert "no TLS handshake within 1 s" in str(refused)


def test_a_tls_source_with_multifd_off_fails_at_its_first_page(pki: Pki) -> None:
    """Setup reads the main channel through TLS too (the bytes decrypted behind select()
    included): a source with multifd off fails at its first page, not after the setup
    timeout (an hour here)."""
    receiver = ReceiverThread({"channels": 2, "tls": pki.dest, "setup_timeout": 3600.0})
    address = receiver.start("tcp:127.0.0.1:0")
    with pytest.raises(MigrationFailed):
        multifd.send(address, make_ram(12, SIZES), channels=0, tls=pki.source)
    with pytest.raises(MigrationFailed) as info:
        receiver.result()
    assert isinstance(info.value.__cause__, ProtocolError)
    assert "RAM page on the main channel" in str(info.value.__cause__)
