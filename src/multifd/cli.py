"""The ``multifd`` command: a thin layer over :mod:`multifd.api`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from multifd import api
from multifd.errors import MultifdError
from multifd.migration.stats import MigrationStats
from multifd.wire.compat import PROFILES

err = Console(stderr=True, highlight=False)


def _fail(exc: BaseException) -> NoReturn:
    err.print(f"multifd: error: {exc}", markup=False, soft_wrap=True)
    sys.exit(1)


def _print_stats(stats: MigrationStats, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(stats.to_json()))
        return
    seconds = stats.total_time_ms / 1e3
    err.print(
        f"{stats.status.value}: {stats.transferred / 2**20:.1f} MiB in {seconds:.2f} s "
        f"({stats.mbps / 8:.1f} MB/s), {stats.normal} pages, {stats.duplicate} zero pages",
        markup=False,
    )
    for ch in stats.channels:
        err.print(
            f"  {ch.channel:>10}: {ch.packets} packets, {ch.bytes / 2**20:.1f} MiB", markup=False
        )


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[MigrationStats], None] | None]:
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("sending"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("send", total=total)

        def update(stats: MigrationStats) -> None:
            bar.update(task, completed=stats.total - stats.remaining)

        yield update


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
    func = click.option("--uuid", default=None, help="UUID carried by every multifd channel.")(func)
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
@_common
def receive(
    address: str,
    output: Path | None,
    prealloc: tuple[str, ...],
    channels: int,
    uuid: str | None,
    compression: str,
    io_timeout: float,
    as_json: bool,
) -> None:
    """Listen at ADDRESS (tcp:HOST:PORT or unix:PATH) and receive one migration."""

    def listening(real: str) -> None:
        err.print(f"listening on {real}", markup=False)

    try:
        result = api.receive(
            address,
            channels=channels,
            output=output,
            uuid=uuid,
            compression=compression,
            io_timeout=io_timeout,
            on_listening=listening,
            prealloc=dict(_split_prealloc(spec) for spec in prealloc),
        )
    except MultifdError as exc:
        _fail(exc)
    try:
        _print_stats(result.stats, as_json)
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
@_common
def send(
    address: str,
    blocks: tuple[str, ...],
    peer: str,
    level: int | None,
    channels: int,
    uuid: str | None,
    compression: str,
    io_timeout: float,
    as_json: bool,
) -> None:
    """Send files as RAM blocks to the destination at ADDRESS."""
    try:
        named = dict(_split_block(spec) for spec in blocks)
        ram = api.as_ram(named)
        with _progress(err.is_terminal and not as_json, ram.total_size) as progress:
            stats = api.send(
                address,
                ram,
                channels=channels,
                peer=peer,
                uuid=uuid,
                compression=compression,
                level=level,
                io_timeout=io_timeout,
                progress=progress,
            )
        ram.close()
    except MultifdError as exc:
        _fail(exc)
    _print_stats(stats, as_json)


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
@click.option("--zero-fraction", type=click.FloatRange(0, 1), default=0.3, show_default=True)
@_channels_option()
def demo(size: str, zero_fraction: float, channels: int) -> None:
    """Migrate a generated block over loopback TCP and compare both sides."""
    from multifd.demo import run_demo  # noqa: PLC0415  (numpy-heavy set-up only on demand)

    try:
        ok = run_demo(
            size=_parse_size(size), zero_fraction=zero_fraction, channels=channels, console=err
        )
    except MultifdError as exc:
        _fail(exc)
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
