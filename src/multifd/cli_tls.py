"""The commands' TLS options: one set of credentials for each side a command talks to.

``send``, ``receive``, ``record`` and ``replay`` talk to one peer and take ``--tls-cert``,
``--tls-key`` and ``--tls-ca``; ``relay`` talks to two and takes a second set,
``--out-tls-*``, for its target. A side gets TLS when all three of its files are given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from multifd.tls import TlsConfig

Command = Callable[..., None]

_PEM = click.Path(exists=True, dir_okay=False, path_type=Path)


def tls_options(prefix: str, peer: str, *, hostname: bool) -> Callable[[Command], Command]:
    """Add ``--PREFIX-cert``, ``--PREFIX-key`` and ``--PREFIX-ca`` (and, for a side that
    connects, ``--PREFIX-hostname``) to a command; ``peer`` names who is at the far end."""

    def add(func: Command) -> Command:
        if hostname:
            func = click.option(
                f"--{prefix}-hostname",
                default=None,
                help=f"Name the {peer}'s certificate must carry (default: the host of its "
                "address; required for unix: addresses).",
            )(func)
        cert = f"This end's certificate (PEM) towards the {peer}: every channel then runs TLS 1.3."
        for name, what in (
            ("ca", f"CA certificate (PEM) that signs the {peer}'s certificate."),
            ("key", f"Private key (PEM) of --{prefix}-cert."),
            ("cert", cert),
        ):
            func = click.option(f"--{prefix}-{name}", type=_PEM, default=None, help=what)(func)
        return func

    return add


def tls_config(
    prefix: str,
    cert: Path | None,
    key: Path | None,
    ca: Path | None,
    hostname: str | None = None,
) -> TlsConfig | None:
    """The credentials ``--PREFIX-*`` give; None when none is given.

    Raises:
        click.UsageError: some of the three files are given, not all.
    """
    files = f"--{prefix}-cert, --{prefix}-key and --{prefix}-ca"
    if cert is not None and key is not None and ca is not None:
        return TlsConfig(cert=cert, key=key, ca=ca, hostname=hostname)
    if cert is not None or key is not None or ca is not None:
        raise click.UsageError(f"TLS needs all of {files}")
    if hostname is not None:
        raise click.UsageError(f"--{prefix}-hostname needs {files}")
    return None
