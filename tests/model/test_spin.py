"""SPIN checks the send-side handshake: our design passes, QEMU < 9.0's race is found.

Runs ``scripts/verify.sh`` (``make verify``): for 1, 2 and 3 channels, the safety run and
the LTL property "every sync request is eventually answered" on verify/multifd_new.pml,
and the safety run on verify/multifd_old.pml, which must fail. Skips without ``spin``,
unless ``MULTIFD_REQUIRE_QEMU=1`` (CI), where a missing SPIN fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
_REQUIRE_ENV = "MULTIFD_REQUIRE_QEMU"


def test_spin_clears_our_design_and_finds_the_old_race() -> None:
    if shutil.which("spin") is None:
        if os.environ.get(_REQUIRE_ENV) == "1":
            pytest.fail(f"spin is not installed (and {_REQUIRE_ENV}=1): apt-get install spin")
        pytest.skip("spin is not installed")
    script = _REPO / "scripts" / "verify.sh"
    done = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("multifd_")]
    new = [row for row in rows if row[0] == "multifd_new.pml"]
    old = [row for row in rows if row[0] == "multifd_old.pml"]
    assert len(new) == 6
    assert all(row[-1] == "ok" and row[-2] == "0" for row in new)  # zero errors
    assert {(row[1], row[2]) for row in new} == {(n, c) for n in "123" for c in ("safety", "ltl")}
    assert len(old) == 3
    assert all(row[4] != "0" and "I1:" in row for row in old)
    assert re.search(r"sends a packet: SYNC=1 pages=1\n  violated: I1", done.stdout)
