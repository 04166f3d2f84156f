"""``multifd relay``, ``record`` and ``replay`` with TLS, between real QEMUs.

Each side of a relay has credentials of its own: ``--tls-*`` towards the source (the
relay is the TLS server there, with the ``dest`` certificate) and ``--out-tls-*`` towards
the target (the client, with the ``source`` certificate). QEMU's credentials come from
:meth:`tests.tls.pki.Pki.qemu_creds`; every end checks its peer's certificate.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

import pytest

from multifd.tls import TlsConfig
from tests.interop.cli import as_uri
from tests.interop.qemu import BLOCK_NAME, QemuError, QemuVm, ram_mismatch
from tests.relay.helpers import vm_cli
from tests.relay.test_qemu import FAST, LOCAL, SIZE, TIMEOUT, MakeImage, MakeVm
from tests.tls.pki import Pki

pytestmark = pytest.mark.interop

CREDS: Final = "tls0"


def _out_args(tls: TlsConfig) -> list[str]:
    """``tls`` as the relay's ``--out-tls-*`` options."""
    return [arg.replace("--tls-", "--out-tls-") for arg in tls.cli_args()]


def _tls_vm(
    make: MakeVm, pki: Pki, folder: Path, *, endpoint: str, cert: str, **options: object
) -> QemuVm:
    """A QEMU whose migrations run TLS, presenting ``cert`` as ``endpoint``."""
    name = str(options["name"])
    creds = pki.qemu_creds(folder / f"creds-{name}", endpoint=endpoint, name=cert, creds_id=CREDS)
    vm = make(SIZE, extra_args=creds, **options)
    vm.set_parameters(**{"tls-creds": CREDS})
    return vm


def test_qemu10_via_relay_into_qemu72_tls_on_both_sides(
    make_vm: MakeVm, make_vm10: MakeVm, ram_image: MakeImage, pki: Pki, tmp_path: Path
) -> None:
    image = ram_image(SIZE, seed=75)
    src = _tls_vm(make_vm10, pki, tmp_path, endpoint="client", cert="source",
                  ram_file=image, name="src")  # fmt: skip
    dst = _tls_vm(make_vm, pki, tmp_path, endpoint="server", cert="dest",
                  name="dst", incoming=True)  # fmt: skip
    dst.configure(4, compression="zlib")
    args = ["relay", LOCAL, dst.listen(), "--channels", "2", "--out-channels", "4"]
    args += ["--out-compression", "zlib", "--out-peer", "qemu-7.2", "--json"]
    args += [*pki.dest.cli_args(), *_out_args(pki.source)]
    with vm_cli(args, timeout=TIMEOUT) as relay:
        src.configure(2, max_bandwidth=FAST)
        src.migrate(as_uri(relay.listening_address(TIMEOUT)))
        src.wait_for_status("completed", TIMEOUT)
        result = relay.wait()
    assert result.returncode == 0, result.stderr
    assert "refused" not in result.stderr
    assert result.json()["status"] == "completed"
    dst.wait_for_status("completed", TIMEOUT)
    assert ram_mismatch(image, dst.ram_path) is None
    assert dst.log() == ""


def test_tls_record_of_qemu72_then_tls_replay_into_qemu10(
    make_vm: MakeVm, make_vm10: MakeVm, ram_image: MakeImage, pki: Pki, tmp_path: Path
) -> None:
    image = ram_image(SIZE, seed=76)
    src = _tls_vm(make_vm, pki, tmp_path, endpoint="client", cert="source",
                  ram_file=image, name="src")  # fmt: skip
    recording = tmp_path / "rec"
    args = ["record", LOCAL, str(recording), "--channels", "2", *pki.dest.cli_args()]
    with vm_cli(args, timeout=TIMEOUT) as recorder:
        src.configure(2, max_bandwidth=FAST)
        src.migrate(as_uri(recorder.listening_address(TIMEOUT)))
        src.wait_for_status("completed", TIMEOUT)
        recorded = recorder.wait()
    assert recorded.returncode == 0, recorded.stderr
    # The recording holds the migration's content, not its encryption.
    assert ram_mismatch(image, recording / "ram" / BLOCK_NAME) is None
    dst = _tls_vm(make_vm10, pki, tmp_path, endpoint="server", cert="dest",
                  name="dst", incoming=True)  # fmt: skip
    dst.configure(2)
    args = ["replay", str(recording), dst.listen(), "--channels", "2", "--peer", "qemu-10.0"]
    with vm_cli([*args, *pki.source.cli_args()], timeout=TIMEOUT) as replay:
        replayed = replay.wait()
    assert replayed.returncode == 0, replayed.stderr
    dst.wait_for_status("completed", TIMEOUT)
    assert ram_mismatch(image, dst.ram_path) is None
    assert dst.log() == ""


def test_the_relay_says_why_it_refuses_a_source_and_never_dials_the_target(
    make_vm10: MakeVm, ram_image: MakeImage, pki: Pki, tmp_path: Path
) -> None:
    src = _tls_vm(make_vm10, pki, tmp_path, endpoint="client", cert="stranger",
                  ram_file=ram_image(SIZE, seed=77), name="src")  # fmt: skip
    # Nothing listens at the target: a relay that dialled it would fail on that instead.
    args = ["relay", LOCAL, "tcp:127.0.0.1:9", *pki.dest.cli_args()]
    with vm_cli([*args, *_out_args(pki.source)], timeout=TIMEOUT) as relay:
        src.configure(2, max_bandwidth=FAST)
        src.migrate(as_uri(relay.listening_address(TIMEOUT)))
        with pytest.raises(QemuError, match="migration failed"):
            src.wait_for_status("completed", TIMEOUT)
        # QEMU may report its failure before the relay has printed why it refused.
        relay.wait_for_line("^refused .*: client certificate rejected", TIMEOUT)
        relay.close()  # it waits on for the source it was started for
        stderr = relay.wait().stderr
    refusals = re.findall(r"^refused 127\.0\.0\.1:\d+: (.*)$", stderr, re.M)
    assert "client certificate rejected: unable to get local issuer certificate" in refusals
    assert "outgoing" not in stderr, stderr
