"""Replays the fuzzer's inputs through the same receiver and invariants as the fuzzer.

``fuzz/regressions/`` holds every input that once broke an invariant (a crash file of
``fuzz/fuzz_receiver.py``, renamed after what it found); ``fuzz/corpus/`` holds the
minimized corpus, seeds included. Each must now end cleanly: a completed migration, or
``MigrationFailed`` caused only by protocol or channel errors, within the time bounds,
touching only pages it addressed, allocating only what the limits allow.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz.stream_case import Case, Receiver, check

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
REGRESSIONS = sorted((FUZZ / "regressions").glob("*"))
CORPUS = sorted((FUZZ / "corpus").glob("*"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    harness = Receiver()
    yield harness
    harness.close()


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.name)
def test_regression(receiver: Receiver, path: Path) -> None:
    case = Case.parse(path.read_bytes())
    check(case, receiver.run(case))


def test_corpus(receiver: Receiver) -> None:
    assert len(CORPUS) >= 20, "the corpus is missing (python fuzz/make_corpus.py)"
    for path in CORPUS:
        case = Case.parse(path.read_bytes())
        try:
            check(case, receiver.run(case))
        except Exception as exc:
            raise AssertionError(f"{path.name}: {exc}") from exc


def test_seeds_from_our_traffic_complete(receiver: Receiver) -> None:
    """The recorded migrations are valid streams: the harness does not just fail everything."""
    seeds = [p for p in CORPUS if p.name.startswith("seed-") and "qemu72-" not in p.name]
    assert seeds
    for path in seeds:
        case = Case.parse(path.read_bytes())
        outcome = receiver.run(case)
        try:
            assert outcome.error is None, f"{path.name}: {outcome.error!r}"
        finally:
            check(case, outcome)
