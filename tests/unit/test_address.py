"""Addresses: QEMU's migration URIs parsed, checked and formatted back."""

from __future__ import annotations

import pytest

from multifd.address import Address, parse_address
from multifd.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:4444", Address("tcp", host="127.0.0.1", port=4444)),
        ("tcp:localhost:0", Address("tcp", host="localhost", port=0)),
        ("tcp:dst-host.example.org:65535", Address("tcp", host="dst-host.example.org", port=65535)),
        ("tcp:[::1]:4444", Address("tcp", host="::1", port=4444)),
        ("tcp:[fe80::1%eth0]:1", Address("tcp", host="fe80::1%eth0", port=1)),
        ("tcp::4444", Address("tcp", host="", port=4444)),
        ("unix:/run/mig.sock", Address("unix", path="/run/mig.sock")),
        ("unix:relative/with:colon", Address("unix", path="relative/with:colon")),
    ],
)
def test_parse_good_address_and_format_it_back(text: str, expected: Address) -> None:
    address = parse_address(text)
    assert address == expected
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected tcp:HOST:PORT or unix:PATH"),
        ("127.0.0.1:4444", "expected tcp:HOST:PORT or unix:PATH"),
        ("udp:127.0.0.1:4444", "expected tcp:HOST:PORT or unix:PATH"),
        ("tcp", "expected tcp:HOST:PORT or unix:PATH"),
        ("tcp:", "missing ':PORT'"),
        ("tcp:localhost", "missing ':PORT'"),
        ("tcp:localhost:", "port must be"),
        ("tcp:localhost:65536", "port must be 0..65535"),
        ("tcp:localhost:-1", "port must be"),
        ("tcp:localhost:44a", "port must be"),
        ("tcp:localhost: 44", "port must be"),
        ("tcp:localhost:123456", "port must be"),
        ("tcp:::1:4444", "must be in brackets"),
        ("tcp:[::1]4444", "missing ':PORT'"),
        ("tcp:[::1:4444", "missing ']'"),
        ("tcp:[127.0.0.1]:4444", "only for IPv6"),
        ("tcp:[::zz]:4444", "bad IPv6 address"),
        ("tcp:bad host:4444", "bad host"),
        ("tcp:-dash:4444", "bad host"),
        ("tcp:localhost:4444,ipv4=on", "not supported"),
        ("unix:", "needs a path"),
        ("unix:/tmp/" + "x" * 200, "longer than 107 bytes"),
        ("unix:/tmp/a\0b", "NUL"),
    ],
)
def test_parse_bad_address_raises_config_error_naming_it(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match="bad address") as info:
        parse_address(text)
    assert repr(text) in str(info.value)
    assert why in str(info.value)


def test_address_checks_its_fields_when_built_directly() -> None:
    with pytest.raises(ConfigError, match=r"0\.\.65535"):
        Address("tcp", host="h", port=70000)
    with pytest.raises(ConfigError, match=r"0\.\.65535"):
        Address("tcp", host="h", port=True)
    with pytest.raises(ConfigError, match="no path"):
        Address("tcp", host="h", port=1, path="/p")
    with pytest.raises(ConfigError, match="no host or port"):
        Address("unix", host="h", path="/p")
    with pytest.raises(ConfigError, match="kind"):
        Address("rdma", host="h", port=1)  # type: ignore[arg-type]
