"""End-to-end fine-tuning on the tiny model: every mode trains, frozen parts stay frozen,
a killed run resumes exactly, and two gloo processes step like one."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from ltpipe import losses
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.core.runtime import seed_everything
from ltpipe.data import manifest
from ltpipe.features import models
from ltpipe.features.extract import Workers
from ltpipe.features.image_files import ImageFiles
from ltpipe.finetune import model as ft_model
from ltpipe.finetune import modes
from ltpipe.finetune.run import trim_log
from ltpipe.finetune.train import FinetuneConfig, finetune, micro_batches, param_groups, plan_run
from ltpipe.training.loop import class_counts
from ltpipe.training.samplers import SAMPLERS
from tests import dvc_repo

FINETUNE = {"epochs": 2, "batch_size": 16, "micro_batch": 16, "checkpoint_every": 2, "workers": 0,
            "warmup_epochs": 0, "lr": 1.0e-3, "head_lr": 1.0e-2}
OVERRIDES = dict(dvc_repo.SMALL, **{"finetune.train": FINETUNE})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A project copy with the small dataset prepared and the tiny model's weights written."""
    path = dvc_repo.make(tmp_path_factory.mktemp("ft") / "repo", OVERRIDES)
    dvc_repo.run(path, sys.executable, "-m", "stages.weights")
    dvc_repo.run(path, sys.executable, "-m", "stages.prepare")
    return path


@pytest.fixture
def inside(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    return workspace


def build(mode_name: str, head: str = "cosine", section=None):
    seed_everything(0)
    weights = models.ResolvedWeights.load("data/weights/weights.json")
    clip_model, preprocess, tokenizer = models.load(weights, torch.device("cpu"))
    prepared = manifest.load("data/prepared")
    mode = modes.build(mode_name, modes.MODES.parse(mode_name, section))
    model = ft_model.build_model(clip_model, tokenizer, mode, head, None, prepared.classes["prompt"].tolist(),
                                 "pre_ln", "single", torch.device("cpu"), "fp32")
    return model, clip_model, preprocess, prepared


def train_steps(model, prepared, steps: int, work_dir, precision: str = "fp32"):
    cfg = FinetuneConfig(**dict(FINETUNE, iterations=steps))
    labels = prepared.label_array("train")
    loss_fn = losses.build("ce", "single", None, class_counts(labels, prepared.num_classes), len(labels))
    files = ImageFiles(prepared.root, prepared.split("train")["path"].tolist(), None)
    return finetune(model, loss_fn, SAMPLERS.get("instance"), files, labels, prepared.num_classes, cfg, 0,
                    torch.device("cpu"), precision, Workers(), work_dir)


def fixed_batch_loss(model, preprocess, prepared) -> float:
    rows = prepared.split("train").iloc[::4]
    files = ImageFiles(prepared.root, rows["path"].tolist(), preprocess)
    images = torch.stack([files[i][0] for i in range(len(files))])
    labels = torch.from_numpy(prepared.label_array("train")[::4])
    model.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(images), labels))


EXPECTED_TRAINABLE = {
    # mode: predicate on the names of the model's trainable parameters (head excluded)
    "full": lambda n: n.startswith("encoder.visual."),
    "partial": lambda n: n.startswith(("encoder.visual.transformer.resblocks.2.", "encoder.visual.transformer."
                                       "resblocks.3.", "encoder.visual.ln_post.", "encoder.visual.proj")),
    "bitfit": lambda n: n.endswith("bias") or ".ln_" in n,
    "vpt": lambda n: n == "encoder.prompts.tokens",
    "coop": lambda n: False,
}


