"""Edits to the user's own data and checkpoint, outside the repository, seen by a plain `dvc repro` (issue 25).

One repository on a `custom` dataset whose root, lists and class names live outside it, and a local
checkpoint file. Each test makes one kind of edit and checks which stages the next `dvc repro zeroshot`
runs: exactly those the edit reaches, after the `inputs` stage that runs every time. The tests run in
file order on the shared repository; each leaves it up to date.
"""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests import dvc_repo
from tests.reliability.test_stale_inputs import _dataset, _picture, inject
from tests.weights_standins import random_state

pytestmark = [pytest.mark.slow, pytest.mark.dvc]

ARCH = "ltpipe-tiny"


def repro(repo: Path, *args: str) -> set:
    """The stages `dvc repro zeroshot` ran after `inputs` (extract and text may run in either order)."""
    result = dvc_repo.run(repo, "dvc", "repro", *args, "zeroshot")
    ran = dvc_repo.stages_run(result.stdout, include_inputs=True)
    assert ran[:1] == ["inputs"], result.stdout  # first, every time
    return set(ran[1:])


def later_edit() -> None:
    """Past the filesystem's coarse clock tick and the stat cache's racy window, as a real later edit is."""
    time.sleep(0.05)


def features(repo: Path) -> bytes:
    return (repo / "data/features/train.h5").read_bytes()


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """(repository, dataset root, checkpoint file), after a first full `dvc repro zeroshot`."""
    root = tmp_path_factory.mktemp("input-edits")
    source = _dataset(root / "dataset")
    checkpoint = root / "weights" / "tiny.pt"
    checkpoint.parent.mkdir()
    torch.save(random_state(ARCH, seed=1), checkpoint)
    repo = dvc_repo.make(root / "repo", dict(dvc_repo.SMALL, extract=dict(workers=0, checkpoint_every=4)))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"] = "custom"
    params["datasets"]["custom"].update(root=str(source.root), train_list="train.txt", val_list="val.txt",
                                        test_list="test.txt", classnames="classnames.txt")
    params["model"]["pretrained"] = str(checkpoint)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_repo.run(repo, "git", "commit", "-qam", "the user's own data and checkpoint")
    assert repro(repo) == {"weights", "prepare", "extract", "text", "zeroshot"}
    return repo, source.root, checkpoint


def test_nothing_changed_runs_nothing_after_inputs(edited):
    repo, _, _ = edited
    assert repro(repo) == set()
    assert dvc_repo.stale_stages(repo, "zeroshot") == {}


def test_a_removed_list_line_reprepares_and_reextracts(edited):
    repo, root, _ = edited
    before = features(repo)
    train = root / "train.txt"
    lines = train.read_text().splitlines(keepends=True)
    later_edit()
    train.write_text("".join(lines[:-1]))
    # text too: classes.csv holds the training counts, which changed.
    assert repro(repo) == {"prepare", "extract", "text", "zeroshot"}
    assert features(repo) != before
    assert "train/img_7.png" not in (repo / "data/prepared/manifest.csv").read_text()


def test_an_added_list_line_reprepares_and_reextracts(edited):
    repo, root, _ = edited
    before = features(repo)
    later_edit()
    _picture(100).save(root / "train/img_8.png")  # a new image: the old list back would be restored from the run-cache
    with open(root / "train.txt", "a") as fh:
        fh.write("train/img_8.png 0\n")  # counts 5 and 3: new, so text runs (not restored)
    assert repro(repo) == {"prepare", "extract", "text", "zeroshot"}
    assert features(repo) != before
    assert "train/img_8.png" in (repo / "data/prepared/manifest.csv").read_text()


def test_a_renamed_class_rebuilds_the_text_embeddings_and_encodes_no_image(edited):
    repo, root, _ = edited
    before = features(repo), (repo / "data/text/text.h5").read_bytes()
    later_edit()
    (root / "classnames.txt").write_text("cat\npuppy\n")
    assert repro(repo) == {"prepare", "text", "zeroshot"}
    assert features(repo) == before[0]
    assert (repo / "data/text/text.h5").read_bytes() != before[1]
    assert "puppy" in (repo / "data/prepared/classes.csv").read_text()


def test_new_templates_rebuild_the_text_embeddings_and_encode_no_image(edited):
    repo, _, _ = edited
    result = dvc_repo.run(repo, "dvc", "exp", "run", "-S", "extract.templates=imagenet80", "zeroshot")
    assert set(dvc_repo.stages_run(result.stdout)) == {"text", "zeroshot"}


