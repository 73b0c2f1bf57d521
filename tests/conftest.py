import os
from pathlib import Path

import pytest
import torch

from ltpipe.data.manifest import DatasetSource, build
from ltpipe.data.synthetic import SyntheticSpec, generate

REPO = Path(__file__).resolve().parents[1]
# A dataset small enough to extract in a second with the tiny model.
TINY = dict(classes=6, imbalance=10, max_per_class=40, val_per_class=4, test_per_class=6, image_size=32, seed=0)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_source(root: Path, multilabel: bool = False, **overrides) -> DatasetSource:
    spec = SyntheticSpec(**dict(TINY, multilabel=multilabel, **overrides))
    lists = generate(spec, root)
    return DatasetSource("synthetic_ml" if multilabel else "synthetic", root,
                         {s: root / lists[s] for s in ("train", "val", "test")}, root / lists["classnames"], multilabel)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_prepared(tiny_source):
    return build(tiny_source)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    from ltpipe.features import models
    return models.resolve("ltpipe-tiny", None, tmp_path_factory.mktemp("weights"), init_seed=0)


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory, tiny_prepared, tiny_weights):
    from ltpipe.features import extract
    out = tmp_path_factory.mktemp("features")
    options = extract.ExtractOptions(batch_size=16, workers=0)
    extract.run(tiny_prepared, tiny_weights, options, out, torch.device("cpu"), "fp32")
    return out
