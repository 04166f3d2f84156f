"""Mixed RAM (half zero pages, half random) with and without zstd: ours against QEMU 10.0.

Run from the repository root with the project's interpreter::

    .venv/bin/python benchmarks/mixed.py [--size 2G] [--repeat 3] [--rows TEXT ...] [--pin]

The image is 2 GiB where exactly half the pages (chosen at random, per 16 MiB slice) are
zero and the rest random. Every row moves it with multifd, ``none`` or ``zstd`` (level 1,
QEMU's default), timed exactly as in ``throughput.py`` (whose docstring says how): a QEMU
source starts at QMP ``migrate``, a Python source is an idle worker process told to call
``multifd.send()``; destinations pre-allocate before the clock. The QEMU rows run the
QEMU 10.0 of ``scripts/qemu10.sh`` with its defaults (``zero-page-detection=multifd``),
only ``max-bandwidth`` lifted; Python sources use the native profile (zero pages in the
multifd packets' zero list, as QEMU 10 does), or ``qemu-10.0`` towards a QEMU destination
(the Python -> QEMU rows show the send side alone against QEMU's, not judged).

In the same run a worker process (``in_process.py``) measures, best of 3 each:
``numpy.copyto`` of a hot
1 GiB buffer (memcpy bandwidth) and :func:`multifd.ram.zero_pages` over the image's
``RamBlock.words`` (zero-page scan bandwidth), plus the scan of an all-zero block of the
same size (the worst case: every page read in full); and zstd compression of the pages
with data of the image's first 512 MiB, on 1 and on 2 threads, the way send threads
compress but without sockets (does the GIL serialize compression?).

Targets (issue 4): ours >= 1.0x QEMU->QEMU for each method; scan >= 0.5x memcpy; zstd
with 2 channels >= 1.5x one channel. Results: results/mixed-<date>.md and .json.

``--pin`` runs every source on CPU 0 and every destination on CPU 1 (two one-core machines)
instead of letting both ends share the machine; results: results/mixed-pinned-<date>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

# Run as a script, this directory is on sys.path (for harness and cpu); the tests' helpers
# need the repository root too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu import CPU_ALIGN, CPU_HEADER, CPU_NOTE, CpuSpan, cpu_text, report_cpu
from harness import (
    FAST,
    MIB,
    PREALLOC_NOTE,
    REPO,
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
    verdict,
)
from in_process import ZSTD_LEVEL, measure_scan, scan_lines
from tests.interop.qemu import BLOCK_NAME, PAGE_SIZE, QEMU_BINARY, QemuVm

import multifd

CHUNK: Final = 16 * MIB  # the image is written, and half-zeroed, in slices this large
SPEEDUP_TARGET: Final = 1.5  # zstd 2 ch over 1 ch
SPEED_TARGET: Final = 1.0  # ours over QEMU->QEMU, same method
QEMU10: Final = "QEMU 10.0"
# With --pin, each end of a migration runs on a core of its own (two one-core machines).
PIN_CPUS: Final = {"source": 0, "destination": 1}
_pinned: dict[str, int] = {}  # PIN_CPUS with --pin, empty without


@dataclass(frozen=True)
class Spec:
    """One row: what runs, with which method, and whether it is measured against QEMU."""

    name: str
    method: str
    run: Callable[[Setup, Row], None]
    reference: bool = False  # the QEMU->QEMU row of its method
    judged: bool = False  # held to SPEED_TARGET x the reference


def qemu10_binary() -> str:
    """The QEMU 10 wrapper of ``scripts/qemu10.sh`` (``$QEMU10_PREFIX`` as the tests use)."""
    prefix = Path(os.environ.get("QEMU10_PREFIX") or REPO / ".cache" / "qemu10")
    return str(prefix / "bin" / QEMU_BINARY)


def _pin(pid: int, end: str) -> None:
    """With --pin, bind every thread of process ``pid`` to the core of ``end``.

    Called while the process idles, before the clock starts: the threads it starts later
    (the migration's) inherit the binding from the thread that starts them.
    """
    cpu = _pinned.get(end)
    if cpu is None:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


# -- rows -----------------------------------------------------------------------------------
def qemu_to_qemu(method: str, channels: int = 2) -> Callable[[Setup, Row], None]:
    """QEMU 10 source into a pre-allocated QEMU 10 destination."""

    def run(setup: Setup, row: Row) -> None:
        with (
            _source_vm(setup, method, channels) as source,
            _destination_vm(setup, method, channels) as destination,
        ):
            uri = destination.listen()
            cpu = CpuSpan(source.pid), CpuSpan(destination.pid)
            start = time.time()
            source.migrate(uri)
            done = destination.wait_for_status("completed", setup.timeout)
            row.seconds = (done.event_time or time.time()) - start
            info = source.wait_for_status("completed", setup.timeout).info
            row.add_cpu(source=cpu[0].stop(), destination=cpu[1].stop())
            ram = info.get("ram", {})
            row.notes.append(
                f"source total-time {info.get('total-time')} ms, "
                f"zero pages {ram.get('duplicate')}, normal pages {ram.get('normal')}"
            )
            check_same(setup.image, destination.ram_path)

    return run


def python_to_python(channels: int, method: str) -> Callable[[Setup, Row], None]:
    """`multifd.send()` (native profile) into `multifd receive`."""

    def run(setup: Setup, row: Row) -> None:
        with receiver_process(setup, channels, method) as (receiver, uri, output):
            _pin(receiver.pid, "destination")
            start = _send(setup, uri, channels, method, row)
            finish_receive(setup, row, receiver, output, start)

    return run


def qemu_to_python(method: str) -> Callable[[Setup, Row], None]:
    """QEMU 10 source into `multifd receive`, 2 channels."""

    def run(setup: Setup, row: Row) -> None:
        with (
            receiver_process(setup, 2, method) as (receiver, uri, output),
            _source_vm(setup, method) as source,
        ):
            _pin(receiver.pid, "destination")
            cpu = CpuSpan(source.pid)
            start = time.time()
            source.migrate(uri)
            finish_receive(setup, row, receiver, output, start)
            source.wait_for_status("completed", setup.timeout)
            row.add_cpu(source=cpu.stop())

    return run


def python_to_qemu(method: str) -> Callable[[Setup, Row], None]:
    """`multifd.send(peer="qemu-10.0")` into a pre-allocated QEMU 10 destination, 2 channels:
    the send side alone against QEMU's (its destination is QEMU->QEMU's)."""

    def run(setup: Setup, row: Row) -> None:
        with _destination_vm(setup, method) as destination:
            uri = destination.listen()
            cpu = CpuSpan(destination.pid)
            start = _send(setup, uri, 2, method, row, peer="qemu-10.0")
            done = destination.wait_for_status("completed", setup.timeout)
            row.seconds = (done.event_time or time.time()) - start
            row.add_cpu(destination=cpu.stop())
            check_same(setup.image, destination.ram_path)

    return run


QEMU_ZSTD_1CH: Final = f"{QEMU10} -> {QEMU10}, 1 ch, zstd"


def _specs() -> list[Spec]:
    specs = []
    for method in ("none", "zstd"):
        specs += [
            Spec(f"{QEMU10} -> {QEMU10}, 2 ch, {method}", method, qemu_to_qemu(method), True),
            Spec(f"Python -> Python, 2 ch, {method}", method, python_to_python(2, method),
                 judged=True),
            Spec(f"{QEMU10} -> Python, 2 ch, {method}", method, qemu_to_python(method),
                 judged=True),
            Spec(f"Python -> {QEMU10}, 2 ch, {method}", method, python_to_qemu(method)),
        ]  # fmt: skip
    specs.append(Spec("Python -> Python, 1 ch, zstd", "zstd", python_to_python(1, "zstd")))
    # QEMU's own scaling from 1 to 2 channels on this machine, beside ours.
    specs.append(Spec(QEMU_ZSTD_1CH, "zstd", qemu_to_qemu("zstd", channels=1)))
    return specs


SPECS: Final = _specs()
ZSTD_2CH: Final = "Python -> Python, 2 ch, zstd"
ZSTD_1CH: Final = "Python -> Python, 1 ch, zstd"
QEMU_ZSTD_2CH: Final = f"{QEMU10} -> {QEMU10}, 2 ch, zstd"


# -- row plumbing ---------------------------------------------------------------------------
def _level(method: str) -> int | None:
    return ZSTD_LEVEL if method == "zstd" else None


@contextlib.contextmanager
def _source_vm(setup: Setup, method: str, channels: int = 2) -> Iterator[QemuVm]:
    with QemuVm(
        setup.size, ram_file=setup.image, name="src", binary=qemu10_binary(),
        scratch_parent=setup.scratch, timeout=setup.timeout,
    ) as source:  # fmt: skip
        # QEMU 10 keeps the 128 MiB/s max-bandwidth default: lift it, as throughput.py does.
        source.configure(channels, max_bandwidth=FAST, compression=method, level=_level(method))
        _pin(source.pid, "source")
        yield source


@contextlib.contextmanager
def _destination_vm(setup: Setup, method: str, channels: int = 2) -> Iterator[QemuVm]:
    with QemuVm(
        setup.size, name="dst", incoming=True, prealloc=True, binary=qemu10_binary(),
        scratch_parent=setup.scratch, timeout=setup.timeout,
    ) as destination:  # fmt: skip
        destination.configure(channels, compression=method)
        _pin(destination.pid, "destination")
        yield destination


def _send(
    setup: Setup, uri: str, channels: int, method: str, row: Row, *, peer: str = "native"
) -> float:
    """Run ``multifd.send()`` in a started, idle worker process; returns the start time."""
    args = ["--send-worker", str(setup.image), "--channels", str(channels), "--method", method]
    return run_send_worker(
        __file__, [*args, "--peer", peer], uri, setup.timeout,
        on_ready=lambda pid: _pin(pid, "source"), row=row,
    )  # fmt: skip


def send_worker(image: Path, channels: int, method: str, peer: str) -> None:
    """``--send-worker``: map the image, say ready, send to the URI read from stdin."""
    ram = multifd.Ram([multifd.RamBlock.from_file(BLOCK_NAME, image)])
    print("ready", flush=True)
    uri = sys.stdin.readline().strip()
    report_cpu(
        lambda: multifd.send(
            uri, ram, channels=channels, peer=peer, compression=method, level=_level(method)
        )
    )


# -- the image and the scan -----------------------------------------------------------------
def write_half_zero_image(path: Path, size: int, *, seed: int) -> int:
    """Write ``size`` bytes where half the pages of every slice are zero, half random.

    Returns:
        The number of zero pages written.
    """
    rng = np.random.default_rng(seed)
    zeros = 0
    with path.open("wb") as out:
        for start in range(0, size, CHUNK):
            length = min(CHUNK, size - start)
            pages = np.frombuffer(rng.bytes(length), dtype=np.uint8).reshape(-1, PAGE_SIZE)
            pages = pages.copy()
            chosen = rng.permutation(len(pages))[: len(pages) // 2]
            pages[chosen] = 0
            zeros += len(chosen)
            out.write(pages.data)
    return zeros


def measure(setup: Setup, rows: list[Row], repeat: int) -> None:
    """Every row ``repeat`` times, round-robin; a row's time is its median, as throughput.py."""
    funcs = {spec.name: spec.run for spec in SPECS}
    for attempt in range(1, repeat + 1):
        for row in rows:
            if row.error is None:
                print(f"  [{attempt}/{repeat}] {row.name} ...", file=sys.stderr, flush=True)
                run_once(funcs[row.name], setup, row)
    for row in rows:
        row.seconds = statistics.median(row.samples) if row.samples and not row.error else None