@pytest.mark.parametrize("fault,image,reruns", [
    ("rewritten_size_and_mtime_kept", "train/img_2.png", {"prepare", "extract", "zeroshot"}),
    ("replaced_by_rename", "train/img_3.png", {"prepare", "extract", "zeroshot"}),
    ("touched_same_bytes", "train/img_4.png", set()),
])
def test_an_image_changed_in_place_is_seen(edited, fault, image, reruns):
    repo, root, _ = edited
    before = features(repo)
    later_edit()
    inject(fault, root / image)
    assert repro(repo) == reruns
    assert (features(repo) != before) == bool(reruns)


def test_a_replaced_checkpoint_file_reruns_the_weights_and_everything_after(edited):
    repo, _, checkpoint = edited
    before = features(repo), (repo / "data/weights/weights.json").read_text()
    later_edit()
    replacement = checkpoint.with_name("other.pt")
    torch.save(random_state(ARCH, seed=2), replacement)
    os.replace(replacement, checkpoint)  # same path, new bytes
    assert repro(repo) == {"weights", "extract", "text", "zeroshot"}
    assert features(repo) != before[0]
    assert (repo / "data/weights/weights.json").read_text() != before[1]


def test_a_machine_without_the_dataset_and_checkpoint_keeps_their_fingerprints(edited):
    """Training on a clone whose features came from a DVC remote: the dataset and checkpoint are elsewhere."""
    repo, root, checkpoint = edited
    params = (repo / "params.yaml").read_bytes()
    away = root.with_name("dataset-elsewhere"), checkpoint.with_name("elsewhere.pt")
    os.replace(root, away[0])
    os.replace(checkpoint, away[1])
    try:
        result = dvc_repo.run(repo, "dvc", "repro", "zeroshot")
        assert dvc_repo.stages_run(result.stdout) == []
        assert f"ltpipe note: the dataset root {root} (`datasets.custom.root`) is not on this machine" in result.stdout
        assert f"ltpipe note: the checkpoint file {checkpoint} (`model.pretrained`) is not on this machine" \
            in result.stdout
        # Another dataset root, also absent, is no longer the recorded dataset: refused, as prepare would.
        failed = dvc_repo.run(repo, "dvc", "exp", "run", "-S", f"datasets.custom.root={root}-typo", "zeroshot",
                              check=False)
        assert failed.returncode != 0
        errors = [line for line in failed.stderr.splitlines() if line.startswith("ltpipe error:")]
        assert len(errors) == 1 and "`datasets.custom.root`" in errors[0] and "does not exist" in errors[0], \
            failed.stderr
    finally:
        (repo / "params.yaml").write_bytes(params)
        os.replace(away[0], root)
        os.replace(away[1], checkpoint)
    assert repro(repo) == set()


def test_the_stat_cache_spares_rereading_unchanged_images(edited):
    repo, _, _ = edited
    out = dvc_repo.run(repo, "dvc", "repro", "zeroshot").stdout
    assert "12 listed image(s), 0 read" in out, out


def test_a_dataset_inside_the_repository_is_tracked_the_same_way(edited):
    """`datasets.custom.root` relative to the repository (a dataset committed with the code, or `dvc add`ed):
    DVC sees the folder only if the user tracks it, so the `inputs` stage fingerprints it all the same."""
    repo, root, _ = edited
    params = (repo / "params.yaml").read_bytes()
    inside = repo / "mydata"
    shutil.copytree(root, inside)
    data = yaml.safe_load(params)
    data["datasets"]["custom"]["root"] = "mydata"
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        assert "prepare" in repro(repo)
        assert repro(repo) == set()
        before = features(repo)
        later_edit()
        inject("rewritten_size_and_mtime_kept", inside / "train/img_5.png")
        assert repro(repo) == {"prepare", "extract", "zeroshot"}
        assert features(repo) != before
        lines = (inside / "train.txt").read_text().splitlines(keepends=True)
        later_edit()
        (inside / "train.txt").write_text("".join(lines[1:]))
        assert repro(repo) == {"prepare", "extract", "text", "zeroshot"}
        assert "train/img_0.png" not in (repo / "data/prepared/manifest.csv").read_text()
    finally:
        (repo / "params.yaml").write_bytes(params)
        shutil.rmtree(inside)
    repro(repo)
    assert repro(repo) == set()
