"""Dataset names users type in params.yaml (`dataset:`), each with its options under `datasets.<name>`.

A name is registered with its options dataclass (:mod:`ltpipe.core.options`: the only place its
defaults and bounds live) and its capabilities: the ``tasks`` it serves with its default options
and its ``source`` (``generated`` from a seed, built from an ``archive``, or read from ``lists``).
A dataset factory turns its typed options into a :class:`DatasetSource` (image root, list files,
class names). Generated and archive datasets (``synthetic*``, ``cifar*_lt``) write their images
and lists under the prepare stage's output folder first. List and class-name paths are relative
to the dataset's ``root`` unless absolute.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ltpipe.core.errors import ConfigError, DataError
from ltpipe.core.options import option
from ltpipe.core.registry import Registry
from ltpipe.data.formats import NAMES_FORMATS
from ltpipe.data.source import DatasetSource, optional_path, relative_to_cwd
from ltpipe.datasets import cifar, synthetic

DatasetFactory = Callable[[str, Any, Path], DatasetSource]  # (name, typed options, output folder)
DATASETS: Registry[DatasetFactory] = Registry("dataset", "dataset", section="datasets")

ROOT_DOC = "folder of the images; list and class-name paths are relative to it unless absolute"


def register(name: str, options: type, *, tasks: tuple, source: str):
    """Register a dataset factory under ``name`` with its options dataclass and capabilities:
    ``tasks`` (``single``, ``multi``) and ``source`` (``generated``, ``archive`` or ``lists``; an
    ``archive`` dataset's factory names the archive's files: ``factory.archive_files(root) -> [Path]``)."""
    return DATASETS.register(name, options, tasks=tasks, source=source)


def _synthetic_options(class_name: str, omit: tuple = (), **defaults) -> type:
    """The fields of :class:`~ltpipe.datasets.synthetic.SyntheticSpec` (its bounds, and its defaults unless
    ``defaults`` changes them), less ``omit``."""
    fields = [(f.name, f.type, dataclasses.field(default=defaults.pop(f.name, f.default), metadata=f.metadata))
              for f in dataclasses.fields(synthetic.SyntheticSpec) if f.name not in omit]
    if defaults:
        raise TypeError(f"{class_name}: SyntheticSpec has no field {sorted(defaults)[0]!r}")
    return dataclasses.make_dataclass(class_name, fields, frozen=True)


def _synthetic(name: str, options, out_dir: Path) -> DatasetSource:
    """Coloured, patterned shapes drawn from a seed, long-tailed (embedded: nothing to download)."""
    spec = synthetic.SyntheticSpec(**dataclasses.asdict(options))
    lists = synthetic.generate(spec, out_dir)
    root = relative_to_cwd(out_dir)
    return DatasetSource(name, root, {split: root / lists[split] if split in lists else None
                                      for split in ("train", "val", "test")},
                         root / lists["classnames"], spec.multilabel)


# params.yaml's `synthetic` section has no `max_objects` (a single-label default): it takes SyntheticSpec's.
register("synthetic", _synthetic_options("SyntheticOptions", omit=("max_objects",)), tasks=("single",),
         source="generated")(_synthetic)
register("synthetic_ml", _synthetic_options("SyntheticMultiLabelOptions", classes=20, imbalance=50.0,
                                            max_per_class=250, multilabel=True),
         tasks=("multi",), source="generated")(_synthetic)


def _root(name: str, options) -> Path:
    if not options.root:
        raise ConfigError(f"`datasets.{name}.root` is not set. Point it at the folder that holds the images "
                          "(the list paths are relative to it).")
    return Path(options.root).expanduser()


def _listed(name: str, options, multilabel: bool, names_format: str,
            expected_classes: Optional[int]) -> DatasetSource:
    root = _root(name, options)
    if not root.is_dir():
        # Checked first: a missing root would otherwise surface as a missing list or class-name file.
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"`datasets.{name}.root` is {str(root)!r}, which {problem}. Point it at the folder that "
                        "holds the dataset (its images, and its list files when they are relative).")
    lists = {}
    for split in ("train", "val", "test"):
        value = getattr(options, f"{split}_list")
        if value is None and split != "val":
            raise ConfigError(f"`datasets.{name}.{split}_list` is not set. Give the path of the {split} list file.")
        lists[split] = optional_path(value, root)
    if options.classnames is None:
        raise ConfigError(f"`datasets.{name}.classnames` is not set. Give the class-name file.")
    return DatasetSource(name, root, lists, optional_path(options.classnames, root), multilabel, names_format,
                         expected_classes)


def _listed_options(class_name: str, train_list: Optional[str], val_list: Optional[str], test_list: Optional[str],
                    classnames: Optional[str], *extra) -> type:
    """The options of a dataset read from list files: ``root`` (required at use) and the files' paths."""
    return dataclasses.make_dataclass(class_name, [
        ("root", Optional[str], option(None, doc=ROOT_DOC)),
        ("train_list", Optional[str], option(train_list, doc="list file of the training split")),
        ("val_list", Optional[str], option(val_list, doc="list file of the validation split; null: carved from "
                                                         "train (prepare.val_fraction)")),
        ("test_list", Optional[str], option(test_list, doc="list file of the test split")),
        ("classnames", Optional[str], option(classnames, doc="class-name file")),
        *extra], frozen=True)


