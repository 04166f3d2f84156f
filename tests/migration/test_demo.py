"""``multifd demo`` end to end, at a small size."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.migration.helpers import BOUND
from tests.migration.test_cli import CLI


def test_the_demo_migrates_a_written_block_and_reports(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "demo", "--size", "16M", "--rate", "5000", "--hot-set", "1M",
         "--downtime-limit", "20", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=BOUND, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "destination equals the source byte for byte" in done.stderr
    assert "pass 1:" in done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["destination_equals_source"] is True
    assert report["stats"]["status"] == "completed"
    assert report["stats"]["passes"][0]["pages"] == 4096
    assert (tmp_path / "passes.png").read_bytes().startswith(b"\x89PNG")
