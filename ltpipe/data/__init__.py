"""Datasets: sources, list formats, validated manifests and class tables."""

from pathlib import Path

from ltpipe.config import Params
from ltpipe.data.fingerprint import STAT_CACHE
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
        allow_links_outside_root=section.bool(
            "allow_links_outside_root", default=PrepareOptions.allow_links_outside_root),
        drop_classes_without_training=section.bool(
            "drop_classes_without_training", default=PrepareOptions.drop_classes_without_training),
    )


def prepare(params: Params, out_dir: Path) -> Prepared:
    """Build, validate and save the manifest of the dataset named by `dataset`."""
    name = dataset_name(params)
    options = prepare_options(params)
    section = params.sub(f"datasets.{name}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = DATASETS.get(name)(name, section, out_dir)
    prepared = build(source, options, hash_cache=STAT_CACHE)
    save(prepared, out_dir)
    return prepared


def run_stage(params: Params) -> Prepared:
    """The `prepare` stage."""
    from ltpipe import paths

    prepared = prepare(params, paths.PREPARED_DIR)
    report = prepared.report
    print(f"prepared {prepared.name}: {prepared.num_classes} classes, images {report['images']}, "
          f"groups {report['groups']}")
    for repeat in report.get("repeated_prompts", []):
        print(f"WARNING: classes {repeat['classes'][0]} and {repeat['classes'][1]} ({', '.join(repeat['ids'])}) share "
              f"CLIP's curated prompt {repeat['prompt']!r}: zero-shot (and any head initialised from the text "
              "embeddings) cannot tell them apart. Kept as CLIP published it, for comparable zero-shot figures.")
    for dropped in report.get("dropped_classes", []):
        print(f"WARNING: class {dropped['name']!r} (id {dropped['id']}) has no training image and was dropped "
              f"(prepare.drop_classes_without_training): its labels on {dropped.get('val_images', 0)} validation "
              f"and {dropped['test_images']} test image(s) are left out, and so is the class from the metrics.")
    if "validation" in report:
        carve = report["validation"]
        print(f"  validation split carved from train: {carve['carved_from_train']} of {carve['train_list_images']} "
              f"images ({carve['achieved_fraction']:.3f}; prepare.val_fraction {carve['fraction']}), "
              f"{len(carve['classes_without_validation'])} class(es) without a validation image")
    if prepared.hash_stats is not None:
        stats = prepared.hash_stats
        print(f"  content hashes: {stats.read} image(s) read ({stats.bytes_read / 1e6:.1f} MB), {stats.cached} "
              f"unchanged since the last prepare (stat cache {STAT_CACHE}), {stats.seconds:.1f}s")
    if "scan" in report:
        scan = report["scan"]
        print(f"  scanned {scan['images']} images: {scan['converted_to_rgb']} not RGB (converted at extraction), "
              f"{len(scan['bad'])} unreadable (skipped)")
        if scan["multi_frame"]:
            print(f"WARNING: {len(scan['multi_frame'])} image file(s) hold several frames (e.g. "
                  f"{', '.join(scan['multi_frame'][:3])}); only the first frame of each is used.")
    return prepared


__all__ = ["DATASETS", "Prepared", "PrepareOptions", "build", "dataset_name", "load", "prepare", "prepare_options",
           "save"]
