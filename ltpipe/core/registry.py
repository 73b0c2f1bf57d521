"""One registry type for every name a user types in params.yaml.

Datasets, heads, losses, samplers, stage-2 methods and fine-tuning modes each own a
:class:`Registry`. A name maps to one object (a class or factory), the frozen dataclass of its
options (:mod:`ltpipe.core.options`: the only place its defaults live) and its declared
capabilities (what input a head reads, which tasks a loss serves, ...). Every "what is valid?"
question is a query here: :meth:`Registry.names` with a capability filter.
"""

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, TypeVar

from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.core.options import NoOptions, parse

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    options: type
    capabilities: Dict[str, Any]

    def summary(self) -> str:
        """The first sentence of the registered object's docstring."""
        doc = (getattr(self.obj, "__doc__", None) or "").strip()
        paragraph = " ".join(doc.split("\n\n")[0].split())
        depth = 0  # a period inside parentheses ("Kang et al. 2020", "Sec. 4") ends no sentence
        for i, char in enumerate(paragraph):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if char == "." and depth == 0 and paragraph[i + 1:i + 2] in (" ", ""):
                return paragraph[:i + 1]
        return paragraph


class Registry(Generic[T]):
    def __init__(self, kind: str, param_key: str, section: Optional[str] = None, section_keys: Sequence[str] = ()):
        self.kind = kind
        self.param_key = param_key
        self.section = section  # the params.yaml mapping of each name's options (`heads`, `losses`, ...)
        self.section_keys = tuple(section_keys)  # other keys that mapping holds (`finetune.train`, ...)
        self._entries: Dict[str, Entry[T]] = {}

    def register(self, name: str, options: type = NoOptions, **capabilities) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, options, dict(capabilities))
            return obj

        return decorator

    def names(self, **capabilities) -> List[str]:
        """The valid names, sorted; with ``capability=value`` filters, those that declare it."""
        return sorted(n for n, e in self._entries.items()
                      if all(_matches(e.capabilities.get(k), v) for k, v in capabilities.items()))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r} (params.yaml key `{self.param_key}`). "
                f"Valid names: {', '.join(self.names())}."
            )
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def capability(self, name: str, key: str, default: Any = None) -> Any:
        return self.entry(name).capabilities.get(key, default)

    def options(self, name: str, params: Optional[Params]) -> Any:
        """The typed options of ``name`` read from its section of ``params`` (``section.<name>``);
        every default when the section is absent."""
        options_type = self.entry(name).options
        if params is None or self.section is None:
            return options_type()
        self.check_section(params)
        return parse(options_type, params.optional_sub(f"{self.section}.{name}"))

    def check_section(self, params: Params) -> None:
        """Refuse a key of the options mapping that names no registered method: `heads.cosin: {scale: 10}`
        would otherwise be ignored while `cosine` ran with its defaults."""
        section = params.optional_sub(self.section)
        unknown = sorted(set(section.data) - set(self._entries) - set(self.section_keys)) if section else []
        if unknown:
            valid = ", ".join([*self.section_keys, *self.names()])
            raise ConfigError(f"`{self.section}.{unknown[0]}` names no {self.kind}; the keys of `{self.section}`: "
                              f"{valid}. A misspelt name would otherwise be ignored.")

    def parse(self, name: str, section: Optional[Params]) -> Any:
        """The typed options of ``name`` from its own section (``None``: the defaults)."""
        return parse(self.entry(name).options, section)

    def entries(self) -> List[Entry[T]]:
        return [self._entries[n] for n in self.names()]


def _matches(declared: Any, wanted: Any) -> bool:
    """A capability filter: equal, or (for a declared tuple such as tasks) contained."""
    if isinstance(declared, (tuple, list, frozenset, set)) and not isinstance(wanted, (tuple, list)):
        return wanted in declared
    return declared == wanted


def import_package_modules(package: str, path) -> None:
    """Import every module of ``package`` (in name order). Each module registers its methods when
    imported, so adding a method is adding one file: no list of modules to keep up to date."""
    for module in sorted(info.name for info in pkgutil.iter_modules(path)):
        importlib.import_module(f"{package}.{module}")
