"""Atheris (libFuzzer) harness: mutated migration streams into a real receiver.

Usage (from the repository root)::

    python fuzz/fuzz_receiver.py fuzz/corpus -max_len=65536 -timeout=30 -runs=20000 \\
        -artifact_prefix=fuzz/crashes/

Each input is split into a main stream and one multifd channel (see
:mod:`fuzz.stream_case`), written over Unix sockets to ``multifd.receive`` and judged by
:func:`fuzz.stream_case.check`; a broken invariant raises, and libFuzzer saves the input
as a crash file. Replay crash files with ``tests/unit/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for `import fuzz`

with atheris.instrument_imports(include=["multifd"]):
    import multifd
    import multifd.compression
    import multifd.engine.recv
    import multifd.migration.destination
    import multifd.wire.packets
    import multifd.wire.stream  # noqa: F401

from fuzz.stream_case import Case, Receiver, check

_receiver: Receiver | None = None


def test_one_input(data: bytes) -> None:
    assert _receiver is not None
    case = Case.parse(data)
    check(case, _receiver.run(case))


def main() -> None:
    global _receiver  # noqa: PLW0603 - libFuzzer calls a plain function
    # libFuzzer re-runs argv[0] through the shell for -merge and -fork: make it this script.
    argv0 = f"{sys.executable} {Path(__file__).resolve()}"
    atheris.Setup([argv0, *sys.argv[1:]], test_one_input)
    _receiver = Receiver()
    try:
        atheris.Fuzz()
    finally:
        _receiver.close()


if __name__ == "__main__":
    main()
