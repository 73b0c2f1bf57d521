"""Reliability: image modes beyond 8-bit RGB, and shapes whose resize would explode (issue 15).

Each mode case builds its pixels by hand with numpy, saves them with Pillow in that mode (in
a format that keeps the mode), reads the file through the loader every stage uses
(:func:`ltpipe.data.images.read_rgb`, behind ``ImageFiles``) and compares with the 8-bit RGB
the test computes itself by an independent formula. Refused cases must raise a
:class:`DataError` naming the file, and prepare's scan must agree with the loader on every
case (same decoder). RGBX and HSV cannot come from a file (no format Pillow reads keeps them),
so their conversion is checked in memory.

Shape cases are real tiny files of extreme aspect ratio, read with CLIP's own preprocessing
(open_clip's ``image_transform``). A sentinel on ``PIL.Image.Image.resize`` fails the test
before any resize to more than :data:`RESIZE_LIMIT` pixels, so the test shows the unfixed
loader's gigabyte resize without ever allocating it.
"""

import colorsys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltpipe.core.errors import DataError, user_message
from ltpipe.data import images
from ltpipe.data.scan import check_image
from ltpipe.features.image_files import ImageFiles

H, W = 5, 6
RNG = np.random.default_rng(15)
PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1).astype(np.uint8)


def _round_16_to_8(values: np.ndarray) -> np.ndarray:
    """16-bit full range to 8 bits, rounding half up, in integers: (v * 255 + 32767) // 65535."""
    return ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def _sixteen_bit() -> np.ndarray:
    values = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    values.flat[:4] = [0, 65535, 257 * 100, 32768]
    return values


def _float_unit() -> np.ndarray:
    values = RNG.random((H, W)).astype(np.float32)
    values.flat[:3] = [0.0, 1.0, 0.5]
    return values


def case_1(path):
    bits = RNG.random((H, W)) > 0.5
    Image.fromarray(bits).save(path)
    return _grey(bits * 255)


def case_L(path):
    values = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(values, "L").save(path)
    return _grey(values)


def case_LA(path):
    values = RNG.integers(0, 256, (H, W, 2), dtype=np.uint8)
    Image.fromarray(values, "LA").save(path)
    return _grey(values[..., 0])  # alpha dropped, grey kept


def _palette_image(mode="P"):
    index = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(PALETTE.flatten().tolist())
    return image, PALETTE[index]


def case_P(path):
    image, expected = _palette_image()
    image.save(path)
    return expected


def case_P_transparency(path):
    image, expected = _palette_image()
    image.save(path, transparency=bytes(RNG.integers(0, 256, 256, dtype=np.uint8)))
    return expected  # each pixel its palette colour, transparency dropped


def case_PA(path):
    image, expected = _palette_image()
    alpha = Image.fromarray(RNG.integers(0, 256, (H, W), dtype=np.uint8), "L")
    image = image.convert("PA")
    image.putalpha(alpha)
    image.save(path)
    return expected


def case_RGB(path):
    values = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(values, "RGB").save(path)
    return values


def case_RGBA(path):
    values = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(values, "RGBA").save(path)
    return values[..., :3]


def case_CMYK(path):
    values = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(values, "CMYK").save(path)
    ink, black = values[..., :3].astype(float), values[..., 3:].astype(float)
    return np.floor((255 - ink) * (255 - black) / 255 + 0.5).astype(np.uint8)  # no colour profile


