"""The send-side explorer: our handshake is clean in every interleaving; QEMU < 9.0's is not.

The explorer drives the engine's own SEND_TABLE, so these tests are about the code that
runs, not about a copy of it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from multifd.engine import explore
from multifd.engine.explore import (
    OLD,
    OUR_EFFECTS,
    OURS,
    SendWorkload,
    explore_send,
    old_race,
)
from multifd.engine.handshake import SEND_TABLE, SendAction, SendEvent, SendState

_REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_our_handshake_holds_in_every_interleaving(channels: int) -> None:
    """Every order of <=4 page jobs and <=2 syncs, every interleaving: no violation."""
    result = explore_send(OURS, SendWorkload(channels, jobs=4, syncs=2))
    print(f"{result.name}: {result.states} states, {result.transitions} transitions")
    assert result.complete
    assert result.ok, result.counterexample and result.counterexample.render()
    # Every run that ended wrote, per channel, the jobs and SYNCs asked of it; one SYNC
    # per sync() on every channel, so the channels agree on the number of markers.
    assert len(result.outputs) >= 55  # at least one per program
    for output in result.outputs:
        assert len({sum(p.sync for p in packets) for packets in output}) == 1
        assert all(p.sync != (p.job is not None) for packets in output for p in packets)


def test_the_explorer_reaches_every_table_entry_but_the_shutdown_wake_up() -> None:
    """Including the race window: a job and a sync both pending when the thread wakes."""
    result = explore_send(OURS, SendWorkload(2))
    idle_wake = (SendState(), SendEvent.WAKE)  # only shutdown posts sem without a request
    assert result.coverage == set(SEND_TABLE) - {idle_wake}
    assert (SendState(pending_job=True, pending_sync=True), SendEvent.WAKE) in SEND_TABLE


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        ("JS", ["J0", "S"]),
        ("SJJS", ["S", "J0", "J1", "S"]),
        ("JSJJSJ", ["J0", "S", "J1", "J2", "S", "J3"]),
    ],
)
def test_a_program_on_one_channel_comes_out_in_order(program: str, expected: list[str]) -> None:
    result = explore_send(OURS, SendWorkload(1, program=program))
    assert result.ok
    (output,) = result.outputs
    assert ["S" if p.sync else f"J{p.job}" for p in output[0]] == expected


def test_the_old_handshake_fails_with_the_readme_schedule() -> None:
    """A job queued, a sync requested before the thread wakes: SYNC with pages, then empty."""
    race = old_race()
    print(race.render())
    events = [(s.actor, s.event) for s in race.schedule]
    assert events == [
        ("requester", "CALL"),
        ("multifd/0", "START"),
        ("requester", "ACQUIRE"),
        ("requester", "SCAN"),
        ("requester", "HAND_JOB"),
        ("requester", "POST"),
        ("requester", "CALL"),
        ("requester", "REQUEST_SYNC"),
        ("requester", "POST"),
        ("multifd/0", "ACQUIRE"),
        ("multifd/0", "WAKE"),
        ("multifd/0", "WRITE"),
        ("multifd/0", "SYNC_SENT"),
        ("multifd/0", "POST"),
        ("multifd/0", "ACQUIRE"),
        ("multifd/0", "WAKE"),
        ("multifd/0", "WRITE"),
    ]
    texts = [s.text for s in race.schedule]
    assert texts[4].startswith("queues page job J0 on multifd/0")
    assert texts[7].startswith("requests sync S0 on multifd/0")
    assert "(pending_job=2 flags=SYNC)" in texts[10]  # one wake-up finds both requests
    assert texts[11] == "sends the pages of J0 with the SYNC flag"
    assert texts[16] == "sends an empty packet"
    assert race.kind == "I2"


def test_the_readme_tells_the_story_the_explorer_prints() -> None:
    readme = (_REPO / "README.md").read_text()
    design = readme[readme.index("## Design") :]
    text = " ".join(design.split())
    story = ["page job queued", "sync requested before the channel thread woke"]
    story += ["*with* the SYNC flag", "then an empty packet"]
    assert all(words in text for words in story), design
    steps = [s.text for s in old_race().schedule]
    assert any(re.match(r"queues page job J0", t) for t in steps)
    assert any(re.match(r"requests sync S0", t) for t in steps)
    assert any(t.startswith("wakes up") for t in steps)
    assert steps[-6].endswith("with the SYNC flag")
    assert steps[-1].endswith("an empty packet")


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_the_old_handshake_fails_on_any_channel_count(channels: int) -> None:
    result = explore_send(OLD, SendWorkload(channels), until=explore.RACE.issubset)
    assert not result.ok
    assert {"I1", "I2"} <= set(result.kinds())
    shortest = result.counterexample
    assert shortest is not None
    assert shortest.kind == "I1"
    assert str(shortest.schedule[-1]).endswith("with the SYNC flag")


def test_every_action_has_an_effect_and_the_spin_table_is_generated() -> None:
    assert set(OUR_EFFECTS) == set(SendAction)
    generated = explore.promela_send_table()
    assert (_REPO / "verify" / "send_table.pml").read_text() == generated, (
        "verify/send_table.pml is stale: python -m multifd.engine.explore --promela"
    )
    assert generated.count(" -> next = ") == len(SEND_TABLE)


def test_main_prints_the_state_counts_and_the_race(capsys: pytest.CaptureFixture[str]) -> None:
    assert explore.main(["--channels", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"send ours +1 .* 0 violations", out), out
    assert re.search(r"send QEMU<9.0 +1 .*I1 \(11 steps\)", out), out
    assert re.search(r"recv ours +1 .* 0 violations", out), out
    assert "sends the pages of J0 with the SYNC flag" in out
