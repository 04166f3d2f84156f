"""TLS against real QEMU 7.2 and 10.0: QEMU's ``tls-creds-x509`` with ours, both directions.

QEMU's credentials are made from the certificates of :mod:`tests.tls.pki`
(:meth:`~tests.tls.pki.Pki.qemu_creds`); both ends check the other's certificate
(``verify-peer=on``). QEMU checks the destination's certificate against the host it dials,
127.0.0.1, which the ``dest`` certificate names.

What these cases pin down (each failed before its fix):

- a destination must send nothing after the handshake: a QEMU source never reads its
  channels, and its close then resets the connection, dropping what was in flight (ours sent
  a TLS 1.3 session ticket: "unexpected EOF in page data");
- a source must send a multifd channel's init packet at once: QEMU reads it before it
  handshakes the next connection (ours connected every channel first: the handshake of the
  second multifd channel timed out).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from multifd.tls import TlsConfig
from tests.interop.cli import CliResult, MultifdProcess, as_uri, receive_args, send_args
from tests.interop.qemu import BLOCK_NAME, QemuError, QemuVm, ram_mismatch
from tests.tls.pki import Pki

pytestmark = pytest.mark.interop

SIZE = 32 << 20
TIMEOUT = 30.0
FAST = 10 << 30  # lifts QEMU's 128 MiB/s max-bandwidth default
CREDS = "tls0"
VERSIONS = ["7.2", "10.0"]
CHANNELS = [pytest.param(0, id="no-multifd"), 2]

MakeVm = Callable[..., QemuVm]


def _factory(request: pytest.FixtureRequest, version: str) -> MakeVm:
    make: MakeVm = request.getfixturevalue("make_vm" if version == "7.2" else "make_vm10")
    return make


def _configure(vm: QemuVm, channels: int) -> None:
    vm.configure(channels, max_bandwidth=FAST)
    vm.set_parameters(**{"tls-creds": CREDS})


@dataclass
class Migration:
    """A QEMU source migrating into ``multifd receive``, which writes ``received``."""

    source: QemuVm
    receiver: MultifdProcess
    received: Path


@dataclass
class _Case:
    """One case's QEMU and paths: ``request`` finds the QEMU of ``version``."""

    request: pytest.FixtureRequest
    pki: Pki
    folder: Path
    version: str

    @contextlib.contextmanager
    def qemu_source(self, image: Path, *, cert: str, channels: int) -> Iterator[Migration]:
        """``multifd receive`` with TLS, and a QEMU source presenting ``cert`` that has
        started migrating into it."""
        output = self.folder / "received"
        output.mkdir()
        args = receive_args("tcp:127.0.0.1:0", channels=channels, output=output)
        with MultifdProcess([*args, *self.pki.dest.cli_args()], timeout=TIMEOUT) as receiver:
            uri = as_uri(receiver.listening_address(TIMEOUT))
            creds = self.pki.qemu_creds(
                self.folder / "creds", endpoint="client", name=cert, creds_id=CREDS
            )
            make = _factory(self.request, self.version)
            source = make(SIZE, ram_file=image, name="src", extra_args=creds)
            _configure(source, channels)
            source.migrate(uri)
            yield Migration(source, receiver, output / BLOCK_NAME)

    def into_qemu(self, image: Path, *, tls: TlsConfig, channels: int) -> tuple[QemuVm, CliResult]:
        """A QEMU destination with TLS, and how ``multifd send`` with ``tls`` into it ended."""
        creds = self.pki.qemu_creds(
            self.folder / "creds", endpoint="server", name="dest", creds_id=CREDS
        )
        make = _factory(self.request, self.version)
        destination = make(SIZE, name="dst", incoming=True, extra_args=creds)
        _configure(destination, channels)
        peer = f"qemu-{self.version}"
        args = send_args(destination.listen(), {BLOCK_NAME: image}, channels=channels, peer=peer)
        with MultifdProcess([*args, *tls.cli_args()], timeout=TIMEOUT) as sender:
            return destination, sender.wait(TIMEOUT)


@pytest.fixture(params=VERSIONS)
def case(request: pytest.FixtureRequest, pki: Pki, tmp_path: Path) -> _Case:
    return _Case(request, pki, tmp_path, request.param)


@pytest.mark.parametrize("channels", CHANNELS)
def test_qemu_tls_source_into_multifd_receive(
    case: _Case, ram_image: Callable[..., Path], channels: int
) -> None:
    image = ram_image(SIZE, seed=70 + channels)
    with case.qemu_source(image, cert="source", channels=channels) as migration:
        migration.source.wait_for_status("completed", TIMEOUT)
        result = migration.receiver.wait(TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "refused" not in result.stderr
    assert ram_mismatch(image, migration.received) is None


@pytest.mark.parametrize("channels", CHANNELS)
def test_multifd_send_tls_into_qemu_destination(
    case: _Case, ram_image: Callable[..., Path], channels: int
) -> None:
    image = ram_image(SIZE, seed=80 + channels)
    destination, result = case.into_qemu(image, tls=case.pki.source, channels=channels)
    assert result.returncode == 0, result.stderr
    assert destination.wait_for_status("completed", TIMEOUT).status == "completed"
    assert ram_mismatch(image, destination.ram_path) is None
    assert destination.log() == ""  # e.g. no complaint about a TLS session cut short


def test_a_qemu_source_with_a_stranger_certificate_is_refused(
    case: _Case, ram_image: Callable[..., Path]
) -> None:
    with case.qemu_source(ram_image(SIZE, seed=90), cert="stranger", channels=2) as migration:
        with pytest.raises(QemuError, match="migration failed"):
            migration.source.wait_for_status("completed", TIMEOUT)
        # QEMU may report its failure before the receiver has printed why it refused.
        migration.receiver.wait_for_line("^refused .*: client certificate rejected", TIMEOUT)
        migration.receiver.close()  # it waits on for the source it was started for
        stderr = migration.receiver.wait().stderr
    # Printed as they happen: the receiver waits on for its source.
    refusals = re.findall(r"^refused 127\.0\.0\.1:\d+: (.*)$", stderr, re.M)
    rejected = "client certificate rejected: unable to get local issuer certificate"
    assert rejected in refusals, stderr
    # A channel QEMU opened meanwhile may be dropped by QEMU itself, mid-handshake.
    assert set(refusals) <= {rejected, "closed during the TLS handshake"}, refusals


def test_multifd_send_with_a_stranger_certificate_hears_why_from_qemu(
    case: _Case, ram_image: Callable[..., Path]
) -> None:
    destination, result = case.into_qemu(
        ram_image(SIZE, seed=91), tls=case.pki.stranger, channels=2
    )
    assert result.returncode == 1
    # QEMU checks the certificate after the handshake and closes without an alert.
    assert "TLS session cut short (QEMU does so when it refuses our certificate)" in (
        result.stderr
    ), result.stderr
    assert "certificate" in destination.log(), destination.log()