def case_YCbCr(path):
    values = RNG.integers(16, 240, (H, W, 3), dtype=np.uint8)
    Image.fromarray(values, "YCbCr").save(path)
    y, cb, cr = (values[..., i].astype(float) for i in range(3))
    # JPEG (JFIF) full-range BT.601
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], axis=-1)
    return np.floor(rgb + 0.5).clip(0, 255).astype(np.uint8)


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* bytes (L* scaled to 0..255, a*, b* signed) to sRGB, D65 white (IEC 61966-2-1)."""
    light = lab[..., 0].astype(float) * 100 / 255
    a = lab[..., 1].astype(np.int8).astype(float)
    b = lab[..., 2].astype(np.int8).astype(float)
    fy = (light + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200

    def inverse(t):
        return np.where(t ** 3 > 216 / 24389, t ** 3, (116 * t - 16) / (24389 / 27))

    xyz = np.stack([0.95047 * inverse(fx), inverse(fy), 1.08883 * inverse(fz)], axis=-1)
    to_rgb = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                       [0.0556434, -0.2040259, 1.0572252]])
    linear = (xyz @ to_rgb.T).clip(0, 1)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.floor(srgb * 255 + 0.5).astype(np.uint8)


def case_LAB(path):
    light = RNG.integers(40, 230, (H, W))
    a, b = RNG.integers(-20, 21, (2, H, W))
    values = np.stack([light, a % 256, b % 256], axis=-1).astype(np.uint8)
    values[0, 0] = (128, 0, 0)  # a neutral grey
    Image.fromarray(values, "LAB").save(path)
    return _lab_to_srgb(values)


def case_I(path):
    values = _sixteen_bit().astype(np.int32)
    Image.fromarray(values, "I").save(path)
    return _grey(_round_16_to_8(values))


def _save_16(path, values, mode):
    image = Image.new(mode, (W, H))
    image.frombytes(values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    image.save(path)


def case_I16(path):
    values = _sixteen_bit()
    _save_16(path, values, "I;16")
    return _grey(_round_16_to_8(values))


def case_I16B(path):
    values = _sixteen_bit()
    _save_16(path, values, "I;16B")
    return _grey(_round_16_to_8(values))


def case_I16L(path):
    values = _sixteen_bit()
    _save_16(path, values, "I;16L")
    return _grey(_round_16_to_8(values))


def case_F(path):
    values = _float_unit()
    Image.fromarray(values, "F").save(path)
    return _grey(np.floor(values.astype(np.float64) * 255 + 0.5))


def case_I_out_of_range(path):
    values = _sixteen_bit().astype(np.int32)
    values[0, 0] = 70000
    Image.fromarray(values, "I").save(path)
    return "outside the 16-bit range"


def case_F_out_of_range(path):
    Image.fromarray(_float_unit() * 300, "F").save(path)
    return "reads float images as 0..1"


def case_F_nan(path):
    values = _float_unit()
    values[1, 1] = np.nan
    Image.fromarray(values, "F").save(path)
    return "NaN or infinite"


def case_gif_frames(path):
    first, expected = _palette_image()
    second, _ = _palette_image()
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0, optimize=False)
    return expected


def case_tiff_pages(path):
    pages = RNG.integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    Image.fromarray(pages[0]).save(path, save_all=True, append_images=[Image.fromarray(pages[1])])
    return pages[0]


def case_exif_rotated(path):
    values = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(values).save(path, exif=exif)
    return values  # ignored, like CLIP's preprocessing: pixels as stored


# id -> (file name, builder, the mode the file opens in, frames)
CASES = {
    "mode_1": ("a.png", case_1, "1", 1),
    "mode_L": ("a.png", case_L, "L", 1),
    "mode_LA": ("a.png", case_LA, "LA", 1),
    "mode_P": ("a.png", case_P, "P", 1),
    "mode_P_transparency": ("a.png", case_P_transparency, "P", 1),
    "mode_PA": ("a.tif", case_PA, "PA", 1),
    "mode_RGB": ("a.png", case_RGB, "RGB", 1),
    "mode_RGBA": ("a.png", case_RGBA, "RGBA", 1),
    "mode_CMYK": ("a.tif", case_CMYK, "CMYK", 1),
    "mode_YCbCr": ("a.tif", case_YCbCr, "YCbCr", 1),
    "mode_LAB": ("a.tif", case_LAB, "LAB", 1),
    "mode_I_32bit_int": ("a.tif", case_I, "I", 1),
    "mode_I16_png": ("a.png", case_I16, "I;16", 1),
    "mode_I16B_tiff": ("a.tif", case_I16B, "I;16B", 1),
    "mode_I16L_tiff": ("a.tif", case_I16L, "I;16", 1),
    "mode_F_32bit_float": ("a.tif", case_F, "F", 1),
    "mode_I_beyond_16bit_refused": ("a.tif", case_I_out_of_range, "I", 1),
    "mode_F_beyond_0_1_refused": ("a.tif", case_F_out_of_range, "F", 1),
    "mode_F_nan_refused": ("a.tif", case_F_nan, "F", 1),
    "multi_frame_gif_first_frame": ("a.gif", case_gif_frames, "P", 2),
    "multi_frame_tiff_first_page": ("a.tif", case_tiff_pages, "RGB", 2),
    "exif_orientation_ignored": ("a.png", case_exif_rotated, "RGB", 1),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_image_mode(case, tmp_path):
    name, build, mode, frames = CASES[case]
    path = tmp_path / name
    expected = build(path)
    with Image.open(path) as opened:
        assert opened.mode == mode, f"the file does not open in the mode under test: {opened.mode}"
    files = ImageFiles(tmp_path, [name], None)
    scanned_mode, scanned_frames, scan_error = check_image(str(path))
    if isinstance(expected, str):  # refused, naming the file and why, by the loader and by the scan alike
        with pytest.raises(DataError) as caught:
            files.load(0)
        message = user_message(caught.value)
        assert str(path) in message and expected in message, message
        assert scanned_mode is None and expected in scan_error, scan_error
        placeholder, error = ImageFiles(tmp_path, [name], None, skip_bad=True).load(0)
        assert expected in error and placeholder.size == (32, 32)
        return
    image, error = files.load(0)
    assert error == "" and image.mode == "RGB" and image.size == (W, H)
    got = np.asarray(image)
    if case == "mode_LAB":  # LittleCMS (D50 connection space, adapted) against the plain D65 formula
        difference = np.abs(got.astype(int) - expected.astype(int))
        assert difference.mean() < 2.5 and difference.max() <= 16, difference
        assert np.ptp(got[0, 0].astype(int)) <= 2, f"neutral grey came out coloured: {got[0, 0]}"
    elif case in ("mode_YCbCr", "mode_CMYK"):  # Pillow's fixed-point arithmetic against the real-valued formula
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    else:
        np.testing.assert_array_equal(got, expected)
    assert (scanned_mode, scanned_frames, scan_error) == (mode, frames, None)


@pytest.mark.parametrize("case", ["mode_RGBX_in_memory", "mode_HSV_in_memory"],
                         ids=["mode_RGBX_in_memory", "mode_HSV_in_memory"])
def test_mode_without_a_file_format(case):
    values = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    if case == "mode_RGBX_in_memory":
        padded = np.concatenate([values, np.full((H, W, 1), 255, np.uint8)], axis=-1)
        got = np.asarray(images.to_rgb(Image.fromarray(padded, "RGBX"), "x"))
        np.testing.assert_array_equal(got, values)
        return
    got = np.asarray(images.to_rgb(Image.fromarray(values, "HSV"), "x")).astype(int)
    want = np.array([[colorsys.hsv_to_rgb(*(values[i, j] / 255)) for j in range(W)] for i in range(H)]) * 255
    assert np.abs(got - want).max() <= 1


def test_unknown_mode_refused():
    with pytest.raises(DataError, match=r"colour mode 'La'.*supported"):
        images.to_rgb(Image.new("La", (2, 2)), "odd.png")


# --- shapes -----------------------------------------------------------------------------------------------------

RESIZE_LIMIT = 50 * 224 * 224  # pixels: far above any accepted resize, far below a gigabyte
SHAPES = {  # id -> (width, height, refused)
    "shape_1x100000_tall": (1, 100_000, True),
    "shape_100000x1_wide": (100_000, 1, True),
    "shape_3x60000_tall": (3, 60_000, True),
    "shape_17x1_over_limit": (17 * 4, 4, True),
    "shape_16x1_at_limit": (16 * 4, 4, False),
}


@pytest.fixture
def resize_sentinel(monkeypatch):
    """Fail any resize to more than RESIZE_LIMIT pixels before it allocates."""
    original = Image.Image.resize

    def guarded(self, size, *args, **kwargs):
        assert size[0] * size[1] <= RESIZE_LIMIT, f"resize to {size[0]} x {size[1]} pixels attempted"
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", guarded)


@pytest.mark.parametrize("case", list(SHAPES), ids=list(SHAPES))
def test_extreme_shape(case, tmp_path: Path, resize_sentinel):
    from open_clip import image_transform

    width, height, refused = SHAPES[case]
    path = tmp_path / "shape.png"
    Image.new("RGB", (width, height), (200, 30, 90)).save(path)
    assert path.stat().st_size < 2_000
    files = ImageFiles(tmp_path, ["shape.png"], image_transform(224, is_train=False))
    if not refused:
        tensor, _, error = files[0]
        assert error == "" and tuple(tensor.shape) == (3, 224, 224)
        assert check_image(str(path))[2] is None
        return
    with pytest.raises(DataError) as caught:
        files[0]
    message = user_message(caught.value)
    assert str(path) in message and f"{width} x {height} pixels" in message and "limit of 16:1" in message, message
    assert "aspect ratio" in check_image(str(path))[2]
    _, _, error = ImageFiles(tmp_path, ["shape.png"], image_transform(224, is_train=False), skip_bad=True)[0]
    assert "limit of 16:1" in error
