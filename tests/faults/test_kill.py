"""The peer process dies (SIGKILL) or freezes (SIGSTOP) in the middle of a migration.

Two ``multifd`` commands migrate a 64 MiB file at 16 MB/s, so the first pass lasts about
four seconds; once the sender reports ``status: active`` one of them is killed or stopped,
and the other must exit with status 1 within the bound, naming a channel and the cause.
The source file is unchanged, and a fresh migration afterwards delivers it exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Final

import numpy as np
import pytest

from tests.faults.processes import Cli

PAGES: Final = 16384
IO_TIMEOUT: Final = "1"
# A killed peer's sockets are closed by its kernel: the survivor fails on its next read or
# write. A stopped peer is found by the I/O timeout: one second on the receiving side, up to
# three on the sending side (partial writes restart the kernel's timer) after the socket
# buffers filled.
KILL_BOUND: Final = 1.0
STOP_BOUND: Final = 6.0
_CHANNEL: Final = re.compile(r"\b(main|multifd/\d|multifd/\?)\b")
_CAUSES: Final = {
    "receiver": ("Broken pipe", "reset", "timed out"),
    "sender": (
        "ended early",
        "end of stream",
        "EOF",
        "peer closed",
        "no data",
        "timed out",
        "reset",
    ),
}


def log_result(case: str, took: float, message: str) -> None:
    """Append the measurement to $MULTIFD_FAULT_LOG (JSON lines), if set."""
    path = os.environ.get("MULTIFD_FAULT_LOG")
    if path:
        error = message[message.find("multifd: error:") :].strip()
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"cell": case, "survivor_s": round(took, 3), "error": error}))
            out.write("\n")


def make_image(path: Path) -> Path:
    rng = np.random.default_rng(3)
    data = np.frombuffer(rng.bytes(PAGES * 4096), dtype=np.uint8).reshape(PAGES, 4096).copy()
    data[rng.random(PAGES) < 0.25] = 0
    path.write_bytes(data.tobytes())
    return path


def receiver(out: Path) -> Cli:
    return Cli(["-v", "receive", "tcp:127.0.0.1:0", "--channels", "2", "--output", str(out),
                "--io-timeout", IO_TIMEOUT])  # fmt: skip


def sender(address: str, image: Path, *extra: str) -> Cli:
    return Cli(["-v", "send", address, "--block", f"mem={image}", "--channels", "2",
                "--io-timeout", IO_TIMEOUT, *extra])  # fmt: skip


def fresh_attempt(image: Path, out: Path) -> None:
    with receiver(out) as rx, sender(rx.address(), image) as tx:
        assert tx.wait() == 0, tx.stderr
        assert rx.wait() == 0, rx.stderr
    assert (out / "mem").read_bytes() == image.read_bytes()


@pytest.mark.parametrize(
    ("victim", "sig"),
    [
        ("receiver", signal.SIGKILL),
        ("sender", signal.SIGKILL),
        pytest.param("receiver", signal.SIGSTOP, marks=pytest.mark.faults),
        pytest.param("sender", signal.SIGSTOP, marks=pytest.mark.faults),
    ],
    ids=["kill-receiver", "kill-sender", "stop-receiver", "stop-sender"],
)
def test_the_other_end_fails_in_time(tmp_path: Path, victim: str, sig: signal.Signals) -> None:
    image = make_image(tmp_path / "ram.img")
    before = image.read_bytes()
    with receiver(tmp_path / "out") as rx, sender(rx.address(), image, "--max-bandwidth",
                                                  "16M") as tx:  # fmt: skip
        tx.wait_line("status: active")
        struck, survivor = (rx, tx) if victim == "receiver" else (tx, rx)
        at = struck.signal(sig)
        code = survivor.wait()
        took = time.monotonic() - at if survivor.end is None else survivor.end - at
        message = survivor.stderr
    log_result(f"{sig.name} {victim}", took, message)
    assert code == 1, message
    assert took <= (KILL_BOUND if sig == signal.SIGKILL else STOP_BOUND), (took, message)
    error = message[message.index("multifd: error:") :]
    assert _CHANNEL.search(error), error
    assert any(cause in error for cause in _CAUSES[victim]), error
    assert image.read_bytes() == before
    fresh_attempt(image, tmp_path / "again")
