"""Auto-converge: writers that outrun the bandwidth are held until the migration converges.

The in-process writer of ``test_precopy`` honours the throttle exactly (its rate times the
share of time it may run); ``multifd send --auto-converge`` throttles a real process with
``SIGSTOP``/``SIGCONT`` (:class:`multifd.pausing.ProcessThrottle`).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import multifd
from multifd.migration.precopy import Hooks, Limits, TimeoutPolicy
from multifd.migration.throttle import AutoConverge
from multifd.pausing import _state, process_hooks
from tests.migration.helpers import BOUND, ReceiverThread, assert_same
from tests.migration.test_cli import CLI, _receiver
from tests.migration.test_live_cli import _image, writer_process
from tests.migration.test_precopy import Writer, live_block

RATE = 20_000.0  # writes per second: far more than 16 MB/s moves (see test_precopy)
# A trigger low enough that a writer slowed down by a loaded machine still trips it.
STEEP = AutoConverge(trigger=0.1, initial=0.5, increment=0.49)


def _throttled(writer: Writer, levels: list[float]) -> Hooks:
    def throttle(fraction: float) -> None:
        levels.append(fraction)
        writer.rate = RATE * (1 - fraction)

    return Hooks(pause=writer.pause, throttle=throttle)


@pytest.mark.parametrize("auto_converge", [True, False], ids=["auto-converge", "plain"])
def test_auto_converge_holds_the_writer_until_the_rest_fits_the_limit(
    auto_converge: bool,
) -> None:
    limits = Limits(downtime_limit=0.02, max_bandwidth=16e6, max_passes=12,
                    auto_converge=STEEP if auto_converge else None)  # fmt: skip
    levels: list[float] = []
    with live_block(rate=RATE) as (_, log, writer):
        receiver = ReceiverThread({"channels": 2})
        address = receiver.start("tcp:127.0.0.1:0")
        if not auto_converge:
            with pytest.raises(multifd.MigrationFailed, match="did not converge"):
                multifd.send(address, log, limits=limits, hooks=_throttled(writer, levels))
            with pytest.raises(multifd.MigrationFailed):
                receiver.result()
            assert levels == []
            return
        stats = multifd.send(address, log, limits=limits, hooks=_throttled(writer, levels))
        received = receiver.result()
        try:
            assert_same(log.source_ram, received.ram)  # the writer's last state, paused
        finally:
            received.ram.close()
    assert stats.status is multifd.Status.COMPLETED
    assert levels == [0.5, 0.99]
    assert stats.cpu_throttle_percentage == 99
    assert stats.to_json()["cpu-throttle-percentage"] == 99
    assert len(stats.passes) < 12


def test_a_failed_migration_lifts_the_throttle() -> None:
    limits = Limits(downtime_limit=0.001, max_bandwidth=16e6, max_passes=3,
                    on_timeout=TimeoutPolicy.CANCEL, auto_converge=STEEP)  # fmt: skip
    levels: list[float] = []
    with live_block(rate=RATE) as (_, log, writer):
        receiver = ReceiverThread({"channels": 2})
        address = receiver.start("tcp:127.0.0.1:0")
        with pytest.raises(multifd.MigrationFailed, match="did not converge"):
            multifd.send(address, log, limits=limits, hooks=_throttled(writer, levels))
        with pytest.raises(multifd.MigrationFailed):
            receiver.result()
        assert writer.thread.is_alive(), "the source keeps running"
    assert levels == [0.5, 0.0]
    assert writer.rate == RATE


# A process that says "cont" each time it is continued after a stop (SIGSTOP itself
# cannot be caught): the test hears each turn of the throttle instead of polling for it.
_CONTINUED = """
import os, signal, time
signal.signal(signal.SIGCONT, lambda *_: os.write(1, b"cont\\n"))
os.write(1, b"ready\\n")
while True:
    time.sleep(600)
"""


@contextmanager
def _listener() -> Iterator[subprocess.Popen[bytes]]:
    # Unbuffered: a line read must not leave the next one in a buffer select() cannot see.
    proc = subprocess.Popen([sys.executable, "-c", _CONTINUED], stdout=subprocess.PIPE, bufsize=0)
    try:
        assert _line(proc) == b"ready"
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=BOUND)  # reaps it and closes its stdout


def _line(proc: subprocess.Popen[bytes]) -> bytes:
    """The process's next line, waiting at most BOUND for it."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], BOUND)
    assert ready, f"no line from process {proc.pid} within {BOUND:g} s"
    return proc.stdout.readline().strip()


def _stopped(pid: int) -> bool:
    return _state(pid) in ("T", "t")


def _throttle_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "multifd-throttle"]


def test_a_throttled_process_is_stopped_in_turns_and_pause_leaves_it_stopped() -> None:
    with _listener() as proc:
        hooks = process_hooks(proc.pid)
        hooks.throttle(0.5)
        assert [_line(proc), _line(proc)] == [b"cont", b"cont"]  # two turns of the throttle
        hooks.pause()  # returns once the kernel says the process is stopped
        assert not _throttle_threads()
        assert _stopped(proc.pid)
        hooks.resume()
        assert _line(proc) == b"cont"
        assert not _stopped(proc.pid)


def test_lifting_the_throttle_leaves_the_process_running() -> None:
    with _listener() as proc:
        hooks = process_hooks(proc.pid)
        hooks.throttle(0.9)
        assert _line(proc) == b"cont"
        hooks.throttle(0.0)
        assert not _throttle_threads()
        assert not _stopped(proc.pid)  # a SIGCONT takes effect as it is sent


def test_send_auto_converge_throttles_the_pause_pid(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img")
    with writer_process(image) as writer:
        proc, address = _receiver("--channels", "2", "--output", str(tmp_path / "out"))
        # 20 MB/s: each pass takes about 0.2 s, in which the writer dirties every page.
        sent = subprocess.run(
            [*CLI, "send", address, "--block", f"mem={image}", "--live", "--json",
             "--pause-pid", str(writer.pid), "--auto-converge", "--max-bandwidth", "20M",
             "--downtime-limit", "1", "--max-passes", "6", "--on-timeout", "force"],
            capture_output=True, text=True, timeout=BOUND, check=False,
        )  # fmt: skip
        _, errors = proc.communicate(timeout=BOUND)
        assert sent.returncode == 0, sent.stderr
        assert proc.returncode == 0, errors
        assert _stopped(writer.pid), "the source stays paused after success"
        assert json.loads(sent.stdout)["cpu-throttle-percentage"] in (20, 30)
        assert (tmp_path / "out" / "mem").read_bytes() == image.read_bytes()
    assert not _throttle_threads()


def test_auto_converge_needs_a_process_to_slow_down(tmp_path: Path) -> None:
    image = _image(tmp_path / "ram.img")
    sent = subprocess.run([*CLI, "send", "tcp:127.0.0.1:9", "--block", f"mem={image}",
                           "--live", "--auto-converge"], capture_output=True, text=True,
                          timeout=BOUND, check=False)  # fmt: skip
    assert sent.returncode == 2
    assert "--auto-converge needs --pause-pid" in sent.stderr
