"""The papers' setups as named presets (issue 18): Imbalance-VLM (Wang et al., IJCV 2023), CPRFL (Yan et al.,
ACM MM 2024) and LIFT's classifier-only baseline (Shi et al., ICML 2024).

The data (overrides, deviations, published figures) lives in ``presets.yaml`` beside this module; this
module expands its families into presets, turns one into a `dvc exp run` command, and compares a run's
metrics with the preset's published figure. A preset only sets existing params, as `-S key=value` would.
"""

import difflib
import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ltpipe.core.errors import ConfigError

PRESETS_FILE = Path(__file__).with_name("presets.yaml")
NONE = "none"  # the `preset` param when no preset is applied
EVAL_METRICS = "metrics/eval.json"
DEFAULT_TARGETS = ("evaluate",)  # the stages a preset's experiment needs: not the sweep, not fine-tuning


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    method: str
    benchmark: str  # the dataset key its published figure is for
    backbone: str
    paper: str
    code: str
    table: str
    row: str
    overrides: Tuple[Tuple[str, Any], ...]  # dotted params key -> value, in the order applied
    deviations: Tuple[str, ...]
    published: Optional[Dict[str, float]]  # eval.json metric key -> value in percent, as the paper prints it
    source: str  # where `published` comes from, or why there is none
    reported_in: str  # the metrics file the published figure is compared with
    targets: Tuple[str, ...]  # the `dvc exp run` targets

    def value(self, key: str, default: Any = None) -> Any:
        return dict(self.overrides).get(key, default)

    @property
    def arch(self) -> Optional[str]:
        return self.value("model.arch")

    @property
    def pretrained(self) -> Optional[str]:
        return self.value("model.pretrained")


def _expand(family: str, spec: Dict) -> List[Preset]:
    out = []
    published = spec.get("published") or {}
    for method, method_spec in spec["methods"].items():
        for benchmark, bench_spec in spec["benchmarks"].items():
            for backbone, backbone_overrides in spec["backbones"].items():
                overrides: Dict[str, Any] = {}
                for layer in (spec.get("common"), bench_spec.get("overrides"), backbone_overrides,
                              method_spec.get("overrides")):
                    overrides.update(layer or {})
                figure = dict(published.get(f"{method} {benchmark} {backbone}") or {})
                source = figure.pop("source", None) or spec.get("unpublished", "")
                out.append(Preset(
                    name=f"{family}-{method}-{benchmark}-{backbone}", family=family, method=method,
                    benchmark=benchmark, backbone=backbone, paper=spec["paper"], code=spec.get("code", ""),
                    table=spec["table"], row=method_spec["row"], overrides=tuple(overrides.items()),
                    deviations=tuple(" ".join(d.split()) for d in [*(spec.get("deviations") or []),
                                                                    *(bench_spec.get("deviations") or []),
                                                                    *(method_spec.get("deviations") or [])]),
                    published={k: float(v) for k, v in figure.items()} or None, source=" ".join(source.split()),
                    reported_in=method_spec.get("reported_in", EVAL_METRICS),
                    targets=tuple(method_spec.get("targets", DEFAULT_TARGETS))))
    return out


@functools.lru_cache(maxsize=None)
def load(path: Path = PRESETS_FILE) -> Dict[str, Preset]:
    """Every preset by name."""
    data = yaml.safe_load(Path(path).read_text())
    presets = {}
    for family, spec in data["families"].items():
        for preset in _expand(family, spec):
            if preset.name in presets:
                raise AssertionError(f"{path}: two presets named {preset.name}")
            presets[preset.name] = preset
    return presets


def get(name: str) -> Preset:
    presets = load()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"there is no preset {name!r}.{hint} `python -m ltpipe presets` lists them.")
    return presets[name]


def matching(patterns: Sequence[str]) -> List[Preset]:
    """The presets whose name contains every pattern (all of them without one)."""
    return [p for p in load().values() if all(pattern in p.name for pattern in patterns)]


def check_param(value: Any) -> str:
    """The `preset` param: ``none`` or a preset's name."""
    if not isinstance(value, str):
        raise ConfigError(f"`preset` must be `{NONE}` or a preset's name, got {value!r}.")
    if value != NONE:
        get(value)
    return value


# --------------------------------------------------------------------------- the command

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")


