"""Throughput of one RAM migration over loopback: ours, QEMU 7.2's, and the raw-socket limit.

Run from the repository root with the project's interpreter::

    .venv/bin/python benchmarks/throughput.py [--size 2G] [--quick]

Every row moves the same bytes (random pages, so nothing is skipped as a zero page) and
is timed by the same outside wall clock, from the moment the source is told to start to
the moment the destination has everything:

- a QEMU source starts at QMP ``migrate``; a Python source is a worker process, already
  started with its image mapped, told to call ``multifd.send()`` (neither pays its
  process start-up inside the row);
- a QEMU destination is done at its ``completed`` MIGRATION event (host wall-clock time);
  ``multifd receive`` is done when it prints its ``completed`` line.

Destinations have their RAM allocated before the clock starts: QEMU with ``prealloc=on``,
``multifd receive`` with ``--prealloc`` (the same first-touch cost, paid in advance).

Rows that cannot run (e.g. the CLI is broken) are reported as ``error: ...``; the script
still prints and saves the table: results/throughput-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final, NoReturn

# Run as a script, this directory is on sys.path (for harness and cpu); the tests' helpers
# need the repository root too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu import CPU_ALIGN, CPU_HEADER, CPU_NOTE, CpuSpan, cpu_text, report_cpu
from harness import (
    FAST,
    MIB,
    PREALLOC_NOTE,
    Row,
    Setup,
    check_same,
    finish_receive,
    fmt,
    machine,
    mb_per_s,
    parse_size,
    publish,
    receiver_process,
    run_once,
    run_send_worker,
    seconds_text,
)
from tests.interop.cli import multifd_command
from tests.interop.qemu import BLOCK_NAME, QemuVm, write_ram_image

import multifd

QEMU_QEMU: Final = "QEMU 7.2 -> QEMU 7.2, 2 ch"
RAW: Final = "raw 2-socket copy (limit)"
# Rows with our receiver must stay within the RAM size plus this much resident memory.
RSS_SLACK: Final = 64 * MIB


# -- rows -----------------------------------------------------------------------------------
def raw_copy(setup: Setup, row: Row) -> None:
    """Two TCP connections, one sender and one receiver thread each, recv_into a buffer.

    Runs in a child process: its 2 GiB buffers would otherwise raise this process's peak
    RSS, which Linux charges to every child spawned afterwards (our receivers included).
    """
    worker = [sys.executable, __file__, "--raw-worker", str(setup.image)]
    done = subprocess.run(
        [*worker, "--timeout", str(setup.timeout)],
        capture_output=True,
        text=True,
        timeout=2 * setup.timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no stderr"])[-1])
    row.seconds = float(json.loads(done.stdout)["seconds"])


def raw_worker(image: Path, timeout: float) -> None:
    """The body of the raw row, in its own process: prints ``{"seconds": ...}``.

    Like a migration, sender and receiver are separate processes (a fork), each with two
    threads, so neither side's threads share a GIL with the other side's.
    """
    size = image.stat().st_size
    with socket.create_server(("127.0.0.1", 0)) as server, mmap.mmap(-1, size) as dest:
        server.settimeout(timeout)
        # Touch every page first, as QEMU's prealloc=on does, so the copy times sockets only.
        for offset in range(0, size, mmap.PAGESIZE):
            dest[offset] = 0
        child = os.fork()  # no thread exists yet, so forking is safe
        if child == 0:
            _raw_sender_process(image, server.getsockname()[1], timeout)
        start, end = _raw_receive(server, memoryview(dest), timeout)
        _, status = os.waitpid(child, 0)
        if status != 0:
            raise RuntimeError(f"raw sender failed (wait status {status})")
        with image.open("rb") as file:
            step = 64 * MIB
            if any(file.read(step) != dest[i : i + step] for i in range(0, size, step)):
                raise RuntimeError("raw copy corrupted the data")
    print(json.dumps({"seconds": end - start}))


def _spans(size: int) -> list[slice]:
    half = size // 2 // mmap.PAGESIZE * mmap.PAGESIZE
    return [slice(0, half), slice(half, size)]


def _raw_receive(server: socket.socket, dest: memoryview, timeout: float) -> tuple[float, float]:
    """Accept both connections and fill ``dest``.

    Returns:
        When the first connection arrived and when the last byte landed.
    """
    errors: list[BaseException] = []
    start = 0.0
    with contextlib.ExitStack() as stack:
        threads = []
        for _ in range(2):
            conn = stack.enter_context(server.accept()[0])
            start = start or time.time()
            threads.append(threading.Thread(target=_guard(errors, _pull, conn, dest)))
            threads[-1].start()
        for thread in threads:
            thread.join(timeout)
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"raw copy failed: {errors or 'timeout'}")
    return start, time.time()


def _raw_sender_process(image: Path, port: int, timeout: float) -> NoReturn:
    status = 1
    try:
        errors: list[BaseException] = []
        # Populated before connecting: the limit should not pay for page faults.
        populate = mmap.MAP_SHARED | mmap.MAP_POPULATE
        with (
            image.open("rb") as file,
            mmap.mmap(file.fileno(), 0, flags=populate, prot=mmap.PROT_READ) as src,
        ):
            view = memoryview(src)
            threads = [
                threading.Thread(target=_guard(errors, _push, port, index, view[span], timeout))
                for index, span in enumerate(_spans(len(src)))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout)
            view.release()
        status = 1 if errors or any(t.is_alive() for t in threads) else 0
    finally:
        os._exit(status)  # never run the parent's cleanup in the forked child


def _guard(
    errors: list[BaseException], func: Callable[..., None], *args: Any
) -> Callable[[], None]:
    def run() -> None:
        try:
            func(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    return run


def _push(port: int, index: int, data: memoryview, timeout: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(bytes([index]))  # which half this connection carries
        sock.sendall(data)


def _pull(conn: socket.socket, dest: memoryview) -> None:
    index = conn.recv(1)
    if len(index) != 1:
        raise EOFError("raw sender closed before naming its half")
    view = dest[_spans(len(dest))[index[0]]]
    done = 0
    while done < len(view):
        got = conn.recv_into(view[done:])
        if not got:
            raise EOFError(f"peer closed after {done} of {len(view)} bytes")
        done += got


def qemu_to_qemu(setup: Setup, row: Row) -> None:
    """QEMU source into a pre-allocated QEMU destination."""
    with _source_vm(setup) as source, _destination_vm(setup, channels=2) as destination:
        source.configure(2, max_bandwidth=FAST)
        uri = destination.listen()
        cpu = CpuSpan(source.pid), CpuSpan(destination.pid)
        start = time.time()
        source.migrate(uri)
        done = destination.wait_for_status("completed", setup.timeout)
        row.seconds = (done.event_time or time.time()) - start
        total = source.wait_for_status("completed", setup.timeout).info.get("total-time")
        row.add_cpu(source=cpu[0].stop(), destination=cpu[1].stop())
        row.notes.append(f"source total-time {total} ms")
        check_same(setup.image, destination.ram_path)


def python_to_python(channels: int) -> Callable[[Setup, Row], None]:
    """`multifd.send()` into `multifd receive` with ``channels`` channels."""

    def run(setup: Setup, row: Row) -> None:
        with receiver_process(setup, channels) as (receiver, uri, output):
            start = _send(setup, uri, channels, "native", row)
            finish_receive(setup, row, receiver, output, start)

    return run


def qemu_to_python(setup: Setup, row: Row) -> None:
    """QEMU source into `multifd receive`, 2 channels."""
    with receiver_process(setup, 2) as (receiver, uri, output), _source_vm(setup) as source:
        source.configure(2, max_bandwidth=FAST)
        cpu = CpuSpan(source.pid)
        start = time.time()
        source.migrate(uri)
        finish_receive(setup, row, receiver, output, start)
        source.wait_for_status("completed", setup.timeout)
        row.add_cpu(source=cpu.stop())


def python_to_qemu(setup: Setup, row: Row) -> None:
    """`multifd.send(peer="qemu-7.2")` into a pre-allocated QEMU destination, 2 channels."""
    with _destination_vm(setup, channels=2) as destination:
        uri = destination.listen()
        cpu = CpuSpan(destination.pid)
        start = _send(setup, uri, 2, "qemu-7.2", row)
        done = destination.wait_for_status("completed", setup.timeout)
        row.seconds = (done.event_time or time.time()) - start
        row.add_cpu(destination=cpu.stop())
        check_same(setup.image, destination.ram_path)


# -- row plumbing ---------------------------------------------------------------------------
def _source_vm(setup: Setup) -> QemuVm:
    return QemuVm(
        setup.size, ram_file=setup.image, name="src", scratch_parent=setup.scratch,
        timeout=setup.timeout,
    )  # fmt: skip


@contextlib.contextmanager
def _destination_vm(setup: Setup, *, channels: int) -> Iterator[QemuVm]:
    with QemuVm(
        setup.size, name="dst", incoming=True, prealloc=True, scratch_parent=setup.scratch,
        timeout=setup.timeout,
    ) as destination:  # fmt: skip
        destination.configure(channels)
        yield destination


def _send(setup: Setup, uri: str, channels: int, peer: str, row: Row) -> float:
    """Run ``multifd.send()`` in a started, idle worker process; returns the start time.

    The worker imports the package and maps the image before the clock starts, as a QEMU
    source exists before ``migrate``; it runs apart from this process so that neither its
    memory nor its threads mix with the benchmark's.
    """
    args = ["--send-worker", str(setup.image), "--channels", str(channels), "--peer", peer]
    return run_send_worker(__file__, args, uri, setup.timeout, row=row)


def send_worker(image: Path, channels: int, peer: str) -> None:
    """``--send-worker``: map the image, say ready, send to the URI read from stdin."""
    ram = multifd.Ram([multifd.RamBlock.from_file(BLOCK_NAME, image)])
    print("ready", flush=True)
    uri = sys.stdin.readline().strip()
    report_cpu(lambda: multifd.send(uri, ram, channels=channels, peer=peer))


ROWS: Final[list[tuple[str, Callable[[Setup, Row], None], str]]] = [
    (RAW, raw_copy, ""),
    (QEMU_QEMU, qemu_to_qemu, "reference"),
    ("Python -> Python, 1 ch", python_to_python(1), ""),
    ("Python -> Python, 2 ch", python_to_python(2), ">= 1.0x QEMU->QEMU"),
    ("Python -> Python, 4 ch", python_to_python(4), ""),
    ("QEMU 7.2 -> Python, 2 ch", qemu_to_python, ">= 0.9x QEMU->QEMU"),
    ("Python -> QEMU 7.2, 2 ch", python_to_qemu, ">= 0.9x QEMU->QEMU"),
]
# Where a row's ratio to QEMU->QEMU must land, when it has a target.
RATIO_TARGETS: Final = {
    "Python -> Python, 2 ch": 1.0,
    "QEMU 7.2 -> Python, 2 ch": 0.9,
    "Python -> QEMU 7.2, 2 ch": 0.9,
}


def measure(setup: Setup, rows: list[Row], repeat: int) -> None:
    """Run every row ``repeat`` times, round-robin so a burst of load hits all rows alike.

    A row's time is the median of its runs; a failing run records its error, and the row
    is not run again.
    """
    funcs = {name: func for name, func, _ in ROWS}
    for attempt in range(1, repeat + 1):
        for row in rows:
            if row.error is None:
                print(f"  [{attempt}/{repeat}] {row.name} ...", file=sys.stderr, flush=True)
                run_once(funcs[row.name], setup, row)
    for row in rows:
        row.seconds = statistics.median(row.samples) if row.samples and not row.error else None


# -- report ---------------------------------------------------------------------------------


def _verdicts(row: Row, size: int, ratio_qemu: float | None) -> list[str]:
    verdicts = []
    wanted = RATIO_TARGETS.get(row.name)
    if wanted is not None and ratio_qemu is not None:
        verdicts.append(f"speed {'met' if ratio_qemu >= wanted else 'MISSED'}")
    if row.receiver_rss is not None:
        ok = row.receiver_rss <= size + RSS_SLACK
        verdicts.append(f"RSS {'met' if ok else 'MISSED'}")
    return verdicts


def table(rows: list[Row], size: int) -> tuple[str, list[dict[str, Any]]]:
    """The markdown table and the same data as JSON-ready dicts."""
    by_name = {row.name: row for row in rows}
    qemu, raw = mb_per_s(size, by_name.get(QEMU_QEMU)), mb_per_s(size, by_name.get(RAW))
    head = (
        f"| Row | MB/s | vs QEMU->QEMU | vs raw | seconds | {CPU_HEADER} "
        "| receiver peak RSS | target | result |"
    )
    lines = [head, f"|---|---:|---:|---:|---:|{CPU_ALIGN}|---:|---|---|"]
    records = []
    for row in rows:
        rate = mb_per_s(size, row)
        vs_qemu = rate / qemu if rate and qemu else None
        vs_raw = rate / raw if rate and raw else None
        rss = f"{row.receiver_rss / MIB:.0f} MiB" if row.receiver_rss else ""
        if row.receiver_rss:
            rss += f" (limit {(size + RSS_SLACK) / MIB:.0f})"
        result = f"error: {row.error}" if row.error else ", ".join(_verdicts(row, size, vs_qemu))
        cpu = cpu_text(row.source_cpu, row.destination_cpu, size)
        lines.append(
            f"| {row.name} | {fmt(rate, '.0f')} | {fmt(vs_qemu, '.2f', 'x')} | "
            f"{fmt(vs_raw, '.2f', 'x')} | {seconds_text(row)} | {cpu} | {rss} "
            f"| {row.target} "
            f"| {result.replace('|', '/')} |"
        )
        records.append(asdict(row) | {"mb_per_s": rate, "vs_qemu": vs_qemu, "vs_raw": vs_raw})
    return "\n".join(lines), records


def cli_startup(timeout: float) -> float | None:
    """Seconds for ``python -m multifd --help``: the fixed cost inside Python-sender rows."""
    start = time.time()
    done = subprocess.run(
        multifd_command("--help"), capture_output=True, timeout=timeout, check=False
    )
    return time.time() - start if done.returncode == 0 else None


def _own_peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def report(rows: list[Row], size: int, startup: float | None) -> tuple[str, dict[str, Any]]:
    """The full markdown report and the JSON document."""
    info = machine()
    body, records = table(rows, size)
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    notes = [f"- {row.name}: {'; '.join(row.notes)}" for row in rows if row.notes]
    floor = _own_peak_rss()
    notes.append(
        f"- receiver peak RSS = `wait4` ru_maxrss of `multifd receive`; Linux also charges the "
        f"spawning process's peak RSS ({floor / MIB:.0f} MiB here) to a vfork'd child, so "
        "readings at that floor are upper bounds"
    )
    start_note = f"{startup:.2f} s" if startup is not None else "unavailable"
    markdown = "\n".join([
        f"# Throughput, {size / MIB:.0f} MiB of random RAM over loopback ({today})",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        f"- `python -m multifd --help` start-up: {start_note} (not inside any row)",
        "- MB/s = 10^6 bytes/s, wall clock from source start to destination completion",
        PREALLOC_NOTE,
        "- seconds = median of the runs (min-max)",
        CPU_NOTE,
        "",
        body,
        "",
        *notes,
        "",
    ])  # fmt: skip
    data = {"when": today, "size": size, "machine": info, "cli_startup_s": startup}
    return markdown, data | {"rows": records}


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 even when rows failed: they are results)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=parse_size, default=None, help="RAM size (default 2G)")
    parser.add_argument("--quick", action="store_true", help="256 MiB, one run, fewer rows")
    parser.add_argument("--repeat", type=int, default=None, help="runs per row (default 3)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument(
        "--rows", nargs="+", metavar="TEXT", help="only the rows whose name contains a TEXT"
    )
    parser.add_argument("--raw-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--send-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--peer", default="native", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.send_worker is not None:
        send_worker(args.send_worker, args.channels, args.peer)
        return 0
    if args.raw_worker is not None:
        raw_worker(args.raw_worker, args.timeout)
        return 0
    size = args.size or (256 * MIB if args.quick else 2 << 30)
    if size <= 0 or size % mmap.PAGESIZE:
        parser.error("--size must be a positive multiple of the page size")
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(
        prefix="multifd-bench-", dir=shm if shm.is_dir() else None
    ) as tmp:
        setup = Setup(Path(tmp) / "source.ram", size, Path(tmp), timeout=60 + size / (50 * MIB))
        print(f"writing {size / MIB:.0f} MiB of random RAM ...", file=sys.stderr)
        write_ram_image(setup.image, size, seed=2024, pattern="random")
        startup = cli_startup(setup.timeout)
        rows = [Row(name, target=target) for name, _, target in ROWS]
        if args.quick:
            rows = [row for row in rows if row.name != "Python -> Python, 4 ch"]
        if args.rows:
            rows = [row for row in rows if any(part in row.name for part in args.rows)]
        measure(setup, rows, args.repeat or (1 if args.quick else 3))
    markdown, data = report(rows, size, startup)
    publish("throughput", markdown, data, save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
