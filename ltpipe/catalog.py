"""What a user can type: every registered name with its tasks, capabilities and options.

`python -m ltpipe list [heads|losses|samplers|stage2|datasets|finetune]` prints it;
`python -m ltpipe list --markdown --write docs/methods.md` regenerates the methods reference
between its GENERATED markers (a test keeps that block equal to this output).
"""

import importlib
from pathlib import Path
from typing import Dict, List, Tuple

from ltpipe.core.errors import ConfigError
from ltpipe.core.options import describe

# kind -> (module holding the registry, registry attribute, params.yaml key of the choice, section of options)
KINDS: Dict[str, Tuple[str, str, str, str]] = {
    "heads": ("ltpipe.heads", "HEADS", "head", "heads"),
    "losses": ("ltpipe.losses", "LOSSES", "loss", "losses"),
    "samplers": ("ltpipe.training.samplers", "SAMPLERS", "sampler", ""),
    "stage2": ("ltpipe.training.stage2", "STAGE2", "stage2", "stage2_methods"),
    "datasets": ("ltpipe.datasets.registry", "DATASETS", "dataset", "datasets"),
    "finetune": ("ltpipe.finetune.modes", "MODES", "finetune.modes", "finetune"),
}
BEGIN = "<!-- BEGIN GENERATED: python -m ltpipe list --markdown -->"
END = "<!-- END GENERATED -->"


def registry(kind: str):
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; one of: {', '.join(KINDS)}.")
    module, attribute, _, _ = KINDS[kind]
    return getattr(importlib.import_module(module), attribute)


def _capabilities(caps: Dict) -> str:
    words = []
    for key, value in sorted(caps.items()):
        if isinstance(value, (list, tuple)):
            words.append(f"{key}: {', '.join(map(str, value))}")
        elif value is True:
            words.append(key.replace("_", " "))
        elif value not in (False, None):
            words.append(f"{key}: {value}")
    return "; ".join(words)


def _value(value) -> str:
    """A default as params.yaml writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def text(kinds: List[str]) -> str:
    lines = []
    for kind in kinds:
        reg = registry(kind)
        _, _, key, section = KINDS[kind]
        lines.append(f"{kind} (params.yaml `{key}`" + (f"; options under `{section}.<name>`)" if section else ")"))
        for entry in reg.entries():
            lines.append(f"  {entry.name:<14} {entry.summary()}")
            caps = _capabilities(entry.capabilities)
            if caps:
                lines.append(f"  {'':<14} [{caps}]")
            for row in describe(entry.options):
                bounds = f" ({row['bounds']})" if row["bounds"] else ""
                doc = f": {row['doc']}" if row["doc"] else ""
                lines.append(f"  {'':<16}{row['name']} = {_value(row['default'])}  {row['type']}{bounds}{doc}")
        lines.append("")
    return "\n".join(lines)


def _cell(value: str) -> str:
    return value.replace("|", "\\|")


def _markdown_option(row: Dict) -> str:
    bounds = f", {row['bounds']}" if row["bounds"] else ""
    doc = f": {row['doc']}" if row["doc"] else ""
    return f"`{row['name']}` = `{_value(row['default'])}` ({row['type']}{bounds}){doc}"


def markdown(kinds: List[str]) -> str:
    out = []
    for kind in kinds:
        reg = registry(kind)
        _, _, key, section = KINDS[kind]
        where = f"; options under `{section}.<name>`" if section else ""
        out += [f"### {kind}", "", f"Chosen with `{key}`{where}.", "",
                "| name | what it is | capabilities | options (default) |", "|---|---|---|---|"]
        for entry in reg.entries():
            options = "<br>".join(_markdown_option(row) for row in describe(entry.options)) or "none"
            out.append(f"| `{entry.name}` | {_cell(entry.summary())} | {_cell(_capabilities(entry.capabilities))} | "
                       f"{_cell(options)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_block(path: Path, block: str) -> None:
    """Replace the text between the GENERATED markers of ``path`` with ``block``."""
    document = path.read_text()
    if BEGIN not in document or END not in document:
        raise ConfigError(f"{path} has no `{BEGIN}` ... `{END}` block to fill.")
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")


def generated_block(path: Path) -> str:
    document = path.read_text()
    return document.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")
