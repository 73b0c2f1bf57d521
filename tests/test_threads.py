"""Threads per stage (issue 17): chosen from the work's size, overridable by `model.threads`, recorded."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ltpipe import heads
from ltpipe.core import runtime
from ltpipe.core.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_runs_small_steps_on_one_thread_and_large_work_on_torchs_default():
    default = runtime.choose_threads("auto", None, "x")[0]
    assert default == runtime._TORCH_DEFAULT_THREADS[0]
    assert runtime.choose_threads("auto", runtime.SMALL_STEP - 1, "x")[0] == 1
    assert runtime.choose_threads("auto", runtime.SMALL_STEP, "x")[0] == default
    count, reason = runtime.choose_threads("auto", 128 * 512 * 10, "training cosine")
    assert count == 1 and "training cosine is 0.655M multiply-adds a step" in reason


def test_a_set_thread_count_wins_whatever_the_work():
    assert runtime.choose_threads(3, 10, "x") == (3, "`model.threads: 3`")
    assert runtime.choose_threads(1, None, "x") == (1, "`model.threads: 1`")


def test_use_threads_sets_torch_and_says_why(capsys):
    before = torch.get_num_threads()
    assert runtime.use_threads("auto", 1000, "training linear") == 1
    assert torch.get_num_threads() == 1
    assert capsys.readouterr().out == ("threads: 1 (`model.threads: auto`: training linear is 0.001M multiply-adds "
                                       "a step, too few to share)\n")
    torch.set_num_threads(before)


@pytest.mark.parametrize("value", [0, -2, 1.5, "two", "", True, None, [2]])
def test_a_bad_thread_setting_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"`model.threads` is .*valid values: auto, or a number of threads >= 1"):
        runtime.parse_threads(value)


def test_parse_threads_accepts_auto_and_counts():
    assert runtime.parse_threads("auto") == "auto" and runtime.parse_threads(4) == 4


def test_step_size_is_the_classifier_matmul_of_heads_trained_on_pooled_features():
    ctx = heads.HeadContext(num_classes=7, pooled_dim=16, token_shape=(5, 8))
    for name in heads.HEADS.names():
        head = SimpleNamespace(input=heads.HEADS.capability(name, "input"))
        size = heads.step_size(name, head, 16, 7, 128)
        if head.input == "pooled" and heads.HEADS.capability(name, "trains"):
            assert size == 128 * 16 * 7, name
        else:  # token grids, or a one-pass fit (a search, class means): large by nature
            assert size is None, name
    assert heads.step_size("cosine", heads.build("cosine", None, ctx), 16, 7, 128) == 128 * 16 * 7
    assert heads.step_size("decoder", heads.build("decoder", None, ctx), 16, 7, 128) is None


def test_stage_scripts_shorten_openmps_spin_before_torch_is_loaded():
    code = ("import sys, os, stages; print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'), "
            "os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(env, **extra), capture_output=True,
                              text=True, check=True).stdout.split()

    assert run() == ["False", "3000", "None"]
    # a user's own choice is kept
    assert run(OMP_WAIT_POLICY="ACTIVE") == ["False", "None", "ACTIVE"]
    assert run(GOMP_SPINCOUNT="100000") == ["False", "100000", "None"]
