"""``wire/`` and ``compression/`` are sans-IO: no sockets, threads, clocks, files or processes.

The check reads the source with ``ast`` (nothing is imported), so a banned import inside a
function or behind ``if TYPE_CHECKING`` is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "multifd"
SANS_IO_PACKAGES = ("wire", "compression")
BANNED = frozenset(
    {"socket", "threading", "time", "os", "select", "selectors", "mmap", "subprocess"}
)
# Project modules a sans-IO module may lean on: the error types and its sans-IO siblings.
ALLOWED_INTERNAL = ("multifd.errors", "multifd.wire", "multifd.compression")


def sans_io_files() -> list[Path]:
    files = sorted(path for package in SANS_IO_PACKAGES for path in (SRC / package).rglob("*.py"))
    assert files, f"no sources found under {SRC}"
    return files


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            assert node.module is not None
            found.append((node.lineno, node.module))
            # `from multifd import x` names a module too; check it as multifd.x.
            if node.module == "multifd":
                found.extend((node.lineno, f"multifd.{alias.name}") for alias in node.names)
    return found


def test_the_scan_sees_the_codec_modules() -> None:
    names = {path.relative_to(SRC).as_posix() for path in sans_io_files()}
    assert {"wire/packets.py", "wire/stream.py", "compression/__init__.py"} <= names


@pytest.mark.parametrize("path", sans_io_files(), ids=lambda p: p.relative_to(SRC).as_posix())
def test_no_io_imports(path: Path) -> None:
    offenders = [
        f"{path.name}:{line}: {module}"
        for line, module in imported_modules(path)
        if module.split(".")[0] in BANNED
    ]
    assert not offenders, f"sans-IO module imports I/O: {offenders}"


@pytest.mark.parametrize("path", sans_io_files(), ids=lambda p: p.relative_to(SRC).as_posix())
def test_only_lower_layers_are_imported(path: Path) -> None:
    offenders = [
        f"{path.name}:{line}: {module}"
        for line, module in imported_modules(path)
        if module.startswith("multifd.")
        and not any(module == ok or module.startswith(f"{ok}.") for ok in ALLOWED_INTERNAL)
    ]
    assert not offenders, f"sans-IO module imports an upper layer: {offenders}"


def test_the_scan_would_catch_a_banned_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import time\n    from os import path\n")
    assert [module for _line, module in imported_modules(sample)] == ["time", "os"]
