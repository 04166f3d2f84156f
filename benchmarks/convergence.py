"""Convergence of live pre-copy under a write workload: passes, bytes, downtime.

Run from the repository root with the project's interpreter::

    .venv/bin/python benchmarks/convergence.py [--size 1G] [--quick]

Each case migrates a block over loopback TCP with 2 channels into a ``multifd receive``
process (RAM pre-allocated, as a QEMU destination with prealloc=on), while a writer thread
changes pages at a fixed rate, 80 % of them in a 64 MiB hot set. For each case: the passes,
the total time, the bytes sent over the RAM size, the downtime, and the ratio of the bytes
sent to the geometric-series model RAM x 1 / (1 - dirty rate / bandwidth), with the dirty
rate taken as the workload's write rate in bytes and the bandwidth as the first pass's.
A case that cannot converge (writes faster than a bandwidth cap) must end, by its timeout,
as failed with the reason. Results: results/convergence-<date>.md, .json and .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import multifd  # noqa: E402 - after the path set-up
from multifd.demo import DemoSettings, Workload, generate_block, read_listening_line  # noqa: E402
from multifd.dirty import DirtyLog  # noqa: E402
from multifd.migration.precopy import Hooks, Limits, TimeoutPolicy  # noqa: E402
from multifd.migration.throttle import AutoConverge  # noqa: E402
from multifd.wire.constants import PAGE_SIZE  # noqa: E402

RESULTS: Final = Path(__file__).resolve().parent / "results"
DOWNTIME_LIMIT: Final = 0.3
DOWNTIME_MARGIN: Final = 0.05  # loopback, this machine: the target is limit + margin
MODEL_TARGET: Final = 1.2


@dataclass(frozen=True)
class Case:
    name: str
    rate: float  # pages written per second
    max_bandwidth: float | None = None  # bytes per second
    timeout: float | None = None
    auto_converge: bool = False  # throttle the writer (QEMU's auto-converge defaults)


@dataclass
class Outcome:
    case: str
    rate: float
    status: str
    passes: int = 0
    seconds: float = 0.0
    sent_over_ram: float = 0.0
    downtime_ms: float = 0.0
    model_ratio: float | None = None
    equal: bool | None = None
    note: str = ""


def cases(quick: bool) -> list[Case]:
    rates = [0.0, 20_000.0] if quick else [0.0, 5_000.0, 20_000.0, 50_000.0]
    found = [Case(f"{rate:,.0f} pages/s", rate) for rate in rates]
    # Capped links, where the dirty rate is a real fraction of the bandwidth: several passes.
    found.append(Case("20,000 pages/s, 200 MB/s cap", 20_000.0, 200e6))
    if not quick:
        found.append(Case("50,000 pages/s, 400 MB/s cap", 50_000.0, 400e6))
    found.append(Case("100,000 pages/s, 100 MB/s cap", 100_000.0, 100e6, timeout=8.0))
    found.append(Case("100,000 pages/s, 100 MB/s cap, auto-converge", 100_000.0, 100e6,
                      timeout=120.0, auto_converge=True))  # fmt: skip
    return found


def run_case(case: Case, size: int, scratch: Path) -> Outcome:
    """One migration with the workload running; the destination is compared at the end."""
    block = generate_block(size, 0.3)
    out = scratch / "out"
    receiver = subprocess.Popen(
        [sys.executable, "-m", "multifd", "receive", "tcp:127.0.0.1:0", "--output", str(out),
         "--prealloc", f"mem={size}", "--json", "--io-timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=os.environ | {"PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    try:
        assert receiver.stderr is not None
        address = read_listening_line(receiver.stderr, 120)
        return _migrate(case, block, address, receiver, out)
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.communicate()
        block.close()
        for leftover in out.glob("*"):
            leftover.unlink()


def _migrate(case: Case, block: multifd.RamBlock, address: str,
             receiver: subprocess.Popen[bytes], out: Path) -> Outcome:  # fmt: skip
    log = DirtyLog(multifd.Ram([block]))
    workload = Workload(block, log, DemoSettings(size=block.size, rate=case.rate))
    limits = Limits(downtime_limit=DOWNTIME_LIMIT, max_bandwidth=case.max_bandwidth,
                    timeout=case.timeout, on_timeout=TimeoutPolicy.CANCEL,
                    auto_converge=AutoConverge() if case.auto_converge else None)  # fmt: skip
    outcome = Outcome(case.name, case.rate, "failed")
    workload.start()
    began = time.monotonic()
    try:
        hooks = Hooks(pause=workload.pause, throttle=workload.throttle)
        stats = multifd.send(address, log, limits=limits, hooks=hooks)
    except multifd.MigrationFailed as exc:
        workload.pause()
        outcome.seconds = time.monotonic() - began
        outcome.note = str(exc)[:300]
        return outcome
    finally:
        workload.pause()
    receiver.wait(120)
    outcome.status = stats.status.value
    outcome.passes = len(stats.passes)
    outcome.seconds = stats.total_time_ms / 1e3
    outcome.sent_over_ram = stats.transferred / block.size
    outcome.downtime_ms = stats.downtime_ms
    bandwidth = stats.passes[0].bandwidth
    dirty = case.rate * PAGE_SIZE
    if stats.cpu_throttle_percentage:  # the model knows no throttle
        outcome.note = f"writer held {stats.cpu_throttle_percentage} % of the time at the end"
    elif dirty < bandwidth:
        model = block.size / (1 - dirty / bandwidth)
        outcome.model_ratio = stats.transferred / model
    outcome.equal = _same(block, out / "mem")
    return outcome


def _same(block: multifd.RamBlock, path: Path) -> bool:
    with path.open("rb") as f:
        for start in range(0, block.size, 64 << 20):
            if f.read(64 << 20) != bytes(block.view[start : start + (64 << 20)]):
                return False
    return True


def table(outcomes: list[Outcome]) -> str:
    lines = [
        (
            "| workload | status | passes | seconds | sent / RAM | downtime ms | sent / model "
            "| destination = source | notes |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for o in outcomes:
        model = f"{o.model_ratio:.2f}" if o.model_ratio is not None else ""
        equal = "" if o.equal is None else ("yes" if o.equal else "NO")
        lines.append(
            f"| {o.case} | {o.status} | {o.passes} | {o.seconds:.2f} | {o.sent_over_ram:.2f} "
            f"| {o.downtime_ms:.0f} | {model} | {equal} | {o.note.replace('|', '/')} |"
        )
    return "\n".join(lines)


def verdicts(outcomes: list[Outcome]) -> list[str]:
    return [_verdict(o) for o in outcomes]


def _verdict(o: Outcome) -> str:
    if o.status != "completed":
        reason = "reason given" if "did not converge" in o.note else "no reason given"
        return f"- {o.case}: {o.status} ({reason})"
    bound = (DOWNTIME_LIMIT + DOWNTIME_MARGIN) * 1e3
    downtime = "<=" if o.downtime_ms <= bound else "EXCEEDS"
    text = f"- {o.case}: downtime {o.downtime_ms:.0f} ms {downtime} {bound:.0f} ms"
    if o.model_ratio is None:
        return text + "; no model"
    model = "<=" if o.model_ratio <= MODEL_TARGET else "EXCEEDS"
    return text + f"; sent/model {o.model_ratio:.2f} {model} {MODEL_TARGET}"


def plot(outcomes: list[Outcome], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    done = [o for o in outcomes if o.status == "completed"]
    figure, left = plt.subplots(figsize=(10, 5.5))
    names = [o.case.replace(", ", "\n").replace(" pages/s", "\npages/s") for o in done]
    left.bar(names, [o.sent_over_ram for o in done], color="tab:blue", alpha=0.6)
    left.set_ylabel("bytes sent / RAM", color="tab:blue")
    right = left.twinx()
    right.plot(names, [o.downtime_ms for o in done], color="tab:red", marker="o")
    right.axhline(DOWNTIME_LIMIT * 1e3, color="tab:red", linestyle="--", linewidth=1)
    right.set_ylabel("downtime (ms)", color="tab:red")
    right.set_ylim(bottom=0)
    left.set_title("live pre-copy under a write workload")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="1G", help="block size (default 1G)")
    parser.add_argument("--quick", action="store_true", help="256 MiB and fewer cases")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = "256M" if args.quick else args.size.upper()
    size = int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
    outcomes = []
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        for case in cases(args.quick):
            print(f"  {case.name} ...", file=sys.stderr, flush=True)
            outcomes.append(run_case(case, size, Path(tmp)))
    when = dt.datetime.now(dt.UTC)
    markdown = "\n".join([
        f"# Convergence, {size >> 20} MiB over loopback, 2 channels ({when:%Y-%m-%d %H:%M} UTC)",
        "",
        (
            f"- downtime limit {DOWNTIME_LIMIT * 1e3:.0f} ms; target downtime <= "
            f"{(DOWNTIME_LIMIT + DOWNTIME_MARGIN) * 1e3:.0f} ms, "
            f"bytes sent <= {MODEL_TARGET}x model"
        ),
        "- workload: 80 % of writes in a 64 MiB hot set; 30 % of pages start zero",
        "",
        table(outcomes),
        "",
        *verdicts(outcomes),
        "",
    ])  # fmt: skip
    print(markdown)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        base = RESULTS / f"convergence-{when:%Y-%m-%d}"
        base.with_suffix(".md").write_text(markdown)
        base.with_suffix(".json").write_text(
            json.dumps([asdict(o) for o in outcomes], indent=2) + "\n"
        )
        plot(outcomes, base.with_suffix(".png"))
        print(f"saved {base}.md, .json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
