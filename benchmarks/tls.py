"""TLS throughput: Python -> Python over loopback with 1, 2 and 4 channels, TLS vs plain TCP.

Run from the repository root with the project's interpreter::

    .venv/bin/python benchmarks/tls.py [--size 512M] [--repeat 3] [--quick] [--no-save]

One TLS stream is CPU-bound (encryption on one core, decryption on another); channels run
their TLS sessions on their own threads, which release the GIL inside OpenSSL, so TLS is
where extra channels should pay off most. Every row moves the same image of random pages
(nothing is skipped as a zero page) and is timed as in ``throughput.py``: from the moment
an idle, started send worker is told to call ``multifd.send()`` to the moment
``multifd receive`` (pre-allocated with ``--prealloc``) prints ``completed``. Certificates
(EC P-256, TLS 1.3, mutual authentication) are made with ``openssl`` for the run.

Rows are run round-robin, ``--repeat`` times each; the table shows medians, TLS over plain
for each channel count, and each TLS row over TLS with 1 channel. Results go to
results/tls-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import mmap
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

# Run as a script, this directory is on sys.path (for harness and cpu); the tests' helpers
# need the repository root too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu import report_cpu
from harness import (
    MIB,
    PREALLOC_NOTE,
    Row,
    Setup,
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
from tests.interop.qemu import BLOCK_NAME, write_ram_image
from tests.tls.pki import Pki, make_pki

import multifd

CHANNELS: Final = (1, 2, 4)


def _row_name(channels: int, tls: bool) -> str:
    return f"{'TLS' if tls else 'plain'}, {channels} ch"


def python_to_python(channels: int, pki: Pki | None) -> Callable[[Setup, Row], None]:
    """`multifd.send()` into `multifd receive`, with ``channels`` channels, TLS if ``pki``."""

    def run(setup: Setup, row: Row) -> None:
        flags = pki.dest.cli_args() if pki is not None else []
        with receiver_process(setup, channels, extra_args=flags) as (receiver, uri, output):
            args = ["--send-worker", str(setup.image), "--channels", str(channels)]
            args += ["--pki", str(pki.folder)] if pki is not None else []
            start = run_send_worker(__file__, args, uri, setup.timeout, row=row)
            finish_receive(setup, row, receiver, output, start)

    return run


def send_worker(image: Path, channels: int, pki: Path | None) -> None:
    """``--send-worker``: map the image, say ready, send to the URI read from stdin."""
    ram = multifd.Ram([multifd.RamBlock.from_file(BLOCK_NAME, image)])
    tls = Pki(pki).source if pki is not None else None
    if tls is not None:
        _ = tls.client_context  # loaded before the clock starts, like the image
    print("ready", flush=True)
    uri = sys.stdin.readline().strip()
    report_cpu(lambda: multifd.send(uri, ram, channels=channels, tls=tls))


def measure(setup: Setup, rows: list[Row], runs: dict[str, Callable[[Setup, Row], None]],
            repeat: int) -> None:  # fmt: skip
    """Every row ``repeat`` times, round-robin; a row's time is the median of its runs."""
    for attempt in range(1, repeat + 1):
        for row in rows:
            if row.error is None:
                print(f"  [{attempt}/{repeat}] {row.name} ...", file=sys.stderr, flush=True)
                run_once(runs[row.name], setup, row)
    for row in rows:
        row.seconds = statistics.median(row.samples) if row.samples and not row.error else None


HEADER: Final = (
    "| channels | plain MB/s | TLS MB/s | TLS / plain | TLS vs TLS 1 ch | plain seconds "
    "| TLS seconds | errors |\n|---:|---:|---:|---:|---:|---:|---:|---|"
)


def table(rows: list[Row], size: int) -> tuple[str, list[dict[str, Any]]]:
    """One line per channel count: plain and TLS side by side, and the ratios."""
    by_name = {row.name: row for row in rows}
    tls_one = mb_per_s(size, by_name.get(_row_name(1, tls=True)))
    lines, records = [HEADER], []
    for channels in CHANNELS:
        plain_row = by_name.get(_row_name(channels, tls=False))
        tls_row = by_name.get(_row_name(channels, tls=True))
        pair = [row for row in (plain_row, tls_row) if row is not None]
        if not pair:
            continue
        plain, tls = mb_per_s(size, plain_row), mb_per_s(size, tls_row)
        ratio = tls / plain if tls and plain else None
        speedup = tls / tls_one if tls and tls_one else None
        errors = "; ".join(row.error for row in pair if row.error)
        seconds = [seconds_text(row) if row else "" for row in (plain_row, tls_row)]
        lines.append(
            f"| {channels} | {fmt(plain, '.0f')} | {fmt(tls, '.0f')} | "
            f"{fmt(ratio, '.2f', 'x')} | {fmt(speedup, '.2f', 'x')} | {seconds[0]} | "
            f"{seconds[1]} | {errors.replace('|', '/')} |"
        )
        records.append({
            "channels": channels, "plain_mb_per_s": plain, "tls_mb_per_s": tls,
            "tls_over_plain": ratio, "tls_over_tls_1ch": speedup,
            "rows": [asdict(row) for row in pair],
        })  # fmt: skip
    return "\n".join(lines), records


def report(rows: list[Row], size: int, repeat: int) -> tuple[str, dict[str, Any]]:
    """The markdown report and the JSON document."""
    info = machine()
    body, records = table(rows, size)
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    markdown = "\n".join([
        f"# TLS throughput, {size / MIB:.0f} MiB of random RAM over loopback ({today})",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "- Python -> Python (`multifd.send()` worker into `multifd receive`), native profile",
        "- TLS 1.3, mutual authentication, EC P-256 certificates; one TLS session per channel",
        "- MB/s = 10^6 bytes/s, wall clock from source start to destination completion",
        PREALLOC_NOTE,
        f"- seconds = median of {repeat} runs (min-max)",
        "",
        body,
        "",
    ])  # fmt: skip
    return markdown, {"when": today, "size": size, "repeat": repeat, "machine": info,
                      "rows": records}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 even when rows failed: they are results)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=parse_size, default=None, help="RAM size (default 512M)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per row (default 3)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, one run")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--send-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.send_worker is not None:
        send_worker(args.send_worker, args.channels, args.pki)
        return 0
    size = args.size or (64 * MIB if args.quick else 512 * MIB)
    repeat = args.repeat or (1 if args.quick else 3)
    if size <= 0 or size % mmap.PAGESIZE:
        parser.error("--size must be a positive multiple of the page size")
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(
        prefix="multifd-tls-bench-", dir=shm if shm.is_dir() else None
    ) as tmp:
        setup = Setup(Path(tmp) / "source.ram", size, Path(tmp), timeout=60 + size / (20 * MIB))
        pki_folder = Path(tmp) / "pki"
        pki_folder.mkdir()
        pki = make_pki(pki_folder)
        print(f"writing {size / MIB:.0f} MiB of random RAM ...", file=sys.stderr)
        write_ram_image(setup.image, size, seed=2024, pattern="random")
        runs = {
            _row_name(channels, tls): python_to_python(channels, pki if tls else None)
            for channels in CHANNELS
            for tls in (False, True)
        }
        rows = [Row(name) for name in runs]
        measure(setup, rows, runs, repeat)
    markdown, data = report(rows, size, repeat)
    publish("tls", markdown, data, save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
