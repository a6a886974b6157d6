"""One small generic registry: name -> object (plus metadata), glob listing, close matches.

Used for models (`zoo.models`), datasets (`zoo.data.datasets`) and methods, so that every
lookup by name fails the same helpful way:

    >>> MODELS.get("resnt50")
    ValueError: unknown model 'resnt50'; did you mean: resnet50, resnet101?
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to objects, with optional metadata for each name.

    Args:
      kind: what is registered ("model", "dataset", ...); used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._metadata: dict[str, Any] = {}

    def register(self, obj: T | None = None, *, name: str | None = None, metadata: Any = None):
        """Registers `obj` under `name` (default: its `__name__`); usable as a decorator."""

        def add(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            self._metadata[key] = metadata
            return obj

        return add if obj is None else add(obj)

    def close_matches(self, name: str, n: int = 5) -> list[str]:
        return difflib.get_close_matches(name, list(self._items), n=n, cutoff=0.5)

    def _check(self, name: str) -> None:
        if name not in self._items:
            close = self.close_matches(name)
            hint = (
                f"did you mean: {', '.join(close)}?"
                if close
                else (
                    f"known: {', '.join(sorted(self._items)[:20])}"
                    + (" ..." if len(self._items) > 20 else "")
                )
            )
            raise ValueError(f"unknown {self.kind} '{name}'; {hint}")

    def get(self, name: str) -> T:
        """Returns the object registered as `name`; ValueError with close matches otherwise."""
        self._check(name)
        return self._items[name]

    def metadata(self, name: str) -> Any:
        self._check(name)
        return self._metadata[name]

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a glob `pattern` (e.g. "resnet*")."""
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
