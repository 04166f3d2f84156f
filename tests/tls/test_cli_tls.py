"""``multifd send`` and ``multifd receive`` with --tls-cert, --tls-key and --tls-ca."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from multifd.demo import read_listening_line
from tests.migration.helpers import BOUND, PAGE
from tests.tls.pki import Pki

CLI = [sys.executable, "-m", "multifd"]


def test_send_and_receive_over_tls(pki: Pki, tmp_path: Path) -> None:
    image = tmp_path / "ram.img"
    image.write_bytes(np.random.default_rng(1).bytes(64 * PAGE))
    receiver = subprocess.Popen(
        [
            *CLI,
            "receive",
            "tcp:127.0.0.1:0",
            "--output",
            str(tmp_path / "out"),
            *pki.dest.cli_args(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert receiver.stderr is not None
    try:
        address = read_listening_line(receiver.stderr, BOUND)
        # The destination's own pair is no client certificate (serverAuth only).
        stranger = subprocess.run(
            [*CLI, "send", address, "--block", f"mem={image}", *pki.dest.cli_args(),
             "--tls-hostname", "dest.test"],
            capture_output=True, timeout=BOUND, check=False,
        )  # fmt: skip
        sent = subprocess.run(
            [*CLI, "send", address, "--block", f"mem={image}", *pki.source.cli_args(),
             "--tls-hostname", "dest.test"],
            capture_output=True, timeout=BOUND, check=False,
        )  # fmt: skip
        _, errors = receiver.communicate(timeout=BOUND)
    finally:
        receiver.kill()
        receiver.communicate(timeout=BOUND)
    assert stranger.returncode == 1
    # On whichever channel failed first: each of them was refused.
    assert b"TLS: the receiver rejected our certificate as unfit for a source" in stranger.stderr
    assert sent.returncode == 0, sent.stderr
    assert receiver.returncode == 0, errors
    refusals = re.findall(rb"^refused 127\.0\.0\.1:\d+: (.*)$", errors, re.M)
    assert refusals, errors
    assert all(r.startswith(b"client certificate rejected") for r in refusals), refusals
    assert (tmp_path / "out" / "mem").read_bytes() == image.read_bytes()


def test_tls_flags_come_together(pki: Pki) -> None:
    half = [*CLI, "receive", "tcp:127.0.0.1:0", "--tls-cert", str(pki.dest.cert)]
    result = subprocess.run(half, capture_output=True, timeout=BOUND, check=False)
    assert result.returncode == 2
    assert "--tls-cert, --tls-key and --tls-ca" in result.stderr.decode()
    named = [*CLI, "send", "tcp:127.0.0.1:9", "--block", "m=x", "--tls-hostname", "h"]
    result = subprocess.run(named, capture_output=True, timeout=BOUND, check=False)
    assert result.returncode == 2
    assert "--tls-hostname needs" in result.stderr.decode()