# -- report ---------------------------------------------------------------------------------
def table(rows: list[Row], size: int) -> tuple[str, list[dict[str, Any]], list[str]]:
    """The rows' markdown table, their JSON records, and the speed target lines."""
    by_name = {row.name: row for row in rows}
    specs = {spec.name: spec for spec in SPECS}
    refs = {s.method: mb_per_s(size, by_name.get(s.name)) for s in SPECS if s.reference}
    lines = [
        (
            "| Row | MB/s | vs QEMU->QEMU (same method) | seconds | "
            f"{CPU_HEADER} | receiver peak RSS | result |"
        ),
        f"|---|---:|---:|---:|{CPU_ALIGN}|---:|---|",
    ]
    records, targets = [], []
    for row in rows:
        spec = specs[row.name]
        rate, ref = mb_per_s(size, row), refs.get(spec.method)
        ratio = rate / ref if rate and ref else None
        result = f"error: {row.error}" if row.error else ""
        if spec.judged:
            judged = verdict(ratio, SPEED_TARGET)
            result = result or f"speed {judged}"
            targets.append(
                f"| {row.name} >= {SPEED_TARGET:.1f}x QEMU->QEMU | "
                f"{fmt(ratio, '.2f', 'x')} | {judged} |"
            )
        rss = f"{row.receiver_rss / MIB:.0f} MiB" if row.receiver_rss else ""
        cpu = cpu_text(row.source_cpu, row.destination_cpu, size)
        lines.append(
            f"| {row.name} | {fmt(rate, '.0f')} | {fmt(ratio, '.2f', 'x')} | "
            f"{seconds_text(row)} | {cpu} | {rss} | {result.replace('|', '/')} |"
        )
        records.append(asdict(row) | {"method": spec.method, "mb_per_s": rate, "vs_qemu": ratio})
    one, two = mb_per_s(size, by_name.get(ZSTD_1CH)), mb_per_s(size, by_name.get(ZSTD_2CH))
    speedup = two / one if one and two else None
    targets.append(
        f"| zstd 2 ch / 1 ch (Python -> Python) >= {SPEEDUP_TARGET:.1f}x | "
        f"{fmt(speedup, '.2f', 'x')} | {verdict(speedup, SPEEDUP_TARGET)} |"
    )
    one, two = (
        mb_per_s(size, by_name.get(QEMU_ZSTD_1CH)),
        mb_per_s(size, by_name.get(QEMU_ZSTD_2CH)),
    )
    qemu_speedup = two / one if one and two else None
    targets.append(
        f"| for reference, QEMU 10.0 zstd 2 ch / 1 ch (same machine) | "
        f"{fmt(qemu_speedup, '.2f', 'x')} | |"
    )
    return "\n".join(lines), records, targets


