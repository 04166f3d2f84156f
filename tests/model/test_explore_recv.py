"""The receive-side explorer: the two-phase barrier over RECV_TABLE in every interleaving."""

from __future__ import annotations

import pytest

from multifd.engine.explore import OLD, RecvWorkload, explore_recv, recv_workloads


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_every_stream_a_sender_can_write_passes_the_barrier(channels: int) -> None:
    """Ours and QEMU < 9.0's streams, with trailing SYNCs, and short of a SYNC."""
    workloads = recv_workloads(channels)
    kinds = {item for w in workloads for stream in w.streams for item in stream}
    assert kinds == {"P", "S", "SP", "E", "EOF"}  # both senders' packets are in there
    assert any(w.may_fail for w in workloads)
    states = 0
    for workload in workloads:
        result = explore_recv(workload)
        assert result.ok, result.counterexample and result.counterexample.render()
        states += result.states
    print(f"recv, {channels} ch: {len(workloads)} stream sets, {states} states")


def test_the_old_senders_own_output_passes_the_barrier() -> None:
    for workload in recv_workloads(2, OLD)[:60]:
        assert explore_recv(workload).ok


def test_a_channel_short_of_a_sync_fails_the_loader_fast_instead_of_hanging() -> None:
    streams = (("P", "EOF"), ("S", "EOF"))
    assert explore_recv(RecvWorkload(streams, markers=1, may_fail=True)).ok
    # Not expecting it: the same runs are reported, with the shortest schedule to it.
    result = explore_recv(RecvWorkload(streams, markers=1))
    assert result.kinds() == ["DEADLOCK"]
    shortest = result.counterexample
    assert shortest is not None
    assert [s.event for s in shortest.schedule] == ["READ", "READ", "FAIL"]


def test_pages_inside_a_sync_are_applied_before_the_marker_passes() -> None:
    """QEMU < 9.0: pages in the SYNC packet and an empty packet after it."""
    streams = (("SP", "E", "P", "S", "EOF"), ("P", "S", "SP", "E", "EOF"))
    result = explore_recv(RecvWorkload(streams, markers=2))
    assert result.ok
    assert result.ends == 1  # every interleaving ends in the same state: all DONE


def test_a_trailing_sync_is_freed_by_finish() -> None:
    """QEMU 9.1/9.2 end with a SYNC that no marker matches; finish() must free it."""
    result = explore_recv(RecvWorkload((("S", "S", "EOF"), ("P", "S", "S", "EOF")), markers=1))
    assert result.ok
    assert result.ends == 1


@pytest.mark.parametrize(
    "streams", [(("P", "S"),), (("EOF", "S", "EOF"),), ((),)], ids=["no-eof", "eof-twice", "empty"]
)
def test_a_stream_must_end_with_one_eof(streams: tuple[tuple[str, ...], ...]) -> None:
    with pytest.raises(ValueError, match="EOF"):
        RecvWorkload(streams, markers=0)
