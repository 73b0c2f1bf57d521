"""Dataset names users type in params.yaml (`dataset:`), each with its own section
under `datasets.<name>`.

A dataset factory turns its section into a :class:`DatasetSource` (image root,
list files, class names). Generated datasets (``synthetic*``, ``cifar*_lt``) write
their images and lists under the prepare stage's output folder first. List and
class-name paths are relative to the dataset's ``root`` unless absolute.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ltpipe.config import Params
from ltpipe.data import cifar, synthetic
from ltpipe.data.formats import NAMES_FORMATS
from ltpipe.data.manifest import DatasetSource, optional_path, relative_to_cwd
from ltpipe.errors import ConfigError, DataError
from ltpipe.registry import Registry

DatasetFactory = Callable[[str, Params, Path], DatasetSource]
DATASETS: Registry[DatasetFactory] = Registry("dataset", "dataset")


def _synthetic(name: str, section: Params, out_dir: Path) -> DatasetSource:
    spec = synthetic.SyntheticSpec(
        classes=section.int("classes", minimum=2),
        imbalance=section.float("imbalance", minimum=1),
        max_per_class=section.int("max_per_class", minimum=1),
        val_per_class=section.int("val_per_class", minimum=1),
        test_per_class=section.int("test_per_class", minimum=1),
        image_size=section.int("image_size", minimum=16),
        seed=section.int("seed", minimum=0),
        multilabel=section.bool("multilabel"),
        max_objects=section.int("max_objects", minimum=1, default=3),
    )
    lists = synthetic.generate(spec, out_dir)
    root = relative_to_cwd(out_dir)
    return DatasetSource(name, root, {split: root / lists[split] for split in ("train", "val", "test")},
                         root / lists["classnames"], spec.multilabel)


DATASETS.register("synthetic")(_synthetic)
DATASETS.register("synthetic_ml")(_synthetic)


def _root(name: str, section: Params) -> Path:
    value = section.optional_str("root")
    if not value:
        raise ConfigError(f"`datasets.{name}.root` is not set. Point it at the folder that holds the images "
                          "(the list paths are relative to it).")
    return Path(value).expanduser()


def _listed(name: str, section: Params, multilabel: bool, names_format: str,
            expected_classes: Optional[int]) -> DatasetSource:
    root = _root(name, section)
    if not root.is_dir():
        # Checked first: a missing root would otherwise surface as a missing list or class-name file.
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"`datasets.{name}.root` is {str(root)!r}, which {problem}. Point it at the folder that "
                        "holds the dataset (its images, and its list files when they are relative).")
    lists = {}
    for split in ("train", "val", "test"):
        value = section.optional_str(f"{split}_list")
        if value is None and split != "val":
            raise ConfigError(f"`datasets.{name}.{split}_list` is not set. Give the path of the {split} list file.")
        lists[split] = optional_path(value, root)
    classnames = section.optional_str("classnames")
    if classnames is None:
        raise ConfigError(f"`datasets.{name}.classnames` is not set. Give the class-name file.")
    return DatasetSource(name, root, lists, optional_path(classnames, root), multilabel, names_format,
                         expected_classes)


@dataclass(frozen=True)
class Benchmark:
    multilabel: bool
    names_format: str
    classes: int


# The published long-tailed benchmarks. Defaults for their list files (in params.yaml)
# follow the layouts of OLTR (ImageNet-LT, Places-LT), classifier-balancing (iNat-2018)
# and the Distribution-Balanced loss (COCO-LT, VOC-LT).
BENCHMARKS = {
    "imagenet_lt": Benchmark(False, "id_name", 1000),
    "places_lt": Benchmark(False, "id_name", 365),
    "inat18": Benchmark(False, "inat_json", 8142),
    "coco_lt": Benchmark(True, "name_index", 80),
    "voc_lt": Benchmark(True, "name_index", 20),
}


def _benchmark(name: str, section: Params, out_dir: Path) -> DatasetSource:
    spec = BENCHMARKS[name]
    return _listed(name, section, spec.multilabel, spec.names_format, spec.classes)


for _name in BENCHMARKS:
    DATASETS.register(_name)(_benchmark)


def _cifar(num_classes: int):
    def factory(name: str, section: Params, out_dir: Path) -> DatasetSource:
        lists = cifar.write(_root(name, section), num_classes, section.float("imbalance", minimum=1),
                            section.int("seed", minimum=0), out_dir)
        root = relative_to_cwd(out_dir)
        return DatasetSource(name, root, {"train": root / lists["train"], "val": None, "test": root / lists["test"]},
                             root / lists["classnames"], False, "plain", num_classes)

    return factory


DATASETS.register("cifar10_lt")(_cifar(10))
DATASETS.register("cifar100_lt")(_cifar(100))


@DATASETS.register("custom")
def _custom(name: str, section: Params, out_dir: Path) -> DatasetSource:
    """The user's own data: an image root, list files and a class-name file."""
    names_format = section.str("names_format", choices=NAMES_FORMATS, default="plain")
    return _listed(name, section, section.bool("multilabel"), names_format, None)
