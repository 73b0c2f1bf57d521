"""Typed options of a registered method: one frozen dataclass per name.

A method's options dataclass is the only place its defaults and bounds are written. Declare
each field with :func:`option`; :func:`parse` reads the method's params.yaml section into it
(a missing key takes the default, an unknown key is refused with the valid ones named), and
:func:`describe` lists the fields for `python -m ltpipe list` and the methods reference.
"""

import dataclasses
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence

from ltpipe.core.config import Params, check_range
from ltpipe.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without options (its params.yaml section is ``{}``)."""


def option(default: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
           above: Optional[float] = None, choices: Optional[Sequence[str]] = None,
           check: Optional[Callable[[Any], Optional[str]]] = None, doc: str = "") -> Any:
    """A field of an options dataclass. ``above`` is an exclusive minimum; ``check(value)``
    returns why a value is refused (``"must be less than 1 (...)"``) or ``None``."""
    return dataclasses.field(default=default, metadata={
        "minimum": above if above is not None else minimum, "exclusive_minimum": above is not None,
        "maximum": maximum, "choices": tuple(choices) if choices is not None else None, "check": check,
        "doc": doc})


def option_fields(options_type: type) -> List[dataclasses.Field]:
    """The fields read from params.yaml. A field declared with ``metadata={"param": False}`` is not
    one: :func:`parse` gives it the section's dotted name (for messages naming the keys)."""
    return [f for f in dataclasses.fields(options_type) if f.metadata.get("param", True)]


def _base_type(hint) -> tuple:
    """``(type, nullable)`` of a field annotation (``float``, ``Optional[float]``, ...)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def _read(section: Params, field: dataclasses.Field, hint) -> Any:
    kind, nullable = _base_type(hint)
    meta = field.metadata
    if kind is Any:  # several types (``auto`` or a count): the field's ``check`` says which values are valid
        return section.raw(field.name, field.default)
    if nullable and section.raw(field.name, field.default) is None:
        return None
    if kind is bool:
        return section.bool(field.name, default=field.default)
    if kind is int:
        return section.int(field.name, minimum=meta.get("minimum"), maximum=meta.get("maximum"),
                           default=field.default)
    if kind is float:
        return section.float(field.name, minimum=meta.get("minimum"), maximum=meta.get("maximum"),
                             exclusive_minimum=meta.get("exclusive_minimum", False), default=field.default)
    if kind is str and nullable:
        value = section.optional_str(field.name, default=field.default)  # "a string or null" when it is neither
        return section.str(field.name, choices=meta.get("choices"), default=field.default) if value else value
    if kind is str:
        return section.str(field.name, choices=meta.get("choices"), default=field.default)
    raise TypeError(f"option {field.name}: unsupported type {hint!r}")


def parse(options_type: type, section: Optional[Params]) -> Any:
    """``options_type`` filled from ``section`` (``None``: every default)."""
    if section is None:
        return options_type()
    hints = typing.get_type_hints(options_type)
    fields = option_fields(options_type)
    unknown = sorted(set(section.data) - {f.name for f in fields})
    if unknown:
        valid = ", ".join(f.name for f in fields) or "none (write `{}`)"
        raise ConfigError(f"`{section.prefix}` has no option {unknown[0]!r}; its options: {valid}. "
                          "A misspelt key would otherwise be ignored.")
    values = {f.name: section.prefix for f in dataclasses.fields(options_type) if f.metadata.get("param") is False}
    for field in fields:
        value = _read(section, field, hints[field.name])
        _check_extra(f"{section.prefix}.{field.name}", field.metadata, value)
        values[field.name] = value
    return options_type(**values)


def check(options, key: str) -> None:
    """Refuse an options object built in code (not read from params.yaml) whose values lie outside
    the bounds its fields declare; ``key`` names it in the message."""
    for field in option_fields(type(options)):
        value, meta = getattr(options, field.name), field.metadata
        if value is None or isinstance(value, (bool, str)):
            if isinstance(value, str) and meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"`{key}.{field.name}` is {value!r}; valid values: {', '.join(meta['choices'])}.")
            continue
        check_range(f"{key}.{field.name}", value, meta.get("minimum"), meta.get("maximum"),
                    meta.get("exclusive_minimum", False))
        _check_extra(f"{key}.{field.name}", meta, value)


def _check_extra(key: str, meta, value) -> None:
    """A field's own ``check`` (beyond its bounds): why ``value`` is refused, raised naming ``key``."""
    reason = meta["check"](value) if meta.get("check") and value is not None else None
    if reason:
        raise ConfigError(f"`{key}` {reason}, got {value}.")


def defaults(options_type: type) -> Dict[str, Any]:
    """The options and their defaults, as params.yaml writes them."""
    return {f.name: f.default for f in option_fields(options_type)}


def describe(options_type: type) -> List[Dict[str, Any]]:
    """One row per option: name, default, type and bounds in words, documentation."""
    hints = typing.get_type_hints(options_type)
    rows = []
    for field in option_fields(options_type):
        kind, nullable = _base_type(hints[field.name])
        meta = field.metadata
        bounds = []
        if meta.get("choices"):
            bounds.append(" | ".join(meta["choices"]))
        if meta.get("minimum") is not None:
            bounds.append(f"{'>' if meta.get('exclusive_minimum') else '>='} {meta['minimum']:g}")
        if meta.get("maximum") is not None:
            bounds.append(f"<= {meta['maximum']:g}")
        type_name = getattr(kind, "__name__", "any") + (" or null" if nullable else "")
        rows.append({"name": field.name, "default": field.default, "type": type_name,
                     "bounds": ", ".join(bounds), "doc": meta.get("doc", "")})
    return rows
