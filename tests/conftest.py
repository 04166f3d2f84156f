"""Suite-wide fixtures: every test fails if it leaves a thread running; ``zstd_backend``
runs a test once per way of driving libzstd; ``pki`` makes the test certificates."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest

from multifd.compression import zstd
from tests.tls.pki import Pki, make_pki

# Threads get this long to finish after a test before they count as leaked; a thread
# that is still alive then is a bug in the code under test (I6), never a slow machine.
_JOIN_BOUND = 10.0


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for thread in leaked:
        thread.join(_JOIN_BOUND)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked threads: {still}"


_ZSTD_BACKENDS = [
    pytest.param(True, id="libzstd", marks=pytest.mark.skipif(
        not zstd.LIBZSTD_AVAILABLE, reason="zstandard's cffi backend does not import")),
    pytest.param(False, id="zstandard"),
]  # fmt: skip


@pytest.fixture(params=_ZSTD_BACKENDS)
def zstd_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """zstd objects made in the test call libzstd directly, or use zstandard's stream
    objects (the fallback without cffi): both must give the same bytes and errors."""
    direct: bool = request.param
    monkeypatch.setattr(zstd, "use_libzstd", direct)
    return direct


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The session's certificates (see :mod:`tests.tls.pki`), made once."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))
