"""``multifd send --live --pause-pid``: another process writes the block while it moves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from multifd.pausing import _state
from tests.migration.helpers import BOUND, PAGE
from tests.migration.test_cli import CLI, _receiver

PAGES = 1024

# The workload: writes an increasing number into random pages of a shared file, about
# 50,000 writes per second, until killed.
WRITER = """
import mmap, sys, time
import numpy as np
with open(sys.argv[1], "r+b") as f:
    words = np.frombuffer(mmap.mmap(f.fileno(), 0), dtype=np.uint64).reshape(-1, 512)
rng = np.random.default_rng(5)
number = 0
print("ready", flush=True)
while True:
    for page in rng.integers(0, len(words), 50).tolist():
        number += 1
        words[page, 1] = number
    time.sleep(0.001)
"""


@contextmanager
def writer_process(image: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(image)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.communicate(timeout=BOUND)


def _image(path: Path) -> Path:
    data = np.zeros((PAGES, PAGE // 8), dtype=np.uint64)
    data[:, 0] = np.arange(1, PAGES + 1)
    path.write_bytes(data.tobytes())
    return path


def test_live_send_stops_the_writer_and_delivers_its_last_state(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img")
    with writer_process(image) as writer:
        proc, address = _receiver("--channels", "2", "--output", str(tmp_path / "out"))
        sent = subprocess.run(
            [*CLI, "send", address, "--block", f"mem={image}", "--live",
             "--pause-pid", str(writer.pid), "--downtime-limit", "50"],
            capture_output=True, text=True, timeout=BOUND, check=False,
        )  # fmt: skip
        _, errors = proc.communicate(timeout=BOUND)
        assert sent.returncode == 0, sent.stderr
        assert proc.returncode == 0, errors
        assert _state(writer.pid) in ("T", "t"), "the source stays paused after success"
        assert "pass 1:" in sent.stderr
        frozen = image.read_bytes()
        assert (tmp_path / "out" / "mem").read_bytes() == frozen
        assert np.frombuffer(frozen, dtype=np.uint64).reshape(PAGES, -1)[:, 1].any()


def test_resume_source_continues_the_writer_after_success(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img")
    with writer_process(image) as writer:
        proc, address = _receiver("--channels", "2")
        sent = subprocess.run(
            [*CLI, "send", address, "--block", f"mem={image}", "--live",
             "--pause-pid", str(writer.pid), "--resume-source"],
            capture_output=True, text=True, timeout=BOUND, check=False,
        )  # fmt: skip
        proc.communicate(timeout=BOUND)
        assert sent.returncode == 0, sent.stderr
        assert _state(writer.pid) not in ("T", "t")


def test_a_failed_live_send_lets_the_writer_run_again(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img")
    with writer_process(image) as writer:
        proc, address = _receiver("--uuid", "00000000-0000-0000-0000-000000000001")
        sent = subprocess.run(
            [*CLI, "send", address, "--block", f"mem={image}", "--live",
             "--pause-pid", str(writer.pid), "--downtime-limit", "50000"],
            capture_output=True, text=True, timeout=BOUND, check=False,
        )  # fmt: skip
        proc.communicate(timeout=BOUND)
        assert sent.returncode == 1
        assert _state(writer.pid) not in ("T", "t")


def test_pause_pid_needs_live(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img")
    sent = subprocess.run([*CLI, "send", "tcp:127.0.0.1:9", "--block", f"mem={image}",
                           "--pause-pid", "1"], capture_output=True, text=True,
                          timeout=BOUND, check=False)  # fmt: skip
    assert sent.returncode == 2
    assert "--pause-pid needs --live" in sent.stderr


@pytest.mark.parametrize("pid", [2**22 + 1])
def test_pause_pid_must_be_a_process_we_can_signal(tmp_path: Path, pid: int) -> None:
    image = _image(tmp_path / "ram.img")
    sent = subprocess.run([*CLI, "send", "tcp:127.0.0.1:9", "--block", f"mem={image}",
                           "--live", "--pause-pid", str(pid)], capture_output=True, text=True,
                          timeout=BOUND, check=False)  # fmt: skip
    assert sent.returncode == 1
    assert f"cannot signal process {pid}" in sent.stderr


def test_ctrl_c_cancels_within_a_second_and_resumes_the_writer(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img")
    with writer_process(image) as writer:
        proc, address = _receiver("--channels", "2")
        # 1 MB/s: the first pass alone would take seconds, so Ctrl-C lands in it.
        send = subprocess.Popen(
            [*CLI, "-v", "send", address, "--block", f"mem={image}", "--live",
             "--pause-pid", str(writer.pid), "--max-bandwidth", "1M"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert send.stderr is not None
            lines = []
            for line in send.stderr:
                lines.append(line)
                if "status: active" in line:
                    break
            assert lines, "the sender printed nothing"
            assert "status: active" in lines[-1], lines
            send.send_signal(signal.SIGINT)
            _, rest = send.communicate(timeout=2.0)  # the brief: cancelled within a second
        finally:
            if send.poll() is None:
                send.kill()
                send.communicate()
        proc.communicate(timeout=BOUND)
        assert send.returncode == 130
        assert "cancelled" in rest
        assert proc.returncode == 1
        assert _state(writer.pid) not in ("T", "t")
