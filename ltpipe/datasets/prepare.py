"""The `prepare` stage: build, validate and save the manifest of the dataset named by `dataset`."""

from dataclasses import asdict, fields, make_dataclass
from pathlib import Path

from ltpipe.core.config import Params
from ltpipe.core.options import option, parse
from ltpipe.data.fingerprint import stat_cache_path
from ltpipe.data.manifest import Prepared, build, save
from ltpipe.data.source import ON_BAD_IMAGE, PrepareOptions
from ltpipe.data.validation_split import check_choices_without_validation
from ltpipe.datasets.registry import DATASETS


def dataset_name(params: Params) -> str:
    name = params.str("dataset")
    DATASETS.get(name)
    return name


# The bounds of `prepare`'s options. Their defaults are PrepareOptions's (ltpipe.data.source), written once there.
PREPARE_BOUNDS = {
    "on_bad_image": {"choices": ON_BAD_IMAGE},
    "workers": {"minimum": 0},
    "val_fraction": {"minimum": 0, "maximum": 0.9},
    "split_seed": {"minimum": 0},
}
PREPARE_OPTIONS = make_dataclass("PrepareOptionsSpec", [
    (f.name, f.type, option(f.default, **PREPARE_BOUNDS.get(f.name, {}))) for f in fields(PrepareOptions)], frozen=True)


def prepare_options(params: Params) -> PrepareOptions:
    """`prepare`'s options (a missing key takes its default; an unknown key is refused)."""
    return PrepareOptions(**asdict(parse(PREPARE_OPTIONS, params.sub("prepare"))))


def prepare(params: Params, out_dir: Path) -> Prepared:
    """Build, validate and save the manifest of the dataset named by `dataset`."""
    name = dataset_name(params)
    options = prepare_options(params)
    dataset_options = DATASETS.options(name, params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = DATASETS.get(name)(name, dataset_options, out_dir)
    prepared = build(source, options, hash_cache=stat_cache_path())
    if not prepared.split_size("val"):
        # Before extraction, not after it: the same refusals as train's and evaluate's.
        check_choices_without_validation(params, "`prepare.val_fraction` is 0" if prepared.report.get(
            "validation", {}).get("none") else "every validation image was left out")
    save(prepared, out_dir)
    return prepared


def run_stage(params: Params) -> Prepared:
    """The `prepare` stage."""
    from ltpipe.core import paths

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
    if report.get("validation", {}).get("none"):
        listed = report["validation"]["train_list_images"]
        print(f"  no validation split (prepare.val_fraction 0): every one of the {listed} listed training images "
              "trains; training keeps its last model (train.select: last)")
    elif "validation" in report:
        carve = report["validation"]
        print(f"  validation split carved from train: {carve['carved_from_train']} of {carve['train_list_images']} "
              f"images ({carve['achieved_fraction']:.3f}; prepare.val_fraction {carve['fraction']}), "
              f"{len(carve['classes_without_validation'])} class(es) without a validation image")
    if prepared.hash_stats is not None:
        stats = prepared.hash_stats
        print(f"  content hashes: {stats.read} image(s) read ({stats.bytes_read / 1e6:.1f} MB), {stats.cached} "
              f"unchanged since they were last hashed (stat cache {stat_cache_path()}), {stats.seconds:.1f}s")
    if "scan" in report:
        scan = report["scan"]
        print(f"  scanned {scan['images']} images: {scan['converted_to_rgb']} not RGB (converted at extraction), "
              f"{len(scan['bad'])} unreadable (skipped)")
        if scan["multi_frame"]:
            print(f"WARNING: {len(scan['multi_frame'])} image file(s) hold several frames (e.g. "
                  f"{', '.join(scan['multi_frame'][:3])}); only the first frame of each is used.")
    return prepared


