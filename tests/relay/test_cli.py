"""``multifd relay``, ``record`` and ``replay`` as a user runs them (subprocesses)."""

from __future__ import annotations

from pathlib import Path

import multifd
from tests.interop.cli import as_uri
from tests.migration.helpers import ReceiverThread, assert_same, make_ram
from tests.relay.helpers import BOUND, vm_cli
from tests.tls.pki import Pki

LOCAL = "tcp:127.0.0.1:0"


def test_relay_command_forwards_with_its_own_settings() -> None:
    source = make_ram(21, {"mem": 2 << 20})
    receiver = ReceiverThread({"channels": 3, "compression": "zlib"})
    target = receiver.start(LOCAL)
    args = ["relay", LOCAL, target, "--channels", "1", "--out-channels", "3"]
    args += ["--out-compression", "zlib", "--out-level", "6", "--out-peer", "qemu-7.2", "--json"]
    with vm_cli(args, timeout=BOUND) as relay:
        multifd.send(as_uri(relay.listening_address(BOUND)), source, channels=1, peer="native")
        result = relay.wait()
    assert result.returncode == 0, result.stderr
    stats = result.json()
    assert stats["status"] == "completed"
    assert stats["out-profile"] == "qemu-7.2"
    assert stats["sync-mode"] == "per-round"
    assert len(stats["outgoing"]) == 4
    received = receiver.result()
    try:
        assert_same(source, received.ram)
    finally:
        received.ram.close()


def test_record_and_replay_commands(tmp_path: Path) -> None:
    source = make_ram(22, {"mem": 2 << 20, "rom": 1 << 16})
    recording = tmp_path / "rec"
    with vm_cli(["record", LOCAL, str(recording), "--channels", "2"], timeout=BOUND) as rec:
        multifd.send(as_uri(rec.listening_address(BOUND)), source, channels=2, peer="qemu-7.2")
        recorded = rec.wait()
    assert recorded.returncode == 0, recorded.stderr
    assert "recorded none" in recorded.stderr
    assert "source per-section, zero pages legacy" in recorded.stderr
    receiver = ReceiverThread({"channels": 1})
    target = receiver.start(LOCAL)
    args = ["replay", str(recording), target, "--channels", "1", "--peer", "native", "--json"]
    with vm_cli(args, timeout=BOUND) as replay:
        replayed = replay.wait()
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.json()["status"] == "completed"
    received = receiver.result()
    try:
        assert_same(source, received.ram)
    finally:
        received.ram.close()
    # A truncated block: refused with the file named, exit status 1.
    block = recording / "ram" / "rom"
    block.write_bytes(block.read_bytes()[:-4096])
    with vm_cli(["replay", str(recording), "tcp:127.0.0.1:9"], timeout=BOUND) as replay:
        refused = replay.wait()
    assert refused.returncode == 1
    assert f"{block}: 61440 bytes, the manifest says 65536" in refused.stderr


def test_partial_outgoing_credentials_are_a_usage_error(pki: Pki) -> None:
    args = ["relay", LOCAL, "tcp:127.0.0.1:9", "--out-tls-cert", str(pki.source.cert)]
    with vm_cli(args, timeout=BOUND) as relay:
        result = relay.wait()
    assert result.returncode == 2
    assert "TLS needs all of --out-tls-cert, --out-tls-key and --out-tls-ca" in result.stderr
