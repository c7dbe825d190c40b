"""One registry pattern for every named thing: compression methods, structure layers, allocators,
adapter inits, analysis metrics.

    STRUCTURES = Registry("structure", package="rankwise.compression.methods")

    @STRUCTURES.register("lowrank")
    class LowRank(Method): ...

    STRUCTURES.get("lowrank")        # an unknown name raises UnknownMethodError listing the valid ones

With ``package``, the first lookup imports every module of that package, so a new entry is one new
file there (plus its test): nothing else is edited. Names keep registration order.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownMethodError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, with one lookup and one error message for every kind of named thing."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """``REG.register("name")`` as a decorator, or ``REG.register("name", obj)``."""
        def add(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownMethodError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._items)}") from None

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
