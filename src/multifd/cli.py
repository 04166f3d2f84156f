"""The ``multifd`` command: a thin layer over :mod:`multifd.api`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from multifd import api, cli_vm
from multifd.cli_tls import tls_config, tls_options
from multifd.console import (
    JsonLines,
    LiveView,
    describe_pass,
    err,
    fail,
    print_listening,
    print_refused,
    print_stats,
    receive_progress,
)
from multifd.dirty import ShadowTracker
from multifd.errors import MigrationCancelled, MultifdError
from multifd.migration.limits import ReceiveLimits
from multifd.migration.precopy import Limits, StaticTracker, TimeoutPolicy, Tracker
from multifd.migration.stats import MigrationStats
from multifd.migration.throttle import AutoConverge
from multifd.pausing import process_hooks
from multifd.ram import Ram
from multifd.wire.compat import PROFILES

DOWNTIME_LIMIT = click.option(
    "--downtime-limit",
    type=click.FloatRange(min=0.001),
    default=300.0,
    show_default=True,
    help="Milliseconds the switchover may take (QEMU's downtime-limit default).",
)


def _channels_option() -> Callable[[Callable[..., None]], Callable[..., None]]:
    return click.option(
        "--channels",
        type=click.IntRange(0, api.MAX_CHANNELS),
        default=api.DEFAULT_CHANNELS,
        show_default=True,
        help="Multifd channels (0: every page on the main channel).",
    )


def _common(func: Callable[..., None]) -> Callable[..., None]:
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the final statistics as one JSON object on stdout.",
    )(func)
    func = click.option(
        "--json-progress",
        is_flag=True,
        help="Print the statistics as a JSON line on stdout every half second while the "
        "migration runs, and the final ones (as --json prints them) last.",
    )(func)
    func = click.option(
        "--uuid",
        default=None,
        help="UUID of every multifd channel (receive: another UUID fails the migration).",
    )(func)
    func = click.option(
        "--compression",
        type=click.Choice(["none", "zlib", "zstd"]),
        default="none",
        show_default=True,
    )(func)
    func = click.option(
        "--io-timeout",
        type=click.FloatRange(min=0.1),
        default=30.0,
        show_default=True,
        help="Seconds a channel may stall.",
    )(func)
    return _channels_option()(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="multifd")
@click.option("-v", "--verbose", is_flag=True, help="Log each channel's progress on stderr.")
def main(verbose: bool) -> None:
    """Live memory migration, wire-compatible with QEMU multifd."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


@main.command()
@click.argument("address")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder where each received block is written as a file.",
)
@click.option(
    "--prealloc",
    multiple=True,
    metavar="NAME=SIZE",
    help="Allocate and pre-fault this block before listening (as QEMU's prealloc=on); "
    "the source must then announce exactly these blocks.",
)
@click.option(
    "--max-ram",
    default=None,
    metavar="SIZE",
    help="Most RAM the source may announce, e.g. 64G (default: this machine's memory).",
)
@tls_options("tls", "source", hostname=False)
@_common
def receive(
    address: str,
    output: Path | None,
    prealloc: tuple[str, ...],
    max_ram: str | None,
    channels: int,
    uuid: str | None,
    compression: str,
    io_timeout: float,
    as_json: bool,
    json_progress: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
) -> None:
    """Listen at ADDRESS (tcp:HOST:PORT or unix:PATH) and receive one migration."""

    tls = tls_config("tls", tls_cert, tls_key, tls_ca)
    try:
        limits = ReceiveLimits(max_ram=_parse_size(max_ram, "--max-ram")) if max_ram else None
        with receive_progress(as_json=as_json, json_progress=json_progress) as progress:
            result = api.receive(
                address,
                channels=channels,
                output=output,
                uuid=uuid,
                compression=compression,
                io_timeout=io_timeout,
                limits=limits,
                tls=tls,
                on_listening=print_listening,
                on_refused=print_refused,
                progress=progress,
                prealloc=dict(_split_prealloc(spec) for spec in prealloc),
            )
    except MultifdError as exc:
        fail(exc)
    try:
        print_stats(err, result.stats, as_json=as_json or json_progress)
    finally:
        result.ram.close()