@dataclass(frozen=True)
class Benchmark:
    """A published long-tailed benchmark: what is fixed about it, and its default files (relative to `root`)."""

    multilabel: bool
    names_format: str
    classes: int
    train_list: str
    val_list: Optional[str]
    test_list: str
    classnames: str


# The list-file layouts are those of OLTR (ImageNet-LT, Places-LT), classifier-balancing
# (iNat-2018, whose val list is the test set) and the Distribution-Balanced loss (COCO-LT, VOC-LT).
BENCHMARKS = {
    "imagenet_lt": Benchmark(False, "id_name", 1000, "ImageNet_LT_train.txt", "ImageNet_LT_val.txt",
                             "ImageNet_LT_test.txt", "classnames.txt"),
    "places_lt": Benchmark(False, "id_name", 365, "Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt",
                           "classnames.txt"),
    "inat18": Benchmark(False, "inat_json", 8142, "iNaturalist18_train.txt", None, "iNaturalist18_val.txt",
                        "categories.json"),
    "coco_lt": Benchmark(True, "name_index", 80, "coco_lt_train.txt", None, "coco_lt_test.txt", "coco_labels.txt"),
    "voc_lt": Benchmark(True, "name_index", 20, "voc_lt_train.txt", None, "voc_lt_test.txt", "voc_labels.txt"),
}


def _benchmark(name: str, options, out_dir: Path) -> DatasetSource:
    """A published benchmark read from its list files under `root`."""
    spec = BENCHMARKS[name]
    return _listed(name, options, spec.multilabel, spec.names_format, spec.classes)


for _name, _spec in BENCHMARKS.items():
    register(_name, _listed_options(_name.title().replace("_", "") + "Options", _spec.train_list, _spec.val_list,
                                    _spec.test_list, _spec.classnames),
             tasks=("multi",) if _spec.multilabel else ("single",), source="lists")(_benchmark)


@dataclass(frozen=True)
class CifarOptions:
    root: Optional[str] = option(None, doc="folder holding the python archive's folder (cifar-10-batches-py/, "
                                           "cifar-100-python/)")
    imbalance: float = option(100.0, minimum=1, doc="n_max / n_min of the training split (LDAM-DRW's rule)")
    seed: int = option(0, minimum=0, doc="which images of each class are kept")


def _cifar(num_classes: int):
    def factory(name: str, options: CifarOptions, out_dir: Path) -> DatasetSource:
        lists = cifar.write(_root(name, options), num_classes, options.imbalance, options.seed, out_dir)
        root = relative_to_cwd(out_dir)
        return DatasetSource(name, root, {"train": root / lists["train"], "val": None, "test": root / lists["test"]},
                             root / lists["classnames"], False, "plain", num_classes)

    factory.__doc__ = f"CIFAR-{num_classes}-LT, built from the CIFAR-{num_classes} python archive."
    factory.archive_files = lambda root: cifar.archive_files(root, num_classes)  # what `inputs` fingerprints
    return factory


register("cifar10_lt", CifarOptions, tasks=("single",), source="archive")(_cifar(10))
register("cifar100_lt", CifarOptions, tasks=("single",), source="archive")(_cifar(100))

CustomOptions = _listed_options(
    "CustomOptions", None, None, None, None,
    ("names_format", str, option("plain", choices=NAMES_FORMATS, doc="format of the class-name file")),
    ("multilabel", bool, option(False, doc="list lines carry several labels")))


@register("custom", CustomOptions, tasks=("single", "multi"), source="lists")
def _custom(name: str, options, out_dir: Path) -> DatasetSource:
    """The user's own data: an image root, list files and a class-name file."""
    return _listed(name, options, options.multilabel, options.names_format, None)


@dataclass(frozen=True)
class DatasetInputs:
    """What a dataset reads from outside the repository: the `inputs` stage's fingerprint covers it."""

    root: Path
    files: Dict[str, Path]  # read whole, by role: the list and class-name files, or the archive's files
    lists: Dict[str, Path]  # split -> its list file: every image it lists is an input too
    multilabel: bool = False


def dataset_inputs(name: str, options) -> Optional[DatasetInputs]:
    """The files ``name`` reads with ``options``; None for a dataset generated from its options alone.
    Reads nothing: a `lists` dataset's factory only names its files, an `archive` one names them here."""
    source = DATASETS.capability(name, "source")
    if source == "generated":
        return None
    if source == "archive":
        root = _root(name, options)
        return DatasetInputs(root, {path.name: path for path in DATASETS.get(name).archive_files(root)}, {})
    listed = DATASETS.get(name)(name, options, None)
    lists = {split: path for split, path in listed.lists.items() if path is not None}
    return DatasetInputs(Path(listed.root), {**{f"{split}_list": path for split, path in lists.items()},
                                             "classnames": listed.classnames}, lists, listed.multilabel)
