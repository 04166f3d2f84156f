"""Auto-converge: slow the writers down when they dirty memory faster than it moves.

QEMU's ``auto-converge`` capability, with its parameters' defaults. At the end of each
pass the bytes dirtied during the pass are compared with the bytes the pass put on the
wire; when the dirtied bytes exceed ``trigger`` times the sent ones for the second time,
the throttle steps up: to ``initial`` the first time, then by ``increment``, at most to
``maximum``. QEMU then makes each vCPU sleep that fraction of every 10 ms slice; here the
``throttle`` hook (:class:`~multifd.migration.precopy.Hooks`) gets the fraction and slows
the writers down its own way (:class:`multifd.pausing.ProcessThrottle` stops and continues
a process in turn).
"""

from __future__ import annotations

from dataclasses import dataclass

from multifd.errors import ConfigError


@dataclass(frozen=True)
class AutoConverge:
    """When and how hard to throttle (QEMU's parameters and their defaults).

    Attributes:
        trigger: ``throttle-trigger-threshold``: a pass is "too dirty" when it dirtied
            more than this fraction of the bytes it sent.
        initial: ``cpu-throttle-initial``: the first throttle, a fraction of the time the
            writers are held.
        increment: ``cpu-throttle-increment``: each later step.
        maximum: ``max-cpu-throttle``: the most the writers are ever held.
    """

    trigger: float = 0.5
    initial: float = 0.2
    increment: float = 0.1
    maximum: float = 0.99

    def __post_init__(self) -> None:
        if not 0 < self.trigger <= 1:
            raise ConfigError(f"throttle trigger must be in (0, 1], got {self.trigger}")
        for name in ("initial", "increment", "maximum"):
            value = getattr(self, name)
            if not 0 < value <= 0.99:
                raise ConfigError(f"throttle {name} must be in (0, 0.99], got {value}")
        if self.initial > self.maximum:
            raise ConfigError(
                f"throttle initial {self.initial} is above its maximum {self.maximum}"
            )


class ThrottleControl:
    """The throttle's state through one migration: the migration thread alone changes it;
    another thread may read :attr:`level`.

    Args:
        settings: the thresholds and steps.
    """

    def __init__(self, settings: AutoConverge) -> None:
        self.settings = settings
        self.level = 0.0  # the fraction of time the writers are held now
        self._too_dirty = 0  # passes over the trigger since the last step

    def after_pass(self, dirtied: int, sent: int) -> float | None:
        """The new throttle after a pass that dirtied ``dirtied`` bytes while it sent
        ``sent``; None when it stays as it is."""
        settings = self.settings
        if dirtied <= sent * settings.trigger:
            return None
        self._too_dirty += 1
        if self._too_dirty < 2:
            return None
        self._too_dirty = 0
        stepped = settings.initial if not self.level else self.level + settings.increment
        self.level = round(min(stepped, settings.maximum), 6)
        return self.level
