"""The ``multifd`` command as a user runs it: two processes, files in and out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multifd.demo import read_listening_line
from tests.migration.helpers import BOUND, PAGE

CLI = [sys.executable, "-m", "multifd"]


def _receiver(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [*CLI, "receive", "tcp:127.0.0.1:0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        return proc, read_listening_line(proc.stderr, BOUND)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=BOUND)
        raise


def _image(path: Path, pages: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    data = np.frombuffer(rng.bytes(pages * PAGE), dtype=np.uint8).reshape(pages, PAGE).copy()
    data[rng.random(pages) < 0.3] = 0
    path.write_bytes(data.tobytes())
    return path


def test_send_and_receive_files_with_json(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img", 300, seed=1)
    proc, address = _receiver("--channels", "2", "--output", str(tmp_path / "out"), "--json")
    sent = subprocess.run(
        [*CLI, "send", address, "--block", f"mem={image}", "--json"],
        capture_output=True,
        timeout=BOUND,
        check=False,
    )
    out, errors = proc.communicate(timeout=BOUND)
    assert sent.returncode == 0, sent.stderr
    assert proc.returncode == 0, errors
    assert (tmp_path / "out" / "mem").read_bytes() == image.read_bytes()
    received = json.loads(out)
    sender = json.loads(sent.stdout)
    assert received["status"] == sender["status"] == "completed"
    assert received["ram"]["total"] == sender["ram"]["total"] == 300 * PAGE
    assert received["ram"]["normal"] + received["ram"]["duplicate"] == 300


def _json_lines(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


def test_json_progress_streams_snapshots_then_the_final_statistics(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img", 2048, seed=3)  # 8 MiB at 8 MB/s: about a second
    proc, address = _receiver("--channels", "2", "--json-progress")
    sent = subprocess.run(
        [*CLI, "send", address, "--block", f"mem={image}", "--max-bandwidth", "8M",
         "--json-progress"],
        capture_output=True, timeout=BOUND, check=False,
    )  # fmt: skip
    out, errors = proc.communicate(timeout=BOUND)
    assert sent.returncode == 0, sent.stderr
    assert proc.returncode == 0, errors
    for lines in (_json_lines(out), _json_lines(sent.stdout)):
        assert len(lines) >= 2, lines  # at least one snapshot while it ran, then the end
        assert [line["status"] for line in lines][-1] == "completed"
        assert all(line["status"] != "completed" for line in lines[:-1])
        moved = [line["ram"]["transferred"] for line in lines]
        assert moved == sorted(moved)
        assert lines[-1]["ram"]["normal"] + lines[-1]["ram"]["duplicate"] == 2048


def test_json_progress_ends_with_a_failed_snapshot_when_the_migration_fails(
    tmp_path: Path,
) -> None:
    image = _image(tmp_path / "ram.img", 16, seed=4)
    proc, address = _receiver("--uuid", "00000000-0000-0000-0000-000000000001",
                              "--json-progress")  # fmt: skip
    sent = subprocess.run([*CLI, "send", address, "--block", f"mem={image}"],
                          capture_output=True, timeout=BOUND, check=False)  # fmt: skip
    out, errors = proc.communicate(timeout=BOUND)
    assert sent.returncode == proc.returncode == 1
    assert b"uuid" in errors.lower()
    assert _json_lines(out)[-1]["status"] == "failed"


def test_refused_connection_is_one_clear_line(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img", 4, seed=2)
    proc, address = _receiver("--channels", "0")
    proc.kill()
    proc.communicate(timeout=BOUND)
    sent = subprocess.run(
        [*CLI, "send", address, "--block", f"mem={image}"],
        capture_output=True,
        timeout=BOUND,
        check=False,
    )
    assert sent.returncode == 1
    lines = sent.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "main" in lines[0]
    assert "refused" in lines[0]


def test_bad_block_size_is_refused_before_connecting(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    sent = subprocess.run(
        [*CLI, "send", "tcp:127.0.0.1:9", "--block", f"mem={odd}"],
        capture_output=True,
        timeout=BOUND,
        check=False,
    )
    assert sent.returncode == 1
    assert "multiple of 4096" in sent.stderr.decode()


@pytest.mark.parametrize("sender_uuid", ["12345678-9abc-def0-1122-334455667788", None])
def test_uuid_mismatch_is_refused(tmp_path: Path, sender_uuid: str | None) -> None:
    image = _image(tmp_path / "ram.img", 8, seed=3)
    proc, address = _receiver("--uuid", "00000000-0000-0000-0000-00000000abcd")
    extra = ["--uuid", sender_uuid] if sender_uuid else []
    sent = subprocess.run(
        [*CLI, "send", address, "--block", f"mem={image}", *extra],
        capture_output=True,
        timeout=BOUND,
        check=False,
    )
    _, errors = proc.communicate(timeout=BOUND)
    assert proc.returncode == 1
    assert sent.returncode == 1
    message = errors.decode()
    assert "uuid" in message.lower()
    assert "0000abcd" in message.replace("-", "")
