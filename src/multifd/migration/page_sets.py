"""Sets of pages by block, as the relay takes, holds and sends them in rounds.

A set maps a block's name to its page numbers, sorted and unique, blocks without pages
left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from multifd.migration.source import Pages
from multifd.ram import Ram

__all__ = ["Pages", "count_pages", "merge_pages", "split_pages", "take_changes"]


def take_changes(ram: Ram) -> dict[str, Pages]:
    """The pages written in each block since the last take (blocks with none left out)."""
    return {block.name: pages for block in ram if len(pages := block.take_changes())}


def merge_pages(into: dict[str, Pages], more: Mapping[str, Pages]) -> dict[str, Pages]:
    """``into`` with the pages of ``more`` added (changed in place, and returned)."""
    for name, pages in more.items():
        held = into.get(name)
        into[name] = pages if held is None else np.union1d(held, pages)
    return into


def count_pages(pages: Mapping[str, Pages]) -> int:
    """How many pages the set holds, in every block."""
    return sum(len(p) for p in pages.values())


def split_pages(
    pages: Mapping[str, Pages], limit: int
) -> tuple[dict[str, Pages], dict[str, Pages]]:
    """The first ``limit`` pages (in block order), and the rest."""
    first: dict[str, Pages] = {}
    rest: dict[str, Pages] = {}
    for name, numbers in pages.items():
        room = limit - count_pages(first)
        if room >= len(numbers):
            first[name] = numbers
        elif room > 0:
            first[name], rest[name] = numbers[:room], numbers[room:]
        else:
            rest[name] = numbers
    return first, rest
