"""Helpers shared by the store tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

S = TypeVar("S")


def opened_stores(make: Callable[..., S],
                  close: Callable[[S], object] = lambda s: s.close()) -> Iterator[Callable[..., S]]:
    """For a fixture (`yield from opened_stores(...)`): yields an opener that makes stores with `make(*args, **kw)`,
    then closes every store it made, in order."""
    opened: list[S] = []

    def open_store(*args: Any, **kw: Any) -> S:
        store = make(*args, **kw)
        opened.append(store)
        return store

    yield open_store
    for s in opened:
        close(s)