@pytest.mark.parametrize("mode", modes.MODES.names())
def test_each_mode_trains_its_parameters_only_and_its_loss_falls(inside, tmp_path, mode):
    head = "zeroshot" if mode == "coop" else "cosine"
    model, clip_model, preprocess, prepared = build(mode, head)
    trainable = set(model.trainable_names())
    encoder = {n for n, _ in model.named_parameters() if not n.startswith("head.")}
    expected = {n for n in encoder if EXPECTED_TRAINABLE[mode](n)}
    assert trainable - {n for n in trainable if n.startswith("head.")} == expected
    assert any(n.startswith("head.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    text_before = [p.detach().clone() for p in clip_model.transformer.parameters()]
    loss_before = fixed_batch_loss(model, preprocess, prepared)
    train_steps(model, prepared, 12, tmp_path / "work")
    loss_after = fixed_batch_loss(model, preprocess, prepared)
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    for name, param in model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(param, before[name]), f"{mode}: frozen {name} changed"
    changed = [n for n in trainable if not torch.equal(dict(model.named_parameters())[n], before[n])]
    assert len(changed) == len(trainable), sorted(trainable - set(changed))[:5]
    assert all(torch.equal(p, q) for p, q in zip(clip_model.transformer.parameters(), text_before))


def test_token_heads_freeze_what_they_do_not_read(inside):
    model, *_ = build("partial", "decoder")
    names = set(model.trainable_names())
    assert "encoder.visual.transformer.resblocks.3.mlp.c_fc.weight" in names
    assert not {"encoder.visual.ln_post.weight", "encoder.visual.proj"} & names


def test_modes_refuse_what_they_cannot_do(inside):
    with pytest.raises(ConfigError, match="head: zeroshot"):
        build("coop", "cosine")
    with pytest.raises(ConfigError, match="fitted in one pass"):
        build("full", "knn")
    with pytest.raises(ConfigError, match="finetune.partial.blocks"):
        build("partial", "cosine", Params({"blocks": 9}, prefix="finetune.partial"))
    with pytest.raises(ConfigError, match="unknown fine-tuning mode 'lora'.*bitfit, coop, full, partial, vpt"):
        modes.build("lora", None)


def test_vit_only_modes_refuse_a_resnet_and_name_the_modes_that_fit_it():
    resnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    for name in ("partial", "vpt"):
        with pytest.raises(ConfigError, match=rf"mode '{name}' needs a ViT.*Sequential. Use `bitfit` or `full` with"):
            modes.build(name).apply(resnet)
    for name in ("full", "bitfit", "coop"):
        modes.build(name).apply(resnet)


def test_modes_rebuild_from_saved_kwargs_and_read_their_sections():
    # A checkpoint saves `mode.kwargs`; one without an option (an older version's) takes its default.
    assert modes.rebuild("coop", {"context": 2}).kwargs == {"context": 2, "init": "a photo of a"}
    assert modes.rebuild("partial", {}).kwargs == {"blocks": 2} and modes.rebuild("full", {}).kwargs == {}
    assert modes.rebuild("vpt", modes.build("vpt").kwargs).options == modes.build("vpt").options
    params = Params({"finetune": {"coop": {"context": 3, "init": None}, "vpt": {"prompts": 0}}})
    assert modes.MODES.options("coop", params).init is None
    with pytest.raises(ConfigError, match=r"`finetune.vpt.prompts` must be at least 1, got 0"):
        modes.MODES.options("vpt", params)


def test_micro_batches_cover_the_global_batch_once_for_any_process_count():
    batch = np.arange(37)
    for world in (1, 2, 3):
        for accumulation in (1, 2, 4):
            pieces = [p for rank in range(world) for p in micro_batches(batch, world, accumulation, rank)]
            assert sorted(np.concatenate(pieces).tolist()) == batch.tolist()
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_plan_accumulates_to_the_global_batch_and_rejects_impossible_sizes():
    cfg = FinetuneConfig(batch_size=64, micro_batch=16, epochs=3)
    plan, accumulation = plan_run(1000, cfg, world=2)
    assert (accumulation, plan.steps_per_epoch, plan.total_steps) == (2, 15, 45)
    with pytest.raises(ConfigError, match="larger than the training split"):
        plan_run(10, cfg, world=1)
    with pytest.raises(ConfigError, match="at least one image"):
        plan_run(1000, FinetuneConfig(batch_size=2, micro_batch=1), world=4)


def test_encoder_and_added_parameters_get_their_own_learning_rates(inside):
    model, *_ = build("vpt")
    model.encoder.visual.ln_post.requires_grad_(True)
    groups = param_groups(model, FinetuneConfig(lr=1e-5, head_lr=1e-3, weight_decay=0.1))
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["encoder.prompts.tokens"])]["lr"] == 1e-3
    assert by_param[id(named["encoder.prompts.tokens"])]["weight_decay"] == 0.0
    assert by_param[id(named["encoder.visual.ln_post.weight"])]["lr"] == 1e-5
    head_weight = next(p for n, p in named.items() if n.startswith("head.") and p.ndim == 2)
    assert by_param[id(head_weight)]["weight_decay"] == 0.1


