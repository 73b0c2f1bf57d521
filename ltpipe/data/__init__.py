"""Datasets: sources, list formats, validated manifests and class tables."""

from pathlib import Path

from ltpipe.config import Params
from ltpipe.data.manifest import ON_BAD_IMAGE, Prepared, PrepareOptions, build, load, save
from ltpipe.data.registry import DATASETS


def dataset_name(params: Params) -> str:
    name = params.str("dataset")
    DATASETS.get(name)
    return name


def prepare_options(params: Params) -> PrepareOptions:
    section = params.sub("prepare")
    return PrepareOptions(
        scan_images=section.bool("scan_images"),
        on_bad_image=section.str("on_bad_image", choices=ON_BAD_IMAGE),
        workers=section.int("workers", minimum=0),
        val_fraction=section.float("val_fraction", minimum=0, maximum=0.9, exclusive_minimum=True),
        split_seed=section.int("split_seed", minimum=0),
    )


def prepare(params: Params, out_dir: Path) -> Prepared:
    """Build, validate and save the manifest of the dataset named by `dataset`."""
    name = dataset_name(params)
    options = prepare_options(params)
    section = params.sub(f"datasets.{name}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = DATASETS.get(name)(name, section, out_dir)
    prepared = build(source, options)
    save(prepared, out_dir)
    return prepared


def run_stage(params: Params) -> Prepared:
    """The `prepare` stage."""
    from ltpipe import paths

    prepared = prepare(params, paths.PREPARED_DIR)
    report = prepared.report
    print(f"prepared {prepared.name}: {prepared.num_classes} classes, images {report['images']}, "
          f"groups {report['groups']}")
    if "validation" in report:
        print(f"  validation split carved from train: {report['validation']['carved_from_train']} images")
    if "scan" in report:
        scan = report["scan"]
        print(f"  scanned {scan['images']} images: {scan['converted_to_rgb']} not RGB (converted at extraction), "
              f"{len(scan['bad'])} unreadable (skipped)")
    return prepared


__all__ = ["DATASETS", "Prepared", "PrepareOptions", "build", "dataset_name", "load", "prepare", "prepare_options",
           "save"]
