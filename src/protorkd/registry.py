"""One registry idiom for models, losses, evaluation tasks and datasets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from protorkd.errors import UsageError

T = TypeVar("T")


class UnknownNameError(UsageError, KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> object mapping whose lookup errors list the valid names.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("InfoNCE")
    ... class InfoNCE: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        folded = {key.lower(): key for key in self._entries}
        if name.lower() in folded:
            return self._entries[folded[name.lower()]]
        raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name.lower() in {k.lower() for k in self._entries})

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
