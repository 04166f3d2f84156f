"""The ``faults`` marker: the full fault matrix runs only when asked for (``pytest -m faults``).

Registered here so the directory works before the project configuration names it; items
with the marker are deselected unless the ``-m`` expression mentions ``faults``.
"""

from __future__ import annotations

import pytest

MARKER = "faults"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: the full fault-injection matrix (make faults)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if MARKER in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker(MARKER) is None]
    dropped = [item for item in items if item.get_closest_marker(MARKER) is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
