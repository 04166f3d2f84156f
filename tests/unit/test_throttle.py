"""Auto-converge's decisions: when the throttle steps up, and how far."""

from __future__ import annotations

import pytest

from multifd.errors import ConfigError
from multifd.migration.throttle import AutoConverge, ThrottleControl

MIB = 1 << 20


def test_the_throttle_steps_up_every_second_pass_that_dirtied_more_than_half_it_sent() -> None:
    control = ThrottleControl(AutoConverge())
    steps = [control.after_pass(dirtied=6 * MIB, sent=8 * MIB) for _ in range(6)]
    assert steps == [None, 0.2, None, 0.3, None, 0.4]
    assert control.level == 0.4


def test_a_pass_at_or_under_the_trigger_does_not_count() -> None:
    control = ThrottleControl(AutoConverge())
    assert control.after_pass(dirtied=4 * MIB, sent=8 * MIB) is None  # exactly half
    assert control.after_pass(dirtied=5 * MIB, sent=8 * MIB) is None  # the first over it
    assert control.after_pass(dirtied=1 * MIB, sent=8 * MIB) is None
    assert control.after_pass(dirtied=5 * MIB, sent=8 * MIB) == 0.2  # the second over it


def test_the_throttle_never_passes_its_maximum() -> None:
    control = ThrottleControl(AutoConverge(initial=0.5, increment=0.3, maximum=0.9))
    levels = [control.after_pass(dirtied=MIB, sent=MIB) for _ in range(8)]
    assert [level for level in levels if level is not None] == [0.5, 0.8, 0.9, 0.9]


@pytest.mark.parametrize(
    "settings",
    [
        {"trigger": 0.0},
        {"trigger": 1.5},
        {"initial": 0.0},
        {"increment": 1.0},
        {"maximum": 0.995},
        {"initial": 0.5, "maximum": 0.4},
    ],
)
def test_settings_out_of_range_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="throttle"):
        AutoConverge(**settings)
