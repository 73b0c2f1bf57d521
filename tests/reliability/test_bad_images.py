"""Reliability: bad and unusual image files, one kind at a time (issue 9).

Kinds, each placed at the same row (train row 3, label 0) of a small listed dataset
(the ``custom`` layout: ``relative/path label`` lists and a plain class-name file):

* bad, the file cannot be used: ``missing``, ``zero_bytes``, ``truncated_jpeg``
  (a JPEG cut to half its bytes), ``text_as_jpg``. Default: a :class:`DataError`
  naming the file and the fix (``prepare.on_bad_image``/``extract.on_bad_image: skip``),
  from prepare (existence check always; decode only with ``scan_images: true``) and
  from extract (when prepare did not scan). With ``skip``: the row is left out and
  recorded (prepare's report / the HDF5 file's ``skipped_paths``), and everything
  else equals a clean run over the good images only.
* valid but unusual: ``cmyk_jpeg``, ``greyscale`` (an "L" JPEG), ``palette_png_transparency``
  (a "P" PNG with a tRNS chunk of partial alphas), ``huge_10000`` (a 10,000 x 10,000
  JPEG: 1e8 pixels, above Pillow's decompression-bomb *warning* threshold, 89.5e6,
  below its *error* threshold, 179e6). They must be read as RGB: the loader's pixels
  are checked against ground truth built independently of the loader, and the cached
  features must equal those of the same pixels saved as a plain RGB PNG.

Tolerance of the feature comparisons: none (``assert_array_equal``), except against a
clean run when a row was skipped (one float16 step; see ``_assert_same_features``). The reference
PNG holds exactly the RGB pixels the conversion must give (checked pixel for pixel
first), so the model sees bit-identical input tensors in identical batches; CPU
inference is deterministic (the project's byte-identical extraction relies on it), so
any difference at all means the image was read differently.
"""

import json
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ltpipe.core.errors import DataError, user_message
from ltpipe.data.manifest import build, save
from ltpipe.data.source import DatasetSource, PrepareOptions
from ltpipe.features import extract, models
from ltpipe.features.store import SplitFeatures

KINDS = ["missing", "zero_bytes", "truncated_jpeg", "text_as_jpg", "cmyk_jpeg", "greyscale",
         "palette_png_transparency", "huge_10000"]
