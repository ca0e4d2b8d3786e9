"""Build things by name: methods, datasets, backbones (timm's ``_registry`` in miniature)."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from smile_ray.errors import SmileError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> factory table whose lookups fail with a message listing the valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise SmileError(
                f"unknown {self.kind} {name!r} (choose from: {', '.join(self.names())})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
