"""A QEMU source with multifd off into ``multifd receive`` told 2 channels (QEMU 7.2, 10.0).

QEMU negotiates nothing: such a destination used to wait for the channels until its setup
timeout (60 s, beyond TIMEOUT here). Now it fails during setup, and the source hears it on
QEMU's return path (without it, a QEMU source reports ``completed`` once its bytes left):

- mixed RAM: at the first page on the main channel;
- all-zero RAM, a fresh guest: no page ever comes (both QEMUs send ZERO records without
  multifd, QEMU 10 despite its ``zero-page-detection=multifd``), so 5 s after the end of
  the source's RAM setup, when a source with multifd on has connected every channel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.interop.cli import MultifdProcess, as_uri, receive_args
from tests.interop.qemu import QemuError, QemuVm

pytestmark = pytest.mark.interop

SIZE = 32 << 20
TIMEOUT = 30.0
EXPECTED = {
    "mixed": "main: RAM page on the main channel: expected pages on the 2 multifd channels "
    "only, received a page of 'mem' (offset 0x0) while 0 of 2 multifd channels had arrived",
    "zero": "main: the source ended its RAM setup 5 s ago and none of the 2 multifd channels "
    "has arrived",
}


@pytest.mark.parametrize("image", list(EXPECTED))
@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_qemu_source_with_multifd_off_fails_both_ends_in_setup(
    request: pytest.FixtureRequest,
    ram_image: Callable[..., Path],
    tmp_path: Path,
    version: str,
    image: str,
) -> None:
    if image == "mixed":
        source_file = ram_image(SIZE, seed=65)
    else:
        source_file = tmp_path / "zero.ram"
        with source_file.open("wb") as empty:
            empty.truncate(SIZE)
    output = tmp_path / "received"
    output.mkdir()
    make: Callable[..., QemuVm] = request.getfixturevalue(
        "make_vm" if version == "7.2" else "make_vm10"
    )
    args = receive_args("tcp:127.0.0.1:0", channels=2, output=output)
    with MultifdProcess(args, timeout=TIMEOUT) as receiver:
        uri = as_uri(receiver.listening_address(TIMEOUT))
        source = make(SIZE, ram_file=source_file, name="src")
        source.set_capabilities(multifd=False, return_path=True)
        source.migrate(uri)
        result = receiver.wait(TIMEOUT)
        with pytest.raises(QemuError, match="migration failed"):
            source.wait_for_status("completed", TIMEOUT)
    assert result.returncode == 1
    assert EXPECTED[image] in result.stderr, result.stderr
    assert "is multifd off at the source?" in result.stderr
