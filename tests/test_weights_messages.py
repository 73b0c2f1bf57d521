"""Checkpoint formats `model.pretrained` accepts (issue 15): each gives the very weights of the
state dict it was made from. The refused kinds are in tests/reliability/test_safe_loading.py."""

import warnings

import pytest
import safetensors.torch
import torch

from ltpipe.features import models


def _torchscript_archive(state: dict, path):
    """A TorchScript archive laid out as OpenAI's original ViT-B-32.pt: the weights under the
    model's own key names, plus the `input_resolution` entry open_clip drops."""
    root = torch.nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    root.register_buffer("input_resolution", torch.tensor(64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(root).save(str(path))


FORMATS = {
    "old_torch_format": lambda state, path: torch.save(state, path, _use_new_zipfile_serialization=False),
    "safetensors": lambda state, path: safetensors.torch.save_file(state, str(path)),
    "torchscript_archive": _torchscript_archive,
    "wrapped_in_state_dict_key": lambda state, path: torch.save({"state_dict": state, "epoch": 3}, path),
}


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
def test_checkpoint_format_loads_the_same_weights(fmt, tmp_path, tiny_weights):
    state = torch.load(tiny_weights.checkpoint, weights_only=True)
    path = tmp_path / ("weights.safetensors" if fmt == "safetensors" else "weights.pt")
    FORMATS[fmt](state, path)
    model, _, _ = models.load(models.resolve("ltpipe-tiny", str(path), tmp_path), torch.device("cpu"))
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
