"""``multifd relay``, ``record`` and ``replay``: carrying real VMs between QEMUs.

:func:`register` adds the three commands to the ``multifd`` group. Each listening command
prints ``listening on ADDRESS`` as its first line on stderr, as ``receive`` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from multifd.api import MAX_CHANNELS, parse_uuid
from multifd.cli_tls import tls_config, tls_options
from multifd.console import (
    err,
    fail,
    print_listening,
    print_refused,
    print_stats,
    receive_progress,
)
from multifd.errors import MultifdError
from multifd.migration.recording import Manifest, record, replay
from multifd.migration.relay import AS_SOURCE, OUT_PEERS, OutSettings, RelayStats, relay

_MIB = 1 << 20

Command = Callable[..., None]
_METHODS = click.Choice(["none", "zlib", "zstd"])


def _incoming_options(func: Command) -> Command:
    func = click.option(
        "--json-progress", is_flag=True,
        help="Print the incoming side's statistics as a JSON line on stdout every half "
        "second, and the final statistics (as --json prints them) last.",
    )(func)  # fmt: skip
    func = click.option(
        "--compression", type=_METHODS, default="none", show_default=True,
        help="The source's multifd compression.",
    )(func)  # fmt: skip
    func = click.option(
        "--channels", type=click.IntRange(0, MAX_CHANNELS), default=2, show_default=True,
        help="The source's multifd channels (0: multifd off).",
    )(func)  # fmt: skip
    return _common(func)


def _common(func: Command) -> Command:
    func = click.option(
        "--io-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
        help="Seconds a channel may stall.",
    )(func)  # fmt: skip
    return click.option(
        "--json", "as_json", is_flag=True, help="Print the final statistics as JSON on stdout."
    )(func)


def _peer_option(name: str) -> Callable[[Command], Command]:
    return click.option(
        name,
        type=click.Choice(OUT_PEERS),
        default=AS_SOURCE,
        show_default=True,
        help="The destination's QEMU behaviour (sync marker, zero pages, switchover-start); "
        f"{AS_SOURCE}: as the source did.",
    )


@click.command("relay")
@click.argument("listen")
@click.argument("target")
@click.option("--out-channels", type=click.IntRange(0, MAX_CHANNELS), default=2,
              show_default=True, help="Multifd channels to TARGET (0: multifd off).")  # fmt: skip
@click.option("--out-compression", type=_METHODS, default="none", show_default=True)
@click.option("--out-level", type=int, default=None, help="Compression level towards TARGET.")
@_peer_option("--out-peer")
@click.option("--uuid", default=None, help="UUID of the outgoing channels (default: the source's).")
@click.option(
    "--out-return-path/--no-out-return-path",
    default=True,
    show_default=True,
    help="Wait for TARGET's verdict (QEMU's return path) and pass it on to the source.",
)
@tls_options("out-tls", "target", hostname=True)
@tls_options("tls", "source", hostname=False)
@_incoming_options
def relay_command(  # noqa: PLR0917 - click passes every option
    listen: str,
    target: str,
    out_channels: int,
    out_compression: str,
    out_level: int | None,
    out_peer: str,
    uuid: str | None,
    out_return_path: bool,
    channels: int,
    compression: str,
    io_timeout: float,
    as_json: bool,
    json_progress: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    out_tls_cert: Path | None,
    out_tls_key: Path | None,
    out_tls_ca: Path | None,
    out_tls_hostname: str | None,
) -> None:
    """Accept a migration at LISTEN and forward it to the QEMU listening at TARGET.

    The RAM is re-encoded with the --out-* settings; the configuration and the device
    state are passed through unchanged. A failure on either side fails both: the source's
    migration fails and its VM keeps running. Each side runs TLS when given its own
    credentials: --tls-* towards the source, --out-tls-* towards TARGET.
    """
    tls = tls_config("tls", tls_cert, tls_key, tls_ca)
    out_tls = tls_config("out-tls", out_tls_cert, out_tls_key, out_tls_ca, out_tls_hostname)
    try:
        out = OutSettings(out_channels, out_compression, out_level, out_peer, parse_uuid(uuid),
                          return_path=out_return_path)  # fmt: skip
        with receive_progress(as_json=as_json, json_progress=json_progress) as progress:
            stats = relay(listen, target, channels=channels, compression=compression, out=out,
                          io_timeout=io_timeout, tls=tls, out_tls=out_tls,
                          on_listening=print_listening, on_refused=print_refused,
                          progress=progress)  # fmt: skip
    except MultifdError as exc:
        fail(exc)
    if as_json or json_progress:
        click.echo(json.dumps(stats.to_json()))
    else:
        _print_relay(stats)


def _print_relay(stats: RelayStats) -> None:
    sent = sum(ch.bytes for ch in stats.outgoing)
    err.print(
        f"{stats.incoming.status.value}: {stats.machine}, {stats.pages} pages forwarded in "
        f"{stats.rounds} rounds ({sent / _MIB:.1f} MiB out, {stats.sync_mode} in, "
        f"{stats.out_profile} out), {stats.tail_bytes} bytes of device state, "
        f"final RAM round {stats.complete_ms:.1f} ms",
        markup=False,
    )


@click.command("record")
@click.argument("listen")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@tls_options("tls", "source", hostname=False)
@_incoming_options
def record_command(  # noqa: PLR0917 - click passes every option
    listen: str, directory: Path, channels: int, compression: str, io_timeout: float,
    as_json: bool, json_progress: bool, tls_cert: Path | None, tls_key: Path | None,
    tls_ca: Path | None,
) -> None:  # fmt: skip
    """Accept a migration at LISTEN and store the VM in DIRECTORY (RAM, device state)."""
    tls = tls_config("tls", tls_cert, tls_key, tls_ca)
    try:
        with receive_progress(as_json=as_json, json_progress=json_progress) as progress:
            stats, manifest = record(listen, directory, channels=channels,
                                     compression=compression, io_timeout=io_timeout, tls=tls,
                                     on_listening=print_listening, on_refused=print_refused,
                                     progress=progress)  # fmt: skip
    except MultifdError as exc:
        fail(exc)
    print_stats(err, stats, as_json=as_json or json_progress)
    if not as_json:
        _print_manifest(directory, manifest)


def _print_manifest(directory: Path, manifest: Manifest) -> None:
    seen = manifest.source
    err.print(
        f"recorded {manifest.machine} in {directory}: {len(manifest.blocks)} blocks, "
        f"{manifest.tail.size} bytes of device state; source {seen.sync_mode}, zero pages "
        f"{seen.zero_pages}, switchover-start {'yes' if seen.switchover_start else 'no'}",
        markup=False,
    )


@click.command("replay")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("target")
@click.option("--channels", type=click.IntRange(0, MAX_CHANNELS), default=2, show_default=True,
              help="Multifd channels (0: multifd off).")  # fmt: skip
@click.option("--compression", type=_METHODS, default="none", show_default=True)
@click.option("--level", type=int, default=None, help="Compression level.")
@_peer_option("--peer")
@click.option("--uuid", default=None, help="UUID of the channels (default: the recorded one).")
@click.option(
    "--return-path/--no-return-path",
    default=True,
    show_default=True,
    help="Wait for TARGET's verdict (QEMU's return path).",
)
@tls_options("tls", "target", hostname=True)
@_common
def replay_command(  # noqa: PLR0917 - click passes every option
    directory: Path,
    target: str,
    channels: int,
    compression: str,
    level: int | None,
    peer: str,
    uuid: str | None,
    return_path: bool,
    io_timeout: float,
    as_json: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    tls_hostname: str | None,
) -> None:
    """Send the VM recorded in DIRECTORY to the QEMU listening at TARGET.

    The recording is verified (manifest, sizes, SHA-256) before anything is sent.
    """
    tls = tls_config("tls", tls_cert, tls_key, tls_ca, tls_hostname)
    try:
        stats = replay(directory, target, channels=channels, compression=compression,
                       level=level, peer=peer, uuid=parse_uuid(uuid), return_path=return_path,
                       io_timeout=io_timeout, tls=tls)  # fmt: skip
    except MultifdError as exc:
        fail(exc)
    print_stats(err, stats, as_json=as_json)


def register(group: click.Group) -> None:
    """Add ``relay``, ``record`` and ``replay`` to ``group``."""
    for command in (relay_command, record_command, replay_command):
        group.add_command(command)
