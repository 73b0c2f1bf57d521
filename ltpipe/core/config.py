"""Load params.yaml and read typed, validated values from it.

Stage scripts read parameters only through :class:`Params`, so a wrong type, a
missing key or an out-of-range value fails before any work is done, with a
message naming the key and what it should be.
"""

import math
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

from ltpipe.core.errors import ConfigError

_MISSING = object()


class _NoAnchorLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases.

    ``dvc exp run -S`` rewrites params.yaml without re-propagating anchors
    (treeverse/dvc#10984), so an alias would silently keep a stale value.
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise ConfigError(
                f"params.yaml uses a YAML {kind}{anchor} at line {event.start_mark.line + 1}. "
                "DVC's `-S` does not update aliases; write every value out in full."
            )
        return super().compose_node(parent, index)


def load_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found. Run the stage from the repository root, where params.yaml lives.")
    with open(path) as fh:
        data = yaml.load(fh, Loader=_NoAnchorLoader)  # noqa: S506 - a SafeLoader subclass
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of parameters at the top level.")
    return data


class Params:
    """Typed, dotted-key access to params.yaml; messages name the full dotted key."""

    def __init__(self, data: dict, source: str = "params.yaml", prefix: str = ""):
        self.data = data
        self.source = source
        self.prefix = prefix

    @classmethod
    def load(cls, path: Union[str, Path] = "params.yaml") -> "Params":
        return cls(load_yaml(path), str(path))

    def _full(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not _MISSING:
                    return default
                raise ConfigError(
                    f"{self.source} has no key `{self._full(key)}`. Add it; the repository's "
                    "params.yaml lists every key with its default."
                )
            node = node[part]
        return node

    def str(self, key: str, choices: Optional[Iterable[str]] = None, default: Any = _MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"`{self._full(key)}` must be a string, got {value!r} ({type(value).__name__}).")
        if choices is not None and value not in choices:
            raise ConfigError(f"`{self._full(key)}` is {value!r}; valid values: {', '.join(sorted(choices))}.")
        return value

    def optional_str(self, key: str, default: Any = _MISSING) -> Optional[str]:
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(
                f"`{self._full(key)}` must be a string or null, got {value!r} ({type(value).__name__})."
            )
        return value

    def int(self, key: str, minimum: Optional[int] = None, maximum: Optional[int] = None,
            default: Any = _MISSING) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{self._full(key)}` must be an integer, got {value!r} ({type(value).__name__}).")
        check_range(self._full(key), value, minimum, maximum)
        return value

    def float(self, key: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
              exclusive_minimum: bool = False, default: Any = _MISSING) -> float:
        value = self.raw(key, default)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; users type it, so accept it.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{self._full(key)}` must be a number, got {value!r} ({type(value).__name__}).")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"`{self._full(key)}` must be a finite number, got {value}.")
        check_range(self._full(key), value, minimum, maximum, exclusive_minimum)
        return value

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"`{self._full(key)}` must be true or false, got {value!r}.")
        return value

    def sub(self, key: str) -> "Params":
        value = self.raw(key)
        if not isinstance(value, dict):
            raise ConfigError(f"`{self._full(key)}` must be a mapping, got {value!r}.")
        return Params(value, self.source, self._full(key))

    def optional_sub(self, key: str) -> Optional["Params"]:
        """A method's options section (`losses.<name>`, ...): ``None`` when absent or null, so
        the method's defaults apply; an error when it is there but not a mapping."""
        value = self.raw(key, None)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"`{self._full(key)}` must be a mapping of options (e.g. `{{}}`), got {value!r}.")
        return Params(value, self.source, self._full(key))


def check_range(key: str, value, minimum, maximum, exclusive_minimum: bool = False) -> None:
    """Refuse ``value`` of key ``key`` outside ``[minimum, maximum]`` (``(minimum, ...`` if exclusive)."""
    if exclusive_minimum and minimum is not None and value <= minimum:
        raise ConfigError(f"`{key}` must be greater than {minimum}, got {value}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"`{key}` must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ConfigError(f"`{key}` must be at most {maximum}, got {value}.")
