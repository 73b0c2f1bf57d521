"""One tiny registry type for every name a user types in params.yaml.

Datasets, heads, losses and samplers each own a :class:`Registry`. A name maps to
one factory, and ``registry.names()`` is the single answer to "what is valid?".
"""

from typing import Callable, Dict, Generic, List, TypeVar

from ltpipe.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, param_key: str):
        self.kind = kind
        self.param_key = param_key
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r} (params.yaml key `{self.param_key}`). "
                f"Valid names: {', '.join(self.names())}."
            )
        return self._entries[name]
