import hashlib
import json
import time

import h5py
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from ltpipe.core.errors import ConfigError, DataError, WeightsError, user_message
from ltpipe.features import extract, models
from ltpipe.features.store import SplitFeatures, TextFeatures


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_config_is_registered_with_open_clip():
    models.register_project_configs()
    assert "ltpipe-tiny" in open_clip.list_models()


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown model architecture 'ViT-Q-99'.*ltpipe-tiny.*ViT-B-16"):
        models.check_arch("ViT-Q-99")


def test_seeded_checkpoint_is_reproducible(tmp_path, tiny_weights):
    again = models.resolve("ltpipe-tiny", None, tmp_path, init_seed=0)
    other = models.resolve("ltpipe-tiny", None, tmp_path / "other", init_seed=1)
    assert again.sha256 == tiny_weights.sha256
    assert other.sha256 != tiny_weights.sha256


def test_local_checkpoint_path_loads_the_same_model(tmp_path, tiny_weights):
    local = models.resolve("ltpipe-tiny", tiny_weights.checkpoint, tmp_path)
    assert local.sha256 == tiny_weights.sha256
    a, _, _ = models.load(tiny_weights, torch.device("cpu"))
    b, _, _ = models.load(local, torch.device("cpu"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(WeightsError, match=r"checkpoint file '/no/such/file.pt'.*does not exist"):
        models.resolve("ltpipe-tiny", "/no/such/file.pt", tmp_path)


def test_unknown_tag_lists_tags(tmp_path):
    with pytest.raises(ConfigError, match=r"'opnai' is neither an open_clip pretrained tag for ViT-B-16.*openai"):
        models.resolve("ViT-B-16", "opnai", tmp_path)


def test_offline_tag_fails_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    started = time.monotonic()
    with pytest.raises(WeightsError, match=r"ViT-B-16/openai are not in the local cache.*model.pretrained"):
        models.resolve("ViT-B-16", "openai", tmp_path)
    assert time.monotonic() - started < 10


def test_tag_settings_carry_quick_gelu_and_preprocessing():
    assert models.tag_settings("ViT-B-16", "openai")[0] is True
    quick_gelu, preprocess = models.tag_settings("ViT-B-16-SigLIP", "webli")
    assert quick_gelu is False
    assert preprocess["mean"] == [0.5, 0.5, 0.5] and preprocess["resize_mode"] == "squash"


def test_load_applies_the_tag_settings(tiny_weights):
    from dataclasses import replace

    from open_clip.transformer import QuickGELU

    settings = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}
    model, preprocess, _ = models.load(replace(tiny_weights, quick_gelu=True, preprocess=settings),
                                       torch.device("cpu"))
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    normalize = preprocess.transforms[-1]
    assert list(normalize.mean) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all",
     r"checkpoint \S+bad\.pt \(`model\.pretrained`\) is not a model checkpoint torch or safetensors can read"),
    ("state_dict_with_wrong_keys",
     r"cannot load checkpoint \S+bad\.pt \(`model\.pretrained`\) as ltpipe-tiny weights: it is a state dict for "
     r"another architecture: it lacks 86 of ltpipe-tiny's 86 keys"),
])
def test_unloadable_checkpoint_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content == "state_dict_with_wrong_keys":
        torch.save({"foo": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    resolved = models.resolve("ltpipe-tiny", str(path), tmp_path)
    with pytest.raises(WeightsError, match=message):
        models.load(resolved, torch.device("cpu"))


def test_changed_checkpoint_is_detected(tmp_path, tiny_weights):
    copy = tmp_path / "w.pt"
    copy.write_bytes(open(tiny_weights.checkpoint, "rb").read())
    resolved = models.resolve("ltpipe-tiny", str(copy), tmp_path)
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(WeightsError, match="changed since the weights stage"):
        models.load(resolved, torch.device("cpu"))


def test_cache_layout_and_attributes(tiny_features, tiny_prepared, tiny_weights):
    with h5py.File(tiny_features / "train.h5", "r") as fh:
        n = len(tiny_prepared.split("train"))
        assert fh["pooled"].shape == (n, 128)
        assert fh["tokens"].shape == (n, 1 + (64 // 8) ** 2, 192)  # model input 64 px: CLS + 8x8 patches
        assert fh["pooled"].dtype == np.float16
        assert fh["pooled"].chunks is None and fh["pooled"].compression is None  # contiguous
        assert fh.attrs["weights_sha256"] == tiny_weights.sha256
        assert fh.attrs["token_layer"] == "pre_ln"
        assert fh.attrs["complete"]
        assert list(fh["labels"][:]) == list(tiny_prepared.label_array("train"))
    assert not list(tiny_features.glob("*.partial"))


def test_features_match_a_direct_forward_pass(tiny_features, tiny_prepared, tiny_weights):
    model, preprocess, _ = models.load(tiny_weights, torch.device("cpu"))
    cached = SplitFeatures(tiny_features / "test.h5", load_tokens=True)
    rows = tiny_prepared.split("test")
    images = torch.stack([preprocess(Image.open(tiny_prepared.root / p).convert("RGB")) for p in rows["path"][:4]])
    with torch.inference_mode():
        pooled = model.encode_image(images).numpy()
        x = model.visual._embeds(images)
        pre_ln = model.visual.transformer(x)
    np.testing.assert_allclose(cached.pooled[:4], pooled, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cached.tokens(np.arange(4)), pre_ln.numpy(), rtol=2e-3, atol=2e-3)
    assert cached.paths[:4] == list(rows["path"][:4])


def test_post_ln_tokens_are_the_normalised_grid(tmp_path, tiny_prepared, tiny_weights, tiny_features):
    options = extract.ExtractOptions(batch_size=16, workers=0, token_layer="post_ln")
    model, preprocess, _ = models.load(tiny_weights, torch.device("cpu"))
    extract.extract_split(model, preprocess, tiny_prepared, "val", tmp_path / "val.h5", options,
                          torch.device("cpu"), "fp32", {}, tmp_path / "partial")
    pre = SplitFeatures(tiny_features / "val.h5", load_tokens=True).tokens(np.arange(3))
    post = SplitFeatures(tmp_path / "val.h5", load_tokens=True).tokens(np.arange(3))
    with torch.inference_mode():
        expected = model.visual.ln_post(torch.from_numpy(pre)).numpy()
    np.testing.assert_allclose(post, expected, rtol=1e-2, atol=1e-2)


def test_extraction_is_byte_identical(tmp_path, tiny_prepared, tiny_weights, tiny_features):
    options = extract.ExtractOptions(batch_size=16, workers=0)
    extract.run(tiny_prepared, tiny_weights, options, tmp_path, torch.device("cpu"), "fp32")
    extract.run_text(tiny_prepared, tiny_weights, options.templates, tmp_path / "text.h5", torch.device("cpu"),
                     "fp32")
    for name in ("train.h5", "val.h5", "test.h5", "text.h5"):
        assert sha(tmp_path / name) == sha(tiny_features / name), name


def test_text_embeddings(tiny_features, tiny_prepared):
    text = TextFeatures(tiny_features / "text.h5")
    assert text.embeddings.shape == (tiny_prepared.num_classes, 128)
    np.testing.assert_allclose(np.linalg.norm(text.embeddings, axis=1), 1.0, rtol=1e-5)
    assert text.classnames == list(tiny_prepared.classes["prompt"])
    assert text.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's init


def _with_corrupt_images(tmp_path, tiny_source, corrupt):
    """A copy of the tiny dataset where image ``i`` of each ``(split, i)`` in ``corrupt`` is garbage."""
    import shutil

    from ltpipe.data.manifest import build
    from ltpipe.data.source import DatasetSource

    root = tmp_path / "data"
    shutil.copytree(tiny_source.root, root)
    source = DatasetSource("synthetic", root, {k: root / v.name for k, v in tiny_source.lists.items()},
                           root / "classnames.txt", False)
    bad = [build(source, check_files=False).split(split)["path"][i] for split, i in corrupt]
    for path in bad:
        (root / path).write_bytes(b"not a jpeg")
    # Prepared after the damage, as a dataset whose files were bad from the start: the content hashes
    # recorded are the bad files', so extraction meets them as unreadable, not as changed since prepare.
    return build(source), bad


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_names_the_file_and_leaves_no_output(tmp_path, tiny_source, tiny_weights, workers):
    prepared, (bad,) = _with_corrupt_images(tmp_path, tiny_source, [("val", 2)])
    with pytest.raises(DataError, match=rf"cannot read image .*{bad}") as caught:
        extract.run(prepared, tiny_weights, extract.ExtractOptions(batch_size=4, workers=workers),
                    tmp_path / "out", torch.device("cpu"), "fp32")
    message = user_message(caught.value)
    assert message.startswith("cannot read image") and "`extract.on_bad_image: skip`" in message
    assert not (tmp_path / "out" / "val.h5").exists()
    assert (tmp_path / "out" / "train.h5").exists()  # splits finished before the error are kept


@pytest.mark.parametrize("workers", [0, 1])
def test_skipped_images_are_left_out_and_listed_in_the_file(tmp_path, tiny_source, tiny_weights, tiny_features,
                                                            workers):
    prepared, bad = _with_corrupt_images(tmp_path, tiny_source, [("train", 3), ("val", 2), ("test", 0), ("test", 5)])
    options = extract.ExtractOptions(batch_size=4, workers=workers, on_bad_image="skip", views=2)
    report = extract.run(prepared, tiny_weights, options, tmp_path / "out", torch.device("cpu"), "fp32")
    assert (report["train"]["skipped_images"], report["val"]["skipped_images"]) == (1, 1)
    assert report["test"]["skipped"] == bad[2:]
    views = SplitFeatures(tmp_path / "out" / "train_views.h5")
    assert views.skipped_paths == [bad[0]] * 2  # every view of the unreadable image
    assert len(views) == 2 * (len(prepared.split("train")) - 1)
    for split, rows in (("train", [3]), ("val", [2]), ("test", [0, 5])):
        clean = SplitFeatures(tiny_features / f"{split}.h5")
        kept = SplitFeatures(tmp_path / "out" / f"{split}.h5")
        keep = np.setdiff1d(np.arange(len(clean)), rows)
        assert kept.skipped_paths == [clean.paths[r] for r in rows]
        assert kept.paths == [clean.paths[r] for r in keep]
        np.testing.assert_array_equal(kept.labels, clean.labels[keep])
        np.testing.assert_array_equal(kept.pooled, clean.pooled[keep])  # batch-size independent on CPU
        np.testing.assert_array_equal(kept.tokens(np.arange(len(kept))), clean.tokens(keep))
        with h5py.File(tmp_path / "out" / f"{split}.h5", "r") as fh:
            assert fh.attrs["skipped_images"] == len(rows)
            assert all(e.decode().startswith("UnidentifiedImageError") for e in fh["skipped_errors"][:])
    assert not (tmp_path / "out" / "text.h5").exists()  # the text stage's (extract.run_text)


def test_a_clean_split_lists_no_skipped_images(tiny_features):
    with h5py.File(tiny_features / "train.h5", "r") as fh:
        assert fh["skipped_paths"].shape == (0,) and fh.attrs["skipped_images"] == 0


def test_shards_saved_under_skip_do_not_slip_through_fail(tmp_path, tiny_source, tiny_weights, monkeypatch):
    prepared, (bad,) = _with_corrupt_images(tmp_path, tiny_source, [("train", 3)])
    skip = extract.ExtractOptions(batch_size=4, workers=0, checkpoint_every=8, on_bad_image="skip")
    monkeypatch.setattr(extract, "_assemble", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed after every shard of train was saved
        extract.run(prepared, tiny_weights, skip, tmp_path / "out", torch.device("cpu"), "fp32")
    monkeypatch.undo()
    fail = extract.ExtractOptions(batch_size=4, workers=0, checkpoint_every=8, on_bad_image="fail")
    with pytest.raises(DataError, match=rf"1 unreadable image\(s\) in train: .*{bad}"):
        extract.run(prepared, tiny_weights, fail, tmp_path / "out", torch.device("cpu"), "fp32")


def test_a_split_with_no_readable_image_fails(tmp_path, tiny_source, tiny_weights):
    prepared, bad = _with_corrupt_images(tmp_path, tiny_source, [("val", i) for i in range(24)])
    options = extract.ExtractOptions(batch_size=4, workers=0, on_bad_image="skip")
    with pytest.raises(DataError, match="every image of val is unreadable"):
        extract.run(prepared, tiny_weights, options, tmp_path / "out", torch.device("cpu"), "fp32")


def test_token_reads_match_the_file_rows_in_the_order_asked(tiny_features):
    features = SplitFeatures(tiny_features / "train.h5")
    index = np.array([7, 2, 99, 2, 0])  # unsorted, with a repeat
    with h5py.File(tiny_features / "train.h5", "r") as fh:
        expected = np.stack([fh["tokens"][i] for i in index]).astype(np.float32)
    np.testing.assert_array_equal(features.tokens(index), expected)
    assert features._loaded is None, "token grids are not copied into memory by default"
    features.close()
    in_memory = SplitFeatures(tiny_features / "train.h5", load_tokens=True)
    np.testing.assert_array_equal(in_memory.tokens(index), expected)


def test_resnet_tokens_are_the_last_stage_grid(tmp_path):
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                                              "patch_size": None},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-rn-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-rn-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-rn-test").eval()
    tap = extract.TokenTap(model.visual, "pre_ln")
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model.encode_image(images)
        visual = model.visual
        grid = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    assert tap.kind == "resnet"
    assert tap.tokens.shape == (2, grid.shape[2] * grid.shape[3], grid.shape[1])  # [N, H*W, C]
    torch.testing.assert_close(tap.tokens, grid.flatten(2).transpose(1, 2))
    assert extract._token_layer_attr(model.visual, extract.ExtractOptions()) == "resnet_layer4"
    tap.remove()


def test_draft_mode_decodes_large_jpegs_smaller_but_never_below_the_input(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)).save(
        tmp_path / "big.jpg")
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    draft = extract.ImageFiles(tmp_path, ["big.jpg", "small.png"], None, draft_size=224)
    full = extract.ImageFiles(tmp_path, ["big.jpg", "small.png"], None)
    assert full.load(0)[0].size == (1024, 768)
    assert draft.load(0)[0].size == (512, 384)  # 1/2 scale; 1/4 would be 192 < 224 high
    assert draft.load(1)[0].size == (100, 100)  # not a JPEG: untouched


def test_split_file_records_checksums_of_its_bytes(tiny_features):
    """Independently computed: CRC-32 of each token row's bytes, and of the pooled array (after its dtype and shape)."""
    import zlib

    with h5py.File(tiny_features / "train.h5", "r") as fh:
        tokens, pooled = fh["tokens"][()], fh["pooled"][()]
        rows = fh["tokens_crc32"][()]
        sums = json.loads(fh.attrs["checksums"])
    assert rows.dtype == np.uint32 and len(rows) == len(tokens)
    assert [int(r) for r in rows] == [zlib.crc32(t.tobytes()) for t in tokens]
    header = zlib.crc32(f"{pooled.dtype.str}{pooled.shape}".encode())
    assert sums["pooled"] == f"{zlib.crc32(pooled.tobytes(), header):08x}"
    assert set(sums) == {"attrs", "labels", "paths", "pooled", "skipped_errors", "skipped_paths", "tokens_crc32"}
