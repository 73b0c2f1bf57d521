"""Datasets: sources, list formats, validated manifests and class tables."""

import json
from pathlib import Path

from ltpipe.config import Params
from ltpipe.data.manifest import Prepared, build, load, save
from ltpipe.data.registry import DATASETS


def dataset_name(params: Params) -> str:
    name = params.str("dataset")
    DATASETS.get(name)
    return name


def prepare(params: Params, out_dir: Path) -> Prepared:
    """Build, validate and save the manifest of the dataset named by `dataset`."""
    name = dataset_name(params)
    section = params.sub(f"datasets.{name}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = DATASETS.get(name)(name, section, out_dir)
    prepared = build(source)
    save(prepared, out_dir)
    report = {
        "dataset": name,
        "images": {s: int((prepared.manifest["split"] == s).sum()) for s in ("train", "val", "test")},
        "classes": prepared.num_classes,
        "groups": prepared.classes["group"].value_counts().sort_index().to_dict(),
        "train_count_max": int(prepared.classes["train_count"].max()),
        "train_count_min": int(prepared.classes["train_count"].min()),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return prepared


def run_stage(params: Params) -> Prepared:
    """The `prepare` stage."""
    from ltpipe import paths

    prepared = prepare(params, paths.PREPARED_DIR)
    print(f"prepared {prepared.name}: {prepared.num_classes} classes, "
          f"{prepared.manifest['split'].value_counts().to_dict()} images, "
          f"groups {prepared.classes['group'].value_counts().to_dict()}")
    return prepared


__all__ = ["DATASETS", "Prepared", "build", "load", "prepare", "save", "dataset_name"]