BAD = {"missing", "zero_bytes", "truncated_jpeg", "text_as_jpg"}
FILES = {
    "missing": "train/missing.jpg",
    "zero_bytes": "train/zero_bytes.jpg",
    "truncated_jpeg": "train/truncated.jpg",
    "text_as_jpg": "train/text.jpg",
    "cmyk_jpeg": "train/cmyk.jpg",
    "greyscale": "train/grey.jpg",
    "palette_png_transparency": "train/palette.png",
    "huge_10000": "train/huge.jpg",
}
# What the decoder says about each bad kind (the reason must reach the user).
REASONS = {
    "missing": "No such file or directory",
    "zero_bytes": "cannot identify image file",
    "truncated_jpeg": "truncated",
    "text_as_jpg": "cannot identify image file",
}
MODES = {"cmyk_jpeg": "CMYK", "greyscale": "L", "palette_png_transparency": "P", "huge_10000": "RGB"}
ODD_ROW = 3  # the kind's row in the train list
HUGE = 10_000
HUGE_BLOCK = 200  # the huge image is a 50 x 50 grid of flat 200-pixel blocks
PALETTE = np.array([[255, 255, 255], [200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
PALETTE_ALPHA = bytes([0, 128, 255, 255])  # index 0 fully transparent, 1 half transparent
BASE_TRAIN = [(f"train/base_{i}.png", i % 2) for i in range(8)]
VAL = [("val/v0.png", 0), ("val/v1.png", 1)]
TEST = [("test/t0.png", 0), ("test/t1.png", 1)]


def _picture() -> np.ndarray:
    """A colourful 60 x 80 picture: gradients and a red rectangle."""
    y, x = np.mgrid[0:60, 0:80]
    picture = np.stack([x * 3, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    picture[15:40, 20:50] = (220, 40, 40)
    return picture


def _palette_indices() -> np.ndarray:
    y, x = np.mgrid[0:60, 0:80]
    return ((x // 10 + y // 10) % 4).astype(np.uint8)


def _huge_blocks() -> np.ndarray:
    return np.random.default_rng(9).integers(0, 256, (HUGE // HUGE_BLOCK, HUGE // HUGE_BLOCK, 3), dtype=np.uint8)


def _write_kind(kind: str, path: Path) -> None:
    picture = _picture()
    if kind == "missing":
        return
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "truncated_jpeg":
        Image.fromarray(picture).save(path, quality=90)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "text_as_jpg":
        path.write_text("this is a text file, not a JPEG\n" * 20)
    elif kind == "cmyk_jpeg":
        Image.fromarray(picture).convert("CMYK").save(path, quality=95)
    elif kind == "greyscale":
        Image.fromarray(picture).convert("L").save(path, quality=95)
    elif kind == "palette_png_transparency":
        image = Image.fromarray(_palette_indices(), "P")
        image.putpalette(PALETTE.flatten().tolist())
        image.save(path, transparency=PALETTE_ALPHA)
    elif kind == "huge_10000":
        Image.fromarray(_huge_blocks()).resize((HUGE, HUGE), Image.NEAREST).save(path, quality=90)


def _write_list(path: Path, entries) -> Path:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in entries))
    return path


class Lab:
    """One dataset root holding every kind's file, list files per variant, the tiny
    model loaded once, and cached reference extractions."""

    def __init__(self, tmp: Path, weights):
        self.tmp = tmp
        self.root = tmp / "data"
        self.timings = {}
        started = time.perf_counter()
        rng = np.random.default_rng(0)
        for sub in ("train", "val", "test", "ref", "lists"):
            (self.root / sub).mkdir(parents=True)
        for rel, _ in BASE_TRAIN + VAL + TEST:
            blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(blocks).resize((56, 42), Image.BILINEAR).save(self.root / rel)
        (self.root / "classnames.txt").write_text("red circle\nblue square\n")
        for kind in KINDS:
            _write_kind(kind, self.root / FILES[kind])
            if kind not in BAD:  # the same pixels as a plain RGB PNG
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rgb = Image.open(self.root / FILES[kind]).convert("RGB")
                rgb.save(self.root / "ref" / f"{kind}.png", compress_level=1)
                del rgb
        self.timings["build files"] = time.perf_counter() - started
        self.val = _write_list(self.root / "lists" / "val.txt", VAL)
        self.test = _write_list(self.root / "lists" / "test.txt", TEST)
        self.model, self.preprocess, _ = models.load(weights, torch.device("cpu"))
        self._features = {}
        self._prepared = {}

    def source(self, variant: str) -> DatasetSource:
        """``variant``: a kind (its file at row 3), ``clean`` (no row 3) or ``ref_<kind>`` (the RGB PNG there)."""
        train = list(BASE_TRAIN)
        if variant in KINDS:
            train.insert(ODD_ROW, (FILES[variant], 0))
        elif variant.startswith("ref_"):
            train.insert(ODD_ROW, (f"ref/{variant[4:]}.png", 0))
        else:
            assert variant == "clean"
        lists = {"train": _write_list(self.root / "lists" / f"{variant}_train.txt", train),
                 "val": self.val, "test": self.test}
        return DatasetSource("custom", self.root, lists, self.root / "classnames.txt", False)

    def extract(self, prepared, out: Path, on_bad_image: str, work: Path) -> dict:
        options = extract.ExtractOptions(batch_size=4, workers=0, on_bad_image=on_bad_image)
        options.validate()
        return extract.extract_split(self.model, self.preprocess, prepared, "train", out, options,
                                     torch.device("cpu"), "fp32", {}, work)

    def prepared(self, variant: str):
        if variant not in self._prepared:
            self._prepared[variant] = build(self.source(variant))
        return self._prepared[variant]

    def features(self, variant: str) -> SplitFeatures:
        """Train features of a clean or reference variant (default settings), extracted once."""
        if variant not in self._features:
            out = self.tmp / "features" / variant / "train.h5"
            started = time.perf_counter()
            report = self.extract(self.prepared(variant), out, "fail", self.tmp / "partial")
            self.timings[f"extract {variant}"] = time.perf_counter() - started
            assert report["skipped_images"] == 0
            self._features[variant] = SplitFeatures(out, load_tokens=True)
        return self._features[variant]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_weights):
    lab = Lab(tmp_path_factory.mktemp("bad_images"), tiny_weights)
    yield lab
    print(f"\nbad-image lab timings: { {k: round(v, 2) for k, v in lab.timings.items()} }")


def _kinds():
    return pytest.mark.parametrize("kind", KINDS, ids=KINDS)


def _expected_train(variant_rel: str):
    train = [rel for rel, _ in BASE_TRAIN]
    train.insert(ODD_ROW, variant_rel)
    return train


def _check_pixels(lab: Lab, kind: str, image: Image.Image) -> None:
    """The loader's RGB pixels against ground truth built without the loader."""
    assert image.mode == "RGB"
    if kind == "huge_10000":
        assert image.size == (HUGE, HUGE)
        blocks = _huge_blocks()
        # Block centres, far from JPEG's ringing at block edges: within JPEG error of the source.
        centres = np.arange(HUGE_BLOCK // 2, HUGE, HUGE_BLOCK)[::7]
        got = np.array([[image.getpixel((int(x), int(y))) for x in centres] for y in centres], dtype=int)
        want = blocks[::7, ::7].astype(int)
        assert np.abs(got - want).max() <= 12, "the huge JPEG's colours are wrong"
        return
    pixels = np.asarray(image).astype(int)
    assert pixels.shape == (60, 80, 3)
    if kind == "cmyk_jpeg":
        # Pillow writes CMYK as C = 255 - R ... with K = 0; read back it must give the picture
        # again (up to JPEG error), not its negative (Adobe inversion) or a naive channel drop.
        error = np.abs(pixels - _picture().astype(int))
        assert error.mean() < 3 and np.percentile(error, 99) < 16, f"CMYK colours wrong: mean error {error.mean()}"
    elif kind == "greyscale":
        with Image.open(lab.root / FILES[kind]) as grey:
            assert grey.mode == "L"
            luma = np.asarray(grey).astype(int)
        for channel in range(3):
            np.testing.assert_array_equal(pixels[..., channel], luma)  # grey copied to R, G and B
        source_luma = np.asarray(Image.fromarray(_picture()).convert("L")).astype(int)
        assert np.abs(luma - source_luma).mean() < 3
    elif kind == "palette_png_transparency":
        # Each pixel is its palette entry's colour (what open_clip's own preprocessing,
        # image.convert("RGB"), gives; transparent pixels keep their palette colour).
        np.testing.assert_array_equal(pixels, PALETTE[_palette_indices()].astype(int))


def _assert_same_features(got: SplitFeatures, want: SplitFeatures, batch_shapes_differ: bool = False) -> None:
    """Bit-identical, unless the two runs batched the rows differently (a skipped row shifts the
    rows after it into other batches, and the last batch's size changes): CPU matrix products
    then differ in the last float32 bits, which can move a float16 feature by one step."""
    assert got.pooled.shape == want.pooled.shape
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.tokens(np.arange(len(got))), want.tokens(np.arange(len(want))))
    if batch_shapes_differ:
        one_step = np.abs(want.pooled.astype(np.float32)) * 2.0**-10 + 2.0**-24
        assert (np.abs(got.pooled.astype(np.float32) - want.pooled.astype(np.float32)) <= one_step).all()
        return
    differ = np.argwhere(got.pooled != want.pooled)
    assert not len(differ), (
        f"pooled features differ at {len(differ)} element(s) (row, column) {differ[:5].tolist()}, "
        f"max |diff| {np.abs(got.pooled - want.pooled).max():.3g}")


def _prepare_message_names_file(message: str, lab: Lab, kind: str) -> None:
    rel = FILES[kind]
    assert rel in message, f"the message does not name {rel}: {message}"
    assert str(lab.root) in message, f"the message does not name the image root: {message}"
    assert "`prepare.on_bad_image: skip`" in message, message
    assert ("missing" if kind == "missing" else REASONS[kind]) in message, message


@_kinds()
def test_prepare_default(lab, kind):
    """prepare, `on_bad_image: fail`: bad files stop it naming the file (a missing one
    always; an undecodable one when `scan_images: true`); valid odd images pass the scan,
    their colour mode recorded."""
    rel = FILES[kind]
    source = lab.source(kind)
    scan = PrepareOptions(scan_images=True)
    if kind in BAD:
        with pytest.raises(DataError) as caught:
            build(source, scan)
        _prepare_message_names_file(user_message(caught.value), lab, kind)
        if kind == "missing":
            with pytest.raises(DataError) as caught:
                build(source, PrepareOptions(scan_images=False))
            _prepare_message_names_file(user_message(caught.value), lab, kind)
        else:  # documented: without the scan, prepare only checks that the file exists
            unscanned = build(source, PrepareOptions(scan_images=False))
            assert unscanned.split("train")["path"].tolist() == _expected_train(rel)
        return
    prepared = build(source, scan)
    report = prepared.report
    assert report["scan"]["bad"] == {}
    assert "missing_skipped" not in report
    non_rgb = {MODES[kind]: 1} if MODES[kind] != "RGB" else {}
    assert report["scan"]["modes"] == dict(sorted({"RGB": 12 if non_rgb else 13, **non_rgb}.items()))
    assert report["scan"]["converted_to_rgb"] == len(non_rgb)
    train = prepared.split("train")
    assert train["path"].tolist() == _expected_train(rel)
    assert train["labels"][ODD_ROW] == "0"


@_kinds()
def test_prepare_skip(lab, kind, tmp_path):
    """prepare, `scan_images: true, on_bad_image: skip`: a bad file is left out and listed in
    the report (report.json); the manifest and class table equal those of a list without it.
    Valid odd images are kept, nothing is skipped."""
    rel = FILES[kind]
    prepared = build(lab.source(kind), PrepareOptions(scan_images=True, on_bad_image="skip"))
    report = prepared.report
    if kind in BAD:
        clean = lab.prepared("clean")
        pd.testing.assert_frame_equal(prepared.manifest, clean.manifest)
        pd.testing.assert_frame_equal(prepared.classes, clean.classes)
        assert report["images"] == {"train": 8, "val": 2, "test": 2}
        if kind == "missing":
            assert report["missing_skipped"] == [rel]
            assert report["scan"]["bad"] == {}
        else:
            assert list(report["scan"]["bad"]) == [rel]
            assert REASONS[kind] in report["scan"]["bad"][rel]
            assert "missing_skipped" not in report
        save(prepared, tmp_path / "prepared")
        written = json.loads((tmp_path / "prepared" / "report.json").read_text())
        assert rel in json.dumps(written), "the skipped image is not listed in report.json"
        return
    default = build(lab.source(kind), PrepareOptions(scan_images=True))
    pd.testing.assert_frame_equal(prepared.manifest, default.manifest)
    assert prepared.split("train")["path"].tolist() == _expected_train(rel)
    assert report["scan"]["bad"] == {} and "missing_skipped" not in report


@_kinds()
def test_extract_default(lab, kind, tmp_path):
    """extract, `on_bad_image: fail`, prepare did not scan (a missing file: deleted after
    prepare): a bad file fails with its full path, the reason and the fix, and leaves no
    split file; a valid odd image is read as the right RGB pixels and gives exactly the
    features of those pixels saved as a plain RGB PNG."""
    rel = FILES[kind]
    prepared = build(lab.source(kind), PrepareOptions(), check_files=kind != "missing")
    out = tmp_path / "features" / "train.h5"
    if kind in BAD:
        with pytest.raises(DataError) as caught:
            lab.extract(prepared, out, "fail", tmp_path / "partial")
        message = user_message(caught.value)
        assert message.startswith(f"cannot read image {lab.root / rel}"), message
        assert REASONS[kind] in message, message
        assert "`extract.on_bad_image: skip`" in message, message
        assert not out.exists() and not list(out.parent.glob("*")), "a failed extraction left a split file"
        return
    image, error = extract.ImageFiles(lab.root, [rel], None).load(0)
    assert error == ""
    _check_pixels(lab, kind, image)
    with Image.open(lab.root / "ref" / f"{kind}.png") as ref:
        assert ref.mode == "RGB" and ref.size == image.size
        ref.load()
        for top in range(0, image.height, 1000):  # in strips: no full-size copies of the huge image
            box = (0, top, image.width, min(top + 1000, image.height))
            assert image.crop(box).tobytes() == ref.crop(box).tobytes(), "loader pixels differ from the RGB reference"
    del image
    started = time.perf_counter()
    report = lab.extract(prepared, out, "fail", tmp_path / "partial")
    lab.timings[f"extract {kind} (fail)"] = time.perf_counter() - started
    got = SplitFeatures(out, load_tokens=True)
    assert report["skipped_images"] == 0 and got.skipped_paths == []
    assert got.paths == _expected_train(rel)
    _assert_same_features(got, lab.features(f"ref_{kind}"))


@_kinds()
def test_extract_skip(lab, kind, tmp_path):
    """extract, `on_bad_image: skip`, prepare did not scan: a bad file's row is left out and
    recorded (report, `skipped_paths`, `skipped_errors`, `skipped_images`), and the split file
    equals an extraction of the good images only; a valid odd image is not skipped and gives
    the reference features."""
    rel = FILES[kind]
    prepared = build(lab.source(kind), PrepareOptions(), check_files=kind != "missing")
    out = tmp_path / "features" / "train.h5"
    started = time.perf_counter()
    report = lab.extract(prepared, out, "skip", tmp_path / "partial")
    lab.timings[f"extract {kind} (skip)"] = time.perf_counter() - started
    got = SplitFeatures(out, load_tokens=True)
    with h5py.File(out, "r") as fh:
        errors = [e.decode() if isinstance(e, bytes) else e for e in fh["skipped_errors"][:]]
        skipped_attr = int(fh.attrs["skipped_images"])
    if kind in BAD:
        assert report["skipped_images"] == 1 and report["skipped"] == [rel]
        assert got.skipped_paths == [rel]
        assert skipped_attr == 1 and len(errors) == 1 and REASONS[kind] in errors[0], errors
        clean = lab.features("clean")
        assert got.paths == clean.paths == [p for p, _ in BASE_TRAIN]
        _assert_same_features(got, clean, batch_shapes_differ=True)
        return
    assert report["skipped_images"] == 0 and got.skipped_paths == [] and errors == [] and skipped_attr == 0
    assert got.paths == _expected_train(rel)
    _assert_same_features(got, lab.features(f"ref_{kind}"))


@pytest.mark.parametrize("kind", ["decompression_bomb"])
def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch, kind):
    """Over Pillow's error limit (2 x MAX_IMAGE_PIXELS, 179 Mpixels by default; lowered here so a
    small file trips it), Pillow raises DecompressionBombError, which is neither OSError nor
    ValueError: it must still fail naming the file (default), or be skipped."""
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"bomb\.png.*decompression bomb.*on_bad_image: skip"):
        extract.ImageFiles(tmp_path, ["bomb.png"], None).load(0)
    placeholder, error = extract.ImageFiles(tmp_path, ["bomb.png"], None, skip_bad=True).load(0)
    assert "DecompressionBombError" in error and placeholder.size == (32, 32)
