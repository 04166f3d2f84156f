"""The command line's final summary."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from rich.console import Console

from multifd.console import print_stats
from multifd.engine.stats import ChannelCounters
from multifd.migration.stats import MigrationStats, PassStats, Status
from multifd.wire.constants import PAGE_SIZE

MIB = 1 << 20


def _stats(
    status: Status = Status.COMPLETED, passes: tuple[PassStats, ...] = (), downtime_ms: float = 0
) -> MigrationStats:
    channels = (
        ChannelCounters("main", packets=3, bytes=1000),
        # 512 pages (2 MiB of data) that zstd sent as 0.5 MiB, and 100 zero pages
        ChannelCounters("multifd/0", packets=5, pages=512, zero_pages=100, bytes=MIB // 2),
    )
    return MigrationStats(
        status, total_time_ms=250.0, downtime_ms=downtime_ms, channels=channels, passes=passes
    )


def _summary(stats: MigrationStats) -> list[str]:
    out = io.StringIO()
    print_stats(Console(file=out, width=200), stats, as_json=False)
    return out.getvalue().splitlines()


def test_summary_gives_the_data_beside_the_bytes_sent() -> None:
    first, *channels = _summary(_stats())
    assert first.startswith("completed: 0.5 MiB in 0.25 s")
    assert "512 pages (2.0 MiB of data), 100 zero pages" in first
    assert "pass" not in first  # no pre-copy passes were reported
    assert [line.split(":")[0].strip() for line in channels] == ["main", "multifd/0"]
    assert channels[1].endswith("5 packets, 0.5 MiB")


def test_summary_counts_passes_and_downtime() -> None:
    passes = (PassStats(1, 512, 512 * PAGE_SIZE, 0.2), PassStats(2, 3, 3 * PAGE_SIZE, 0.01))
    (first, *_) = _summary(_stats(passes=passes, downtime_ms=12.34))
    assert first.endswith("2 passes, downtime 12.3 ms")


@pytest.mark.parametrize("status", [Status.COMPLETED, Status.FAILED])
def test_json_summary_is_one_object(status: Status, capsys: pytest.CaptureFixture[str]) -> None:
    print_stats(Console(file=io.StringIO()), _stats(status=status), as_json=True)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    assert json.loads(printed[0])["status"] == status.value


def test_summary_says_how_hard_auto_converge_held_the_writers() -> None:
    passes = (PassStats(number=1, pages=10, bytes=40960, seconds=0.1),)
    held = replace(_stats(passes=passes), cpu_throttle_percentage=40)
    assert _summary(held)[0].endswith(", writers held 40 % (auto-converge)")
    assert "held" not in _summary(_stats(passes=passes))[0]
