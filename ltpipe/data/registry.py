"""Dataset names users type in params.yaml (`dataset:`), each with its own section
under `datasets.<name>`.

A dataset factory turns its section into a :class:`DatasetSource` (image root,
list files, class names). Generated datasets write their files under the
prepare stage's output folder first.
"""

from pathlib import Path
from typing import Callable

from ltpipe.config import Params
from ltpipe.data import synthetic
from ltpipe.data.manifest import DatasetSource, optional_path, relative_to_cwd
from ltpipe.errors import ConfigError
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
    return DatasetSource(
        name=name,
        root=root,
        lists={split: root / lists[split] for split in ("train", "val", "test")},
        classnames=root / lists["classnames"],
        multilabel=spec.multilabel,
    )


DATASETS.register("synthetic")(_synthetic)
DATASETS.register("synthetic_ml")(_synthetic)


@DATASETS.register("custom")
def _custom(name: str, section: Params, out_dir: Path) -> DatasetSource:
    """The user's own data: an image root, list files and a class-name file."""
    root_value = section.optional_str("root")
    if not root_value:
        raise ConfigError("`datasets.custom.root` is not set. Point it at the folder your list paths are relative to.")
    root = Path(root_value)
    lists = {}
    for split in ("train", "val", "test"):
        value = section.optional_str(f"{split}_list")
        if value is None:
            raise ConfigError(f"`datasets.custom.{split}_list` is not set. Give the path of the {split} list file.")
        lists[split] = optional_path(value, root)
    classnames = section.optional_str("classnames")
    if classnames is None:
        raise ConfigError("`datasets.custom.classnames` is not set. Give a file with one class name per line.")
    return DatasetSource(name, root, lists, optional_path(classnames, root), section.bool("multilabel"))
