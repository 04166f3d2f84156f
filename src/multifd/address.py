"""Migration addresses: QEMU's URI syntax, ``tcp:HOST:PORT``, ``tcp:[::1]:PORT``, ``unix:PATH``.

:func:`parse_address` turns the text a user gives into an :class:`Address`, checked field
by field: a bad address is a :class:`~multifd.errors.ConfigError` that says what is wrong,
before any socket exists. :mod:`multifd.transport` listens and connects at them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Final, Literal

from multifd.errors import ConfigError
from multifd.tls import TlsConfig

Kind = Literal["tcp", "unix"]

# sockaddr_un.sun_path is 108 bytes; QEMU keeps a terminating NUL, so 107 usable bytes.
_UNIX_PATH_MAX: Final = 107
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})")
_PORT: Final = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Address:
    """A migration address: ``tcp:HOST:PORT`` or ``unix:PATH``.

    Attributes:
        kind: ``"tcp"`` or ``"unix"``.
        host: TCP host: an IPv4 address, a host name or an IPv6 address (without
            brackets); empty means every interface when listening, loopback when
            connecting.
        port: TCP port, 0..65535; 0 asks :func:`listen` to pick a free port.
        path: filesystem path of a Unix socket.
        tls: credentials when every channel runs TLS; None for plain sockets.
    """

    kind: Kind
    host: str = ""
    port: int = 0
    path: str = ""
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        if self.kind == "tcp":
            _check_tcp(self.host, self.port, self.path)
        elif self.kind == "unix":
            _check_unix(self.host, self.port, self.path)
        else:
            raise ConfigError(f"address kind must be 'tcp' or 'unix', got {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def _check_tcp(host: str, port: int, path: str) -> None:
    if path:
        raise ConfigError(f"a tcp address has no path, got {path!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ConfigError(f"tcp port must be 0..65535, got {port!r}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ConfigError(f"bad IPv6 address {host!r}: {exc}") from exc
    elif host and not _HOSTNAME.fullmatch(host):
        raise ConfigError(f"bad host {host!r}: expected an IPv4 address or a host name")


def _check_unix(host: str, port: int, path: str) -> None:
    if host or port:
        raise ConfigError(f"a unix address has no host or port, got {host!r}, {port!r}")
    if not path:
        raise ConfigError("a unix address needs a path: unix:PATH")
    if "\0" in path:
        raise ConfigError(f"unix socket path contains a NUL byte: {path!r}")
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise ConfigError(f"unix socket path longer than {_UNIX_PATH_MAX} bytes: {path!r}")


def parse_address(text: str, *, tls: TlsConfig | None = None) -> Address:
    """Parse a QEMU migration URI; ``tls`` is attached to the address as it is.

    Accepted forms: ``tcp:HOST:PORT`` (HOST an IPv4 address, a name, ``[IPV6]`` in
    brackets, or empty for every interface) and ``unix:PATH``.

    Raises:
        ConfigError: the text is not one of these forms; the message says why.
    """
    scheme, sep, rest = text.partition(":")
    try:
        if sep and scheme == "unix":
            return Address("unix", path=rest, tls=tls)
        if sep and scheme == "tcp":
            host, port = _split_host_port(rest)
            return Address("tcp", host=host, port=port, tls=tls)
    except ConfigError as exc:
        raise ConfigError(f"bad address {text!r}: {exc}") from exc
    raise ConfigError(f"bad address {text!r}: expected tcp:HOST:PORT or unix:PATH")


def listen_address(text: str, tls: TlsConfig | None = None) -> Address:
    """:func:`parse_address` for an end that listens; with ``tls``, its server context is
    built at once, so that unreadable credentials fail before anything listens.

    Raises:
        ConfigError: a bad address or bad credentials.
    """
    address = parse_address(text, tls=tls)
    if tls is not None:
        _ = tls.server_context
    return address


def target_address(text: str, tls: TlsConfig | None = None) -> Address:
    """:func:`parse_address` for an end that connects; with ``tls``, the name to check in
    the destination's certificate and the client context are settled at once.

    Raises:
        ConfigError: a bad address, bad credentials, or a ``unix:`` address with TLS and
            no :attr:`~multifd.tls.TlsConfig.hostname`.
    """
    address = parse_address(text, tls=tls)
    if tls is not None:
        tls.server_name(address.host, unix=address.kind == "unix")
        _ = tls.client_context
    return address


def _split_host_port(rest: str) -> tuple[str, int]:
    if "," in rest:
        raise ConfigError("address options (',...') are not supported")
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket:
            raise ConfigError("missing ']' after the IPv6 address")
        if ":" not in host:
            raise ConfigError("brackets are only for IPv6 addresses")
        if not after.startswith(":"):
            raise ConfigError("missing ':PORT' after the IPv6 address")
        port_text = after[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ConfigError("missing ':PORT'")
        if ":" in host:
            raise ConfigError("an IPv6 address must be in brackets: tcp:[::1]:PORT")
    if not _PORT.fullmatch(port_text):
        raise ConfigError(f"port must be a decimal number 0..65535, got {port_text!r}")
    return host, int(port_text)