@main.command()
@click.argument("address")
@click.option(
    "--block",
    "blocks",
    multiple=True,
    required=True,
    metavar="NAME=FILE",
    help="A RAM block to send: its name and a file (size a multiple of 4096).",
)
@click.option(
    "--peer",
    type=click.Choice(sorted(PROFILES)),
    default="native",
    show_default=True,
    help="The destination's QEMU behaviour.",
)
@click.option("--level", type=int, default=None, help="Compression level.")
@click.option(
    "--live", is_flag=True, help="The files are written while they move: pre-copy passes."
)
@click.option(
    "--pause-pid",
    type=int,
    default=None,
    metavar="PID",
    help="Stop this writer process (SIGSTOP) at switchover; SIGCONT on failure.",
)
@click.option(
    "--resume-source", is_flag=True, help="Continue the --pause-pid process after success too."
)
@click.option(
    "--return-path/--no-return-path",
    default=True,
    show_default=True,
    help="Complete only once the destination reports success on QEMU's return path "
    "(within --io-timeout after the last byte).",
)
@DOWNTIME_LIMIT
@click.option(
    "--max-bandwidth", default=None, metavar="BYTES", help="Bytes per second at most, e.g. 100M."
)
@click.option("--max-passes", type=click.IntRange(min=1), default=None)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.001),
    default=None,
    help="Seconds to converge before --on-timeout applies.",
)
@click.option(
    "--on-timeout",
    type=click.Choice(["cancel", "force"]),
    default="cancel",
    show_default=True,
    help="cancel: fail, the source keeps running; force: switch over anyway.",
)
@click.option(
    "--auto-converge",
    is_flag=True,
    help="Slow --pause-pid down (stopped a growing share of the time, from 20 % up to "
    "99 %) while it dirties memory faster than it moves, as QEMU's auto-converge.",
)
@tls_options("tls", "destination", hostname=True)
@_common
def send(
    address: str,
    blocks: tuple[str, ...],
    peer: str,
    level: int | None,
    live: bool,
    pause_pid: int | None,
    resume_source: bool,
    return_path: bool,
    downtime_limit: float,
    max_bandwidth: str | None,
    max_passes: int | None,
    tls_hostname: str | None,
    timeout: float | None,
    on_timeout: str,
    auto_converge: bool,
    channels: int,
    uuid: str | None,
    compression: str,
    io_timeout: float,
    as_json: bool,
    json_progress: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
) -> None:
    """Send files as RAM blocks to the destination at ADDRESS.

    With --live the files may be written by other processes while they move: passes
    repeat until what is left fits the downtime limit, then --pause-pid is stopped
    (SIGSTOP) for the last pages, as QEMU stops a VM's CPUs.
    """
    if pause_pid is not None and not live:
        raise click.UsageError("--pause-pid needs --live")
    if auto_converge and pause_pid is None:
        raise click.UsageError("--auto-converge needs --pause-pid (the process to slow down)")
    tls = tls_config("tls", tls_cert, tls_key, tls_ca, tls_hostname)
    try:
        limits = Limits(
            downtime_limit=downtime_limit / 1e3,
            max_bandwidth=_parse_size(max_bandwidth, "--max-bandwidth") if max_bandwidth else None,
            max_passes=max_passes,
            timeout=timeout,
            on_timeout=TimeoutPolicy(on_timeout),
            auto_converge=AutoConverge() if auto_converge else None,
        )
        ram = api.as_ram(dict(_split_block(spec) for spec in blocks))
        hooks = (
            process_hooks(pause_pid, resume_after_success=resume_source)
            if pause_pid is not None
            else None
        )
        stats = _run_send(address, ram, live=live, as_json=as_json,
                          json_progress=json_progress, limits=limits, hooks=hooks,
                          channels=channels, peer=peer, uuid=uuid, compression=compression,
                          level=level, io_timeout=io_timeout, tls=tls,
                          return_path=return_path)  # fmt: skip
    except MigrationCancelled:
        err.print("multifd: cancelled", markup=False)
        sys.exit(130)
    except MultifdError as exc:
        fail(exc)
    print_stats(err, stats, as_json=as_json or json_progress)