def test_saved_model_reloads_to_the_same_predictions(inside, tmp_path):
    model, clip_model, preprocess, prepared = build("vpt")
    train_steps(model, prepared, 3, tmp_path / "work")
    weights = models.ResolvedWeights.load("data/weights/weights.json")
    mode = modes.build("vpt", None)
    ft_model.save_finetuned(tmp_path / "vpt.pt", model, mode, "cosine", weights.sha256, {"seed": 0})
    fresh, _, _ = models.load(weights, torch.device("cpu"))
    loaded = ft_model.load_finetuned(tmp_path / "vpt.pt", fresh, weights.sha256)
    images = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(images), model(images), atol=1e-5)
    saved = torch.load(tmp_path / "vpt.pt", weights_only=True)
    assert not any(k.startswith("encoder.visual.") for k in saved["state_dict"])  # VPT saves its prompts only


def test_trim_log_drops_rows_after_the_resume_step(tmp_path):
    tsv = tmp_path / "plots" / "metrics" / "loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("step\tloss\n1\t0.9\n2\t0.8\n3\t0.7\n4\t0.6\n")
    trim_log(tmp_path, 2)
    assert tsv.read_text() == "step\tloss\n1\t0.9\n2\t0.8\n"


def _stage(workspace, mode: str, *launcher: str, module: tuple = ("-m", "stages.finetune")) -> subprocess.Popen:
    env = dict(dvc_repo.env(), OMP_NUM_THREADS="1")
    cmd = list(launcher or (sys.executable,)) + list(module) + [mode]
    return subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def _set_params(workspace, head: str, **train):
    params = dvc_repo.small_params(OVERRIDES)
    params["finetune"]["train"].update(train)
    params["head"] = head
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _result(workspace, mode: str):
    state = torch.load(workspace / f"data/finetune/{mode}.pt", weights_only=True)["state_dict"]
    metrics = json.loads((workspace / f"metrics/finetune/{mode}.json").read_text())
    return state, metrics


def _saved_step(workspace, mode: str):
    states = list((workspace / "data/partial").glob(f"finetune-{mode}-*/state.pt"))
    try:
        return int(torch.load(states[0], weights_only=True, mmap=True)["step"]) if states else None
    except (RuntimeError, OSError, EOFError):  # replaced while being read
        return None


def _kill_once_saved(workspace, mode: str, wanted) -> int:
    """Start the stage, SIGKILL it as soon as its saved state's step satisfies ``wanted``; return that step."""
    proc = _stage(workspace, mode)
    deadline = time.time() + 300
    while True:
        step = _saved_step(workspace, mode)
        if step is not None and wanted(step):
            break
        assert proc.poll() is None and time.time() < deadline, "the run ended before the checkpoint wanted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return step


# Runs the stage with ResumeState.save patched to SIGKILL the process right after saving step argv[1]:
# an exact kill point that polling cannot promise (the final save lives for a fraction of a second).
_KILL_AFTER_SAVE = """
import os, runpy, signal, sys
from ltpipe.finetune.train import ResumeState
kill_step = int(sys.argv.pop(1))  # argv: -c, step, mode
save = ResumeState.save
def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
ResumeState.save = save_then_die
sys.argv[0] = "stages.finetune"
runpy.run_module("stages.finetune", run_name="__main__", alter_sys=True)
"""