def report(
    rows: list[Row], size: int, scan: dict[str, Any], zeros: int
) -> tuple[str, dict[str, Any]]:
    """The full markdown report and the JSON document."""
    info = machine()
    version = subprocess.run(
        [qemu10_binary(), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.splitlines()
    info["qemu"] = version[0] if version else "not found"
    body, records, targets = table(rows, size)
    scan_text, scan_targets = scan_lines(scan, zeros)
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    notes = [f"- {row.name}: {'; '.join(row.notes)}" for row in rows if row.notes]
    markdown = "\n".join([
        (f"# Mixed RAM, {size / MIB:.0f} MiB, 50 % zero pages + 50 % random, over loopback "
        f"({today})"),
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        (f"- methods: none and zstd level {ZSTD_LEVEL}; QEMU rows: QEMU 10.0 defaults "
        "(zero-page-detection=multifd), max-bandwidth lifted; Python sources: native profile"),
        ("- MB/s = RAM size / seconds (10^6 bytes/s), wall clock from source start to "
        "destination completion"),
        (f"- each end pinned to a core of its own (sources on CPU {PIN_CPUS['source']}, "
        f"destinations on CPU {PIN_CPUS['destination']}): two one-core machines"
        if _pinned else "- both ends share all the machine's cores"),
        PREALLOC_NOTE,
        "- seconds = median of the runs (min-max)",
        CPU_NOTE,
        "",
        body,
        "",
        "## In one process: zero-page scan against memcpy, zstd on 1 and 2 threads (same run)",
        "",
        *scan_text,
        "",
        "## Targets (issue 4)",
        "",
        "| Target | measured | result |",
        "|---|---:|---|",
        *targets,
        *scan_targets,
        "",
        *notes,
        "",
    ])  # fmt: skip
    data = {"when": today, "size": size, "zero_pages": zeros, "machine": info, "scan": scan}
    return markdown, data | {"rows": records}


# -- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 even when rows failed: they are results)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=parse_size, default=2 << 30, help="RAM size (2G)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (default 3)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument(
        "--rows", nargs="+", metavar="TEXT", help="only the rows whose name contains a TEXT"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run each end on a core of its own: sources on CPU 0, destinations on CPU 1",
    )
    parser.add_argument("--send-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--peer", default="native", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.send_worker is not None:
        send_worker(args.send_worker, args.channels, args.method, args.peer)
        return 0
    if args.size <= 0 or args.size % CHUNK:
        parser.error(f"--size must be a positive multiple of {CHUNK // MIB} MiB")
    if args.pin:
        if not set(PIN_CPUS.values()) <= os.sched_getaffinity(0):
            parser.error(f"--pin needs CPUs {sorted(PIN_CPUS.values())}")
        _pinned.update(PIN_CPUS)
    if not os.access(qemu10_binary(), os.X_OK):
        parser.error(f"no QEMU 10 at {qemu10_binary()}: run scripts/qemu10.sh")
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(
        prefix="multifd-mixed-", dir=shm if shm.is_dir() else None
    ) as tmp:
        size = args.size
        setup = Setup(Path(tmp) / "source.ram", size, Path(tmp), timeout=60 + size / (50 * MIB))
        print(f"writing {size / MIB:.0f} MiB, half zero pages ...", file=sys.stderr)
        zeros = write_half_zero_image(setup.image, size, seed=2025)
        print("  scan and memcpy ...", file=sys.stderr, flush=True)
        scan = measure_scan(setup)
        rows = [Row(spec.name) for spec in SPECS]
        if args.rows:
            rows = [row for row in rows if any(part in row.name for part in args.rows)]
        measure(setup, rows, args.repeat)
    markdown, data = report(rows, size, scan, zeros)
    publish("mixed-pinned" if args.pin else "mixed", markdown, data, save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