def _run_send(
    address: str, ram: Ram, *, live: bool, as_json: bool, json_progress: bool, **options: Any
) -> MigrationStats:
    tracker: Tracker = ShadowTracker(ram) if live else StaticTracker(ram)
    show = err.is_terminal and not as_json and not json_progress
    try:
        if not show:
            on_pass = (lambda r: err.print(describe_pass(r), markup=False)) if live else None
            progress = JsonLines() if json_progress else None
            return api.send(address, tracker, on_pass=on_pass, progress=progress, **options)
        with LiveView(err, ram.total_size) as view:
            return api.send(address, tracker, on_pass=view.on_pass, progress=view.update,
                            **options)  # fmt: skip
    finally:
        if isinstance(tracker, ShadowTracker):
            tracker.close()
        ram.close()


def _split_prealloc(spec: str) -> tuple[str, int]:
    name, sep, size = spec.partition("=")
    if not sep or not name or not size:
        raise click.BadParameter(f"expected NAME=SIZE, got {spec!r}", param_hint="--prealloc")
    return name, _parse_size(size, "--prealloc")


def _split_block(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"expected NAME=FILE, got {spec!r}", param_hint="--block")
    return name, path


@main.command()
@click.option("--size", default="1G", show_default=True, help="Block size (K, M, G suffixes).")
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=20_000.0,
    show_default=True,
    help="Pages written per second while the block migrates (0: static).",
)
@click.option(
    "--hot-set",
    default="64M",
    show_default=True,
    help="Size of the region that takes most of the writes.",
)
@click.option("--hot-fraction", type=click.FloatRange(0, 1), default=0.8, show_default=True)
@click.option("--zero-fraction", type=click.FloatRange(0, 1), default=0.3, show_default=True)
@DOWNTIME_LIMIT
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Folder for report.json and passes.png.",
)
@click.option(
    "--max-bandwidth", default=None, metavar="BYTES", help="Bytes per second at most, e.g. 200M."
)
@click.option(
    "--auto-converge",
    is_flag=True,
    help="Hold the workload a growing share of the time while it outruns the migration.",
)
@_channels_option()
def demo(
    size: str,
    rate: float,
    hot_set: str,
    hot_fraction: float,
    zero_fraction: float,
    downtime_limit: float,
    out: Path,
    channels: int,
    max_bandwidth: str | None,
    auto_converge: bool,
) -> None:
    """Migrate a block that is being written, over loopback TCP, and compare both sides.

    A write rate the link cannot keep up with (--rate 400000 --max-bandwidth 200M, say)
    does not converge; --auto-converge then holds the workload until it does.
    """
    from multifd.demo import DemoSettings, run_demo  # noqa: PLC0415  (set-up only on demand)

    settings = DemoSettings(
        size=_parse_size(size), rate=rate, hot_set=_parse_size(hot_set, "--hot-set"),
        hot_fraction=hot_fraction, zero_fraction=zero_fraction, channels=channels,
        downtime_limit=downtime_limit / 1e3, output=out, auto_converge=auto_converge,
        max_bandwidth=_parse_size(max_bandwidth, "--max-bandwidth") if max_bandwidth else None,
    )  # fmt: skip
    try:
        ok = run_demo(settings, err)
    except MultifdError as exc:
        fail(exc)
    sys.exit(0 if ok else 1)


def _parse_size(text: str, option: str = "--size") -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r}", param_hint=option) from None


# The real-VM commands (relay, record, replay) live in their own module.
cli_vm.register(main)