def hydra_value(value: Any) -> str:
    """``value`` as DVC's `-S` (Hydra's override grammar) reads it back: null, true/false, numbers,
    lists, and strings quoted unless they are plain words (a quoted word stays a string: '1e-5')."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in ("null", "true", "false", "nan", "inf"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"preset value {value!r} has no -S form")


def set_params(preset: Preset) -> List[str]:
    """The `-S key=value` arguments of ``preset``; the last names the preset (evaluate compares with it)."""
    return [f"{key}={hydra_value(value)}" for key, value in preset.overrides] + [f"preset={preset.name}"]


def command(preset: Preset, queue: bool = False, name: Optional[str] = None, extra: Sequence[str] = ()) -> List[str]:
    """`dvc exp run` of ``preset``: a named experiment of its target stages; ``extra`` `-S` values come
    after the preset's, so they win."""
    cmd = ["dvc", "exp", "run", "-n", name or preset.name]
    if queue:
        cmd.append("--queue")
    for setting in [*set_params(preset), *extra]:
        cmd += ["-S", setting]
    return cmd + list(preset.targets)


def hydra_quote(argument: str) -> str:
    """``argument`` as a shell would need it typed (to print a command a user can paste)."""
    return shlex.quote(argument)


def describe(preset: Preset) -> str:
    lines = [f"{preset.name}", f"  paper:      {preset.paper}", f"  reproduces: {preset.table}, {preset.row}",
             f"  code:       {preset.code}",
             f"  benchmark:  {preset.benchmark}; backbone {preset.arch} {preset.pretrained}",
             f"  published:  {format_published(preset)}", f"  compared in {preset.reported_in}",
             "  params:"]
    lines += [f"    {key}: {hydra_value(value)}" for key, value in preset.overrides]
    lines.append("  deviations from the paper:")
    lines += [f"    - {d}" for d in preset.deviations]
    return "\n".join(lines)


def format_published(preset: Preset) -> str:
    if not preset.published:
        return f"none ({preset.source})" if preset.source else "none"
    figures = ", ".join(f"{k} {v:.2f}" for k, v in preset.published.items())
    return f"{figures} ({preset.source})"


# --------------------------------------------------------------------------- the comparison


def comparison(name: str, run: Dict, arch: Optional[str], pretrained: Optional[str], result: Dict,
               metrics_file: str) -> Optional[Dict]:
    """The ``preset`` block of a metrics file: the published figures beside ``result`` and the
    difference (both as fractions, like every metric), or why they are not compared. ``None`` when no
    preset is applied, so the metrics of a run without one stay as they were."""
    if name == NONE:
        return None
    preset = get(name)
    block = {"name": preset.name, "paper": preset.paper, "table": f"{preset.table}, {preset.row}"}
    why = _mismatch(preset, run, arch, pretrained, metrics_file)
    if why is None and not preset.published:
        why = f"no published figure: {preset.source}"
    if why is not None:
        return dict(block, compared=False, why=why)
    published = {key: round(value / 100.0, 6) for key, value in preset.published.items()}
    difference = {key: (None if result.get(key) is None else round(result[key] - value, 6))
                  for key, value in published.items()}
    return dict(block, compared=True, source=preset.source, published=published, difference=difference)


def _mismatch(preset: Preset, run: Dict, arch: Optional[str], pretrained: Optional[str],
              metrics_file: str) -> Optional[str]:
    if metrics_file != preset.reported_in:
        return f"the preset's figure is compared in {preset.reported_in}"
    if run.get("dataset") != preset.benchmark:
        return f"the run's dataset is {run.get('dataset')!r}, the published figure is on {preset.benchmark!r}"
    if (arch, pretrained) != (preset.arch, preset.pretrained):
        return (f"the run's model is {arch}/{pretrained}, the published figure is for "
                f"{preset.arch}/{preset.pretrained}")
    changed = [key for key in ("head", "loss", "sampler", "stage2") if key in dict(preset.overrides)
               and run.get(key) != preset.value(key)]
    if changed:
        return "the run changed the preset's " + ", ".join(f"`{k}` ({preset.value(k)} -> {run.get(k)})"
                                                           for k in changed)
    return None


def report(block: Optional[Dict]) -> None:
    """Print how the run compares with its preset's published figure (``block`` from :func:`comparison`)."""
    if block is None:
        return
    if not block["compared"]:
        print(f"preset {block['name']}: not compared with the paper: {block['why']}")
        return
    pairs = ", ".join(f"{key} {block['published'][key]:.4f}" + ("" if diff is None else f" ({diff:+.4f})")
                      for key, diff in block["difference"].items())
    print(f"preset {block['name']}: published {pairs} (in brackets: this run - paper); {block['source']}")
