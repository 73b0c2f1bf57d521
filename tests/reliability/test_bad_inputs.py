"""Reliability (issue 9): bad lists and params.

Each bad input goes through the stage entry the user hits (the `run_stage` functions
the DVC stages call, in a scratch directory with its own params.yaml). It must fail
with an :class:`~ltpipe.core.errors.LtpipeError` whose message names the problem (the
offending value, key, path or line) and the fix, before any expensive work: the
expensive step is patched to raise, and no output of the stage may be written.

A case may hold several variants of its defect; all are run and every shortfall is
reported together. The messages are printed (``pytest -s`` shows them).
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from ltpipe.core.config import Params
from ltpipe.core.errors import LtpipeError, user_message
from ltpipe.data import manifest
from ltpipe.datasets import prepare as prepare_stage
from ltpipe.datasets import registry
from ltpipe.evaluation import evaluate as evaluation
from ltpipe.features import extract, models, store
from ltpipe.training import loop as training
from tests.conftest import make_source
from tests.dvc_repo import small_params

LIST_FILES = ("train.txt", "val.txt", "test.txt", "classnames.txt")


# ---------------------------------------------------------------- helpers


def expensive(what):
    def started(*args, **kwargs):
        raise AssertionError(f"expensive work started ({what}) before the bad input was refused")

    return started


def set_key(params: dict, dotted: str, value) -> dict:
    node = params
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return params


def write_params(params: dict) -> None:
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _found(expected, message: str) -> bool:
    if isinstance(expected, re.Pattern):
        return expected.search(message) is not None
    return expected in message


class Case:
    """One bad-input case: its variants, each run in its own scratch directory."""

    def __init__(self, request, tmp_path: Path, monkeypatch):
        self.request = request
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.shortfalls = []
        self.messages = []

    # --- scratch directories

    def _enter(self, name: str) -> Path:
        ws = self.tmp_path / name / "ws"
        ws.parent.mkdir(parents=True, exist_ok=True)
        ws.mkdir()
        self.monkeypatch.chdir(ws)
        return ws

    def custom(self, name: str, edit=None, dataset: str = "custom", names_lines=None) -> tuple:
        """A directory whose params name the user's own data (the tiny synthetic images, as
        `dataset: custom`), with copies of the lists that ``edit(lists_dir)`` may break.
        ``prepare.scan_images`` is on and the scan patched to raise: validation must come first."""
        image_root = self.request.getfixturevalue("image_root")
        lists = self.tmp_path / name / "lists"
        lists.mkdir(parents=True)
        for file in LIST_FILES:
            shutil.copy(image_root / file, lists / file)
        if names_lines is not None:
            (lists / "classnames.txt").write_text("\n".join(names_lines) + "\n")
        if edit is not None:
            edit(lists)
        self._enter(name)
        params = small_params()
        params["dataset"] = dataset
        params["datasets"][dataset].update(
            root=str(image_root), train_list=str(lists / "train.txt"), val_list=str(lists / "val.txt"),
            test_list=str(lists / "test.txt"), classnames=str(lists / "classnames.txt"))
        params["prepare"]["scan_images"] = True
        write_params(params)
        self.monkeypatch.setattr(manifest, "scan", expensive("image scan"))
        return params, lists

    def fresh(self, name: str, params: dict) -> Path:
        ws = self._enter(name)
        write_params(params)
        return ws

    def built_copy(self, name: str, params: dict = None, drop=()) -> Path:
        """A copy of a workspace where weights, prepare, extract and train ran, with ``params``."""
        built = self.request.getfixturevalue("built")
        ws = self.tmp_path / name / "ws"
        shutil.copytree(built, ws)
        self.monkeypatch.chdir(ws)
        for path in drop:
            shutil.rmtree(path)
        write_params(params if params is not None else small_params())
        return ws

    # --- the check

    def refused(self, label: str, stage, problem, fix, absent=()) -> None:
        """``stage(Params.load())`` must raise an LtpipeError naming every ``problem`` and ``fix``
        item (substring or regex) and write nothing matching ``absent`` (globs)."""
        try:
            stage(Params.load())
        except LtpipeError as exc:
            message = user_message(exc)
            self.messages.append((label, type(exc).__name__, message))
            print(f"\n[{label}] {type(exc).__name__}: {message}")
            missing = [str(p.pattern if isinstance(p, re.Pattern) else p) for p in problem if not _found(p, message)]
            if missing:
                self.shortfalls.append(f"{label}: the message does not name the problem {missing}: {message}")
            missing = [str(p.pattern if isinstance(p, re.Pattern) else p) for p in fix if not _found(p, message)]
            if missing:
                self.shortfalls.append(f"{label}: the message does not give the fix {missing}: {message}")
        except Exception as exc:  # noqa: BLE001 - anything but an LtpipeError is a shortfall
            print(f"\n[{label}] {type(exc).__name__}: {exc}")
            self.shortfalls.append(
                f"{label}: raised {type(exc).__name__} instead of an LtpipeError: {' '.join(str(exc).split())[:400]}")
        else:
            print(f"\n[{label}] no error")
            self.shortfalls.append(f"{label}: no error; the bad input was accepted")
        written = sorted(str(p) for pattern in absent for p in Path().glob(pattern))
        if written:
            self.shortfalls.append(f"{label}: the stage wrote outputs before failing: {written}")

    def verdict(self) -> None:
        assert not self.shortfalls, "\n".join(self.shortfalls)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """The user's own data: tiny synthetic images with `relative/path label` lists and a
    plain class-name file (6 classes)."""
    root = tmp_path_factory.mktemp("images")
    make_source(root)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """weights, prepare, extract, text and train run on the small synthetic dataset."""
    ws = tmp_path_factory.mktemp("built")
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        write_params(small_params())
        params = Params.load()
        models.run_stage(params)
        prepare_stage.run_stage(params)
        extract.run_stage(params)
        extract.run_text_stage(params)
        training.run_stage(params)
    finally:
        os.chdir(cwd)
    assert (ws / "data/models/head.pt").is_file()
    return ws


PREPARED = ("data/prepared/*.csv", "data/prepared/*.json")
MODELS = ("data/models/*",)
FEATURES = ("data/features/*.h5",)


def train_refuses(case: Case, label: str, key: str, value, problem, fix) -> None:
    case.built_copy(label, set_key(small_params(), key, value), drop=["data/models"])
    case.monkeypatch.setattr(store.SplitFeatures, "__init__", expensive("feature cache read"))
    case.refused(label, training.run_stage, problem, fix, absent=MODELS)


# ---------------------------------------------------------------- cases


def label_out_of_range(case: Case) -> None:
    state = {}

    def bad_train_label(lists):
        lines = (lists / "train.txt").read_text().splitlines()
        state["train"] = rel = lines[-1].split()[0]
        lines[-1] = f"{rel} 6"  # 6 classes: labels 0..5
        (lists / "train.txt").write_text("\n".join(lines) + "\n")

    _, lists = case.custom("train_label_6", bad_train_label)
    case.refused("label 6 in train", prepare_stage.run_stage,
                 problem=[str(lists / "train.txt"), "label 6", state["train"]],
                 fix=["0..5", "`classnames`"], absent=PREPARED)

    def negative_test_label(lists):
        lines = (lists / "test.txt").read_text().splitlines()
        state["test"] = rel = lines[0].split()[0]
        lines[0] = f"{rel} -1"
        (lists / "test.txt").write_text("\n".join(lines) + "\n")

    _, lists = case.custom("test_label_negative", negative_test_label)
    case.refused("label -1 in test", prepare_stage.run_stage,
                 problem=[str(lists / "test.txt"), "label -1", state["test"]],
                 fix=["0..5", "`classnames`"], absent=PREPARED)


def class_count_mismatch(case: Case) -> None:
    image_root = case.request.getfixturevalue("image_root")
    names = (image_root / "classnames.txt").read_text().splitlines()

    _, lists = case.custom("names_file_short", names_lines=names[:-1])
    case.refused("names file with 5 of 6 classes", prepare_stage.run_stage,
                 problem=[str(lists / "classnames.txt"), re.compile(r"\b5 classes")],
                 fix=["`classnames`"], absent=PREPARED)

    _, lists = case.custom("names_file_long", names_lines=names + ["violet hexagon"])
    case.refused("names file with 7 classes, lists use 6", prepare_stage.run_stage,
                 problem=[str(lists / "classnames.txt"), re.compile(r"\b7 classes"), "violet hexagon"],
                 fix=[re.compile(r"same classes|`classnames`")], absent=PREPARED)

    # A benchmark whose names file is not its own: Places-LT has 365 classes.
    _, lists = case.custom("benchmark_names", dataset="places_lt",
                           names_lines=[f"c{i} {name.replace(' ', '_')}" for i, name in enumerate(names)])
    case.refused("places_lt with a 6-class names file", prepare_stage.run_stage,
                 problem=[str(lists / "classnames.txt"), re.compile(r"\b6 classes"), "365"],
                 fix=["`classnames`"], absent=PREPARED)


def duplicate_paths(case: Case) -> None:
    state = {}

    def twice_in_train(lists):
        lines = (lists / "train.txt").read_text().splitlines()
        state["train"] = lines[3].split()[0]
        (lists / "train.txt").write_text("\n".join(lines + [lines[3]]) + "\n")

    _, lists = case.custom("twice_in_train", twice_in_train)
    case.refused("a train line listed twice", prepare_stage.run_stage,
                 problem=[str(lists / "train.txt"), state["train"], re.compile(r"twice|duplicate")],
                 fix=[re.compile(r"[Rr]emove")], absent=PREPARED)

    def train_image_in_test(lists):
        line = (lists / "train.txt").read_text().splitlines()[0]
        state["test"] = line.split()[0]
        with open(lists / "test.txt", "a") as fh:
            fh.write(line + "\n")

    case.custom("train_image_in_test", train_image_in_test)
    case.refused("a train image also in test", prepare_stage.run_stage,
                 problem=[state["test"], "test"], fix=[re.compile(r"[Rr]emove")], absent=PREPARED)

    # The same file spelled differently is still listed twice (lists made by tools often say `./`).
    def dot_slash_twice_in_train(lists):
        lines = (lists / "train.txt").read_text().splitlines()
        state["dot"] = lines[3].split()[0]
        (lists / "train.txt").write_text("\n".join(lines + ["./" + lines[3]]) + "\n")

    _, lists = case.custom("dot_slash_twice_in_train", dot_slash_twice_in_train)
    case.refused("a train line listed again as ./path", prepare_stage.run_stage,
                 problem=[str(lists / "train.txt"), state["dot"], re.compile(r"twice|duplicate")],
                 fix=[re.compile(r"[Rr]emove")], absent=PREPARED)

    def dot_slash_train_image_in_test(lists):
        line = (lists / "train.txt").read_text().splitlines()[0]
        state["dot_test"] = line.split()[0]
        with open(lists / "test.txt", "a") as fh:
            fh.write("./" + line + "\n")

    case.custom("dot_slash_train_image_in_test", dot_slash_train_image_in_test)
    case.refused("a train image also in test as ./path", prepare_stage.run_stage,
                 problem=[state["dot_test"], "test"], fix=[re.compile(r"[Rr]emove")], absent=PREPARED)


def path_escapes_root(case: Case) -> None:
    for label, path in [("dotdot", "../../etc/passwd"), ("absolute", "/etc/passwd"),
                        ("inner_dotdot", "images/../../outside.jpg")]:
        def escape(lists, path=path):
            with open(lists / "train.txt", "a") as fh:
                fh.write(f"{path} 0\n")

        _, lists = case.custom(f"escape_{label}", escape)
        case.refused(f"train line `{path} 0`", prepare_stage.run_stage,
                     problem=[str(lists / "train.txt"), path, re.compile(r"leave|outside|escape")],
                     fix=["`root`"], absent=PREPARED)


def empty_split(case: Case) -> None:
    _, lists = case.custom("empty_test", lambda lists: (lists / "test.txt").write_text(""))
    case.refused("empty test list", prepare_stage.run_stage,
                 problem=[str(lists / "test.txt"), "empty"],
                 fix=[re.compile(r"at least one image|`test_list`")], absent=PREPARED)

    _, lists = case.custom("blank_val", lambda lists: (lists / "val.txt").write_text("\n  \n\n"))
    case.refused("val list of blank lines", prepare_stage.run_stage,
                 problem=[str(lists / "val.txt"), "empty"],
                 fix=[re.compile(r"at least one image|`val_list`")], absent=PREPARED)


def unknown_dataset(case: Case) -> None:
    case.fresh("imagenet", set_key(small_params(), "dataset", "imagenet"))
    case.monkeypatch.setattr(registry.synthetic, "generate", expensive("dataset generation"))
    case.monkeypatch.setattr(prepare_stage, "build", expensive("manifest build"))
    case.refused("dataset: imagenet", prepare_stage.run_stage,
                 problem=["'imagenet'", "`dataset`"],
                 fix=["imagenet_lt", "places_lt", "custom", "synthetic"], absent=("data/prepared/*",))


def unknown_head(case: Case) -> None:
    train_refuses(case, "head: cosin", "head", "cosin", problem=["'cosin'", "`head`"],
                  fix=["cosine", "linear", "decoder", "zeroshot"])


def unknown_loss(case: Case) -> None:
    train_refuses(case, "loss: focal_loss", "loss", "focal_loss", problem=["'focal_loss'", "`loss`"],
                  fix=["focal", "ce", "bsm", "ldam"])


def unknown_sampler(case: Case) -> None:
    train_refuses(case, "sampler: balanced", "sampler", "balanced", problem=["'balanced'", "`sampler`"],
                  fix=["class_balanced", "instance", "sqrt"])


def unknown_stage2(case: Case) -> None:
    train_refuses(case, "stage2: crt2", "stage2", "crt2", problem=["'crt2'", "`stage2`"],
                  fix=["crt", "lws", "tau_norm", "disalign", "marc"])
    params = set_key(set_key(small_params(), "stage2", "crt"), "stage2_methods.crt.sampler", "balanced")
    case.built_copy("stage2_sampler", params, drop=["data/models"])
    case.monkeypatch.setattr(store.SplitFeatures, "__init__", expensive("feature cache read"))
    case.refused("stage2_methods.crt.sampler: balanced", training.run_stage,
                 problem=["'balanced'", "`stage2_methods.crt.sampler`"],
                 fix=["class_balanced", "instance", "sqrt"], absent=MODELS)


def wrong_type(case: Case) -> None:
    train_refuses(case, "train.lr: 'fast'", "train.lr", "fast", problem=["`train.lr`", "'fast'"],
                  fix=[re.compile(r"number")])
    train_refuses(case, "train.epochs: '10'", "train.epochs", "10", problem=["`train.epochs`", "'10'"],
                  fix=[re.compile(r"integer")])

    case.built_copy("extract_batch", set_key(small_params(), "extract.batch_size", "64"),
                    drop=["data/features"])
    case.monkeypatch.setattr(models, "load", expensive("model load"))
    case.refused("extract.batch_size: '64'", extract.run_stage, problem=["`extract.batch_size`", "'64'"],
                 fix=[re.compile(r"integer")], absent=FEATURES)

    case.fresh("prepare_classes", set_key(small_params(), "datasets.synthetic.classes", "six"))
    case.monkeypatch.setattr(registry.synthetic, "generate", expensive("dataset generation"))
    case.refused("datasets.synthetic.classes: 'six'", prepare_stage.run_stage,
                 problem=["`datasets.synthetic.classes`", "'six'"], fix=[re.compile(r"integer")], absent=PREPARED)


def negative_lr(case: Case) -> None:
    train_refuses(case, "train.lr: -0.01", "train.lr", -0.01, problem=["`train.lr`", "-0.01"],
                  fix=[re.compile(r"greater than 0|positive")])
    train_refuses(case, "train.lr: 0", "train.lr", 0.0, problem=["`train.lr`"],
                  fix=[re.compile(r"greater than 0|positive")])


def missing_root(case: Case) -> None:
    gone = case.tmp_path / "no_such_folder"
    for dataset in ("places_lt", "cifar10_lt"):
        params = set_key(set_key(small_params(), "dataset", dataset), f"datasets.{dataset}.root", str(gone))
        case.fresh(f"{dataset}_gone", params)
        case.refused(f"{dataset} root {gone}", prepare_stage.run_stage,
                     problem=[str(gone), re.compile(r"does not exist|not found|missing")],
                     fix=[re.compile(rf"`(datasets\.{dataset}\.)?root`")], absent=PREPARED)

    params, _ = case.custom("custom_gone")
    params["datasets"]["custom"]["root"] = str(gone)
    write_params(params)
    case.refused(f"custom root {gone}", prepare_stage.run_stage,
                 problem=[str(gone), re.compile(r"does not exist|not found|missing")],
                 fix=[re.compile(r"`(datasets\.custom\.)?root`")], absent=PREPARED)

    case.fresh("places_lt_null", set_key(small_params(), "dataset", "places_lt"))
    case.refused("places_lt root: null", prepare_stage.run_stage,
                 problem=["`datasets.places_lt.root`", "not set"], fix=["folder that holds the images"],
                 absent=PREPARED)


def cache_from_other_model(case: Case) -> None:
    """Features extracted with ltpipe-tiny seed 0; the params (and the re-run weights stage)
    now name seed 1. Train and evaluate must refuse the stale cache."""
    params = set_key(small_params(), "model.init_seed", 1)
    case.built_copy("other_model", params)
    cached = json.loads(Path("data/weights/weights.json").read_text())["sha256"]
    models.run_stage(Params.load())  # the weights stage now names another model
    current = json.loads(Path("data/weights/weights.json").read_text())["sha256"]
    assert current != cached, "the test needs two different models"
    problem = [re.compile(r"feature", re.I),
               re.compile(rf"{cached[:8]}|{current[:8]}|(another|other|different) (model|weights)", re.I)]
    fix = ["dvc repro extract"]

    head = Path("data/models/head.pt").read_bytes()
    case.monkeypatch.setattr(training, "train", expensive("training"))
    case.monkeypatch.setattr(training, "fit_without_gradients", expensive("fitting"))
    case.refused("train on a cache from seed 0, params seed 1", training.run_stage, problem, fix)
    if Path("data/models/head.pt").read_bytes() != head:
        case.shortfalls.append("train on a stale cache: data/models/head.pt was rewritten")

    case.monkeypatch.setattr(evaluation, "predict", expensive("prediction"))
    case.refused("evaluate on a cache from seed 0, params seed 1", evaluation.run_evaluate, problem, fix,
                 absent=("metrics/eval*",))


CASES = {f.__name__: f for f in (
    label_out_of_range, class_count_mismatch, duplicate_paths, path_escapes_root, empty_split,
    unknown_dataset, unknown_head, unknown_loss, unknown_sampler, unknown_stage2, wrong_type, negative_lr,
    missing_root, cache_from_other_model)}


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_bad_input_fails_early_naming_problem_and_fix(name, request, tmp_path, monkeypatch):
    case = Case(request, tmp_path, monkeypatch)
    CASES[name](case)
    case.verdict()


# ---------------------------------------------------------------- controls: the cases above can fail


def test_controls_valid_inputs_reach_the_patched_expensive_work(request, tmp_path, monkeypatch):
    """Without the defect, the same setups pass validation and reach the step the cases patch,
    so a refusal in a case is caused by its defect."""
    case = Case(request, tmp_path, monkeypatch)
    case.custom("valid_custom")
    with pytest.raises(AssertionError, match=r"expensive work started \(image scan\)"):
        prepare_stage.run_stage(Params.load())

    params, _ = case.custom("valid_custom_no_scan")
    params["prepare"]["scan_images"] = False
    write_params(params)
    prepared = prepare_stage.run_stage(Params.load())
    assert prepared.num_classes == 6 and Path("data/prepared/manifest.csv").is_file()

    case.built_copy("valid_train", drop=["data/models"])
    monkeypatch.setattr(store.SplitFeatures, "__init__", expensive("feature cache read"))
    with pytest.raises(AssertionError, match=r"expensive work started \(feature cache read\)"):
        training.run_stage(Params.load())

    case.built_copy("valid_extract", drop=["data/features"])
    monkeypatch.setattr(models, "load", expensive("model load"))
    with pytest.raises(AssertionError, match=r"expensive work started \(model load\)"):
        extract.run_stage(Params.load())
