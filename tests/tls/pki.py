"""Test certificates made with the ``openssl`` command (used by the tests and benchmarks).

Two CAs: ``ca`` signs the destination (``dest``, valid for ``localhost``, ``127.0.0.1``,
``::1`` and ``dest.test``) and the source (``source``); ``other`` signs a client
(``stranger``) and a server (``impostor``) that the legitimate ends must refuse.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from multifd.tls import TlsConfig

_DAYS = "2"
_SERVER_EXT = (
    "subjectAltName=DNS:localhost,DNS:dest.test,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n"
)
_CLIENT_EXT = "extendedKeyUsage=clientAuth\n"


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)


def _key_and_request(name: str) -> Sequence[str]:
    return ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key")  # fmt: skip


def _make_ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", *_key_and_request(name), "-days", _DAYS,
             "-out", f"{name}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip


def _make_cert(folder: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(folder, "req", *_key_and_request(name), "-out", f"{name}.csr")
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
             "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", _DAYS,
             "-out", f"{name}.pem", "-extfile", f"{name}.ext")  # fmt: skip


@dataclass(frozen=True)
class Pki:
    """The session's certificates; each property is one end's :class:`TlsConfig`."""

    folder: Path

    def config(self, name: str, ca: str = "ca", hostname: str | None = None) -> TlsConfig:
        folder = self.folder
        return TlsConfig(
            cert=folder / f"{name}.pem",
            key=folder / f"{name}.key",
            ca=folder / f"{ca}.pem",
            hostname=hostname,
        )

    @property
    def dest(self) -> TlsConfig:
        return self.config("dest")

    @property
    def source(self) -> TlsConfig:
        return self.config("source")

    @property
    def stranger(self) -> TlsConfig:
        """A client signed by the other CA; it trusts our CA, we do not trust it."""
        return self.config("stranger")

    @property
    def impostor(self) -> TlsConfig:
        """A destination signed by the other CA, valid for the same names as ``dest``."""
        return self.config("impostor")

    def qemu_creds(self, folder: Path, *, endpoint: str, name: str, creds_id: str) -> list[str]:
        """QEMU's ``-object tls-creds-x509`` with id ``creds_id``, ``endpoint`` ``server``
        or ``client``, presenting certificate ``name`` and checking its peer's.

        QEMU reads its credentials from a folder of fixed file names (``ca-cert.pem``, and
        ``server-cert.pem``/``server-key.pem`` or ``client-cert.pem``/``client-key.pem``),
        made here in ``folder``. QEMU checks its own certificate against its CA file when
        it starts: the stranger's folder lists the other CA too (its own), and still trusts
        ours.
        """
        folder.mkdir()
        role = "server" if endpoint == "server" else "client"
        cas = ["ca.pem", "other.pem"] if name == "stranger" else ["ca.pem"]
        (folder / "ca-cert.pem").write_text("".join((self.folder / ca).read_text() for ca in cas))
        shutil.copy(self.folder / f"{name}.pem", folder / f"{role}-cert.pem")
        shutil.copy(self.folder / f"{name}.key", folder / f"{role}-key.pem")
        options = f"id={creds_id},dir={folder},endpoint={endpoint},verify-peer=on"
        return ["-object", f"tls-creds-x509,{options}"]


def make_pki(folder: Path) -> Pki:
    """Write every certificate and key into ``folder`` (about 0.1 s)."""
    _make_ca(folder, "ca")
    _make_ca(folder, "other")
    _make_cert(folder, "dest", "ca", _SERVER_EXT)
    _make_cert(folder, "source", "ca", _CLIENT_EXT)
    _make_cert(folder, "stranger", "other", _CLIENT_EXT)
    _make_cert(folder, "impostor", "other", _SERVER_EXT)
    return Pki(folder)