def _kill_after_save(workspace, mode: str, step: int) -> None:
    proc = _stage(workspace, mode, module=("-c", _KILL_AFTER_SAVE, str(step)))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out
    assert _saved_step(workspace, mode) == step


@pytest.mark.slow
def test_killed_run_resumes_to_the_result_of_an_uninterrupted_one(workspace):
    # 100 training images, batch 16: 6 steps an epoch, 18 in all. cprfl has dropout: the RNG must resume too.
    _set_params(workspace, "cprfl", epochs=3, checkpoint_every=3)
    _finish(_stage(workspace, "bitfit"))
    expected_state, expected_metrics = _result(workspace, "bitfit")
    (workspace / "data/finetune/bitfit.pt").unlink()

    first = _kill_once_saved(workspace, "bitfit", lambda step: step > 0)  # mid-epoch (step 3)
    assert not (workspace / "data/finetune/bitfit.pt").exists()
    # Saving at epoch ends only (a setting that does not restart the run): the next kill follows an
    # epoch's validation and checkpoint, the one after the final step's.
    _set_params(workspace, "cprfl", epochs=3, checkpoint_every=6)
    boundary = 6 * (first // 6 + 1)  # 6 unless the poll above was slow
    if boundary < 18:
        _kill_after_save(workspace, "bitfit", boundary)
        assert not (workspace / "data/finetune/bitfit.pt").exists()
    _kill_after_save(workspace, "bitfit", 18)
    out = _finish(_stage(workspace, "bitfit"))
    assert "resuming fine-tuning at step 18" in out

    state, result = _result(workspace, "bitfit")
    assert state.keys() == expected_state.keys()
    for key in state:
        assert torch.equal(state[key], expected_state[key]), key
    assert result == expected_metrics
    log = workspace / "metrics/finetune/bitfit_log/plots/metrics"
    for name, expected_steps in (("loss.tsv", list(range(1, 19))), ("val_score.tsv", [6, 12, 18])):
        header, *rows = (log / name).read_text().splitlines()
        column = header.split("\t").index("step")
        assert [int(row.split("\t")[column]) for row in rows] == expected_steps, name
    report = json.loads((workspace / "metrics/finetune/bitfit_report.json").read_text())
    assert report["resumed_from_step"] == 18 and report["val_score"] is not None
    assert not list((workspace / "data/partial").glob("finetune-bitfit-*"))  # the work dir is gone once done


@pytest.mark.slow
def test_two_gloo_processes_take_the_same_step_as_one(workspace, monkeypatch):
    """One optimiser step on a global batch of 16: one process with two accumulated micro-batches
    of 8, and two processes (DistributedDataParallel, gloo) with one micro-batch of 8 each."""
    # SGD without clipping: an update proportional to the gradient (Adam's would hide a wrong scale).
    _set_params(workspace, "cosine", iterations=1, batch_size=16, micro_batch=8, checkpoint_every=1,
                optimizer="sgd", clip_grad_norm=0.0, lr=0.05, head_lr=0.5)
    _finish(_stage(workspace, "partial"))
    one, one_metrics = _result(workspace, "partial")
    out = _finish(_stage(workspace, "partial", sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", "2"))
    assert "2 process(es)" in out
    two, two_metrics = _result(workspace, "partial")
    # model.threads: auto is torch's default in the stage's environment (`_stage` sets OMP_NUM_THREADS=1)
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             env=dict(dvc_repo.env(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                             check=True).stdout.strip()
    assert (one_metrics["threads"], two_metrics["threads"]) == (int(default), 1)
    monkeypatch.chdir(workspace)  # the weights file names its checkpoint relative to the project
    base, _, _ = models.load(models.ResolvedWeights.load("data/weights/weights.json"), "cpu")
    pretrained = dict(base.visual.named_parameters())
    moved = 0
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-6, rtol=1e-5), key
        name = key.removeprefix("encoder.visual.")
        if name in pretrained and not torch.equal(one[key], pretrained[name]):
            moved += 1
    assert moved > 10  # the step changed the encoder, and both runs changed it alike


def test_weight_average_is_the_hand_computed_average():
    from ltpipe.training.trainer import WeightAverage

    layer = torch.nn.Linear(2, 1)
    frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    model = torch.nn.Sequential(layer, frozen)
    ema = WeightAverage(model, decay=0.9)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()
    expected = 0.9 * (0.9 * start + 0.1 * (start + 1)) + 0.1 * (start + 2)
    with ema.swapped_in():
        assert torch.allclose(layer.weight, expected)
    assert torch.allclose(layer.weight, start + 1 + 1, atol=0, rtol=0)  # restored after validation
    assert len(ema.shadow) == 2  # the frozen layer is not averaged


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_paths_train(inside, tmp_path, precision):
    # CUDA runs autocast in bf16 (fp16 with a loss scaler); the same code runs here on CPU.
    model, _, preprocess, prepared = build("bitfit")
    before = fixed_batch_loss(model, preprocess, prepared)
    summary = train_steps(model, prepared, 12, tmp_path / "work", precision)
    assert np.isfinite(summary["final_loss"])
    assert fixed_batch_loss(model, preprocess, prepared) < before - 0.05


def test_batch_norms_of_frozen_parts_keep_their_statistics():
    # ResNet towers: a frozen batch norm must not drift in train mode; a trained one's statistics are saved.
    frozen_bn, tuned_bn = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(4)
    visual = torch.nn.Sequential(frozen_bn, torch.nn.Conv2d(3, 4, 1), tuned_bn, torch.nn.Flatten(),
                                 torch.nn.LazyLinear(5))
    visual(torch.randn(2, 3, 2, 2))
    visual.requires_grad_(False)
    tuned_bn.requires_grad_(True)
    model = ft_model.FinetuneModel(ft_model.ImageEncoder(visual, "pooled", "pre_ln"), torch.nn.Linear(5, 2))
    model.train()
    assert not frozen_bn.training and tuned_bn.training
    before = frozen_bn.running_mean.clone()
    model(torch.randn(8, 3, 2, 2) + 3)
    assert torch.equal(frozen_bn.running_mean, before)
    keys = set(model.tuned_state())
    assert {"encoder.visual.2.running_mean", "encoder.visual.2.running_var", "encoder.visual.2.weight"} <= keys
    assert not any(k.startswith("encoder.visual.0.") for k in keys)


def test_multilabel_fine_tuning_trains_with_a_class_balanced_sampler(inside, tmp_path):
    from ltpipe.data.manifest import build as build_manifest
    from tests.conftest import make_source

    prepared = build_manifest(make_source(tmp_path / "ml", multilabel=True))
    weights = models.ResolvedWeights.load("data/weights/weights.json")
    seed_everything(0)
    clip_model, preprocess, tokenizer = models.load(weights, torch.device("cpu"))
    model = ft_model.build_model(clip_model, tokenizer, modes.build("partial", None), "cosine", None,
                                 prepared.classes["prompt"].tolist(), "pre_ln", "single", torch.device("cpu"), "fp32")
    labels = prepared.label_array("train")
    assert labels.ndim == 2
    loss_fn = losses.build("asl", "multi", None, class_counts(labels, prepared.num_classes), len(labels))
    eval_files = ImageFiles(prepared.root, prepared.split("train")["path"].tolist(), preprocess)
    images = torch.stack([eval_files[i][0] for i in range(len(eval_files))])
    target = torch.from_numpy(labels.astype(np.float32))

    def training_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(loss_fn(model(images), target))

    before = training_loss()
    files = ImageFiles(prepared.root, prepared.split("train")["path"].tolist(), None)
    cfg = FinetuneConfig(**dict(FINETUNE, iterations=30, lr=1e-4))  # Adam's first full steps overshoot: give it 30
    summary = finetune(model, loss_fn, SAMPLERS.get("class_balanced"), files, labels, prepared.num_classes,
                       cfg, 0, torch.device("cpu"), "fp32", Workers(), tmp_path / "work",
                       validate=lambda m: 0.5)
    assert np.isfinite(summary["final_loss"]) and summary["val_score"] == 0.5
    assert training_loss() < before - 0.02, before
