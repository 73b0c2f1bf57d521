"""The one place that turns an image file's bytes into an 8-bit RGB PIL image.

Extraction, augmented views, fine-tuning and prepare's scan all read images through
:func:`read_rgb` (or :func:`decode_rgb`), so a file one of them accepts, every other
accepts, and converts the same way.

* Content: with an expected SHA-256 (recorded by prepare in ``manifest.csv``), the bytes
  are hashed as read, once, and decoded from memory; a file changed since prepare is an error.
* Size: Pillow's decompression-bomb limit stays; an aspect ratio over
  :data:`MAX_ASPECT_RATIO` is refused before decoding, because CLIP's shortest-side resize
  would scale the long side with it (a 1 x 100,000 file becomes 224 x 22,400,000 pixels).
* Modes: see :data:`MODE_RULES`. Alpha is dropped, not composited (what CLIP's own
  preprocessing, ``image.convert("RGB")``, does). 16-bit data are scaled by 255/65535
  (round(v / 257): the inverse of the usual 8-to-16-bit widening v * 257, so 8-bit content
  stored in 16 bits comes back exactly). Float data must lie in [0, 1] (the convention of
  float images in scikit-image, OpenCV and tifffile) and become floor(v * 255 + 0.5); anything
  else, and NaN or infinity, is refused rather than guessed (a per-image min-max stretch
  would silently change contrast from image to image).
* EXIF orientation is ignored, as by CLIP's preprocessing and most training code: pixels
  are used as stored.
* Multi-frame files (GIF, TIFF, APNG, WebP): the first frame; prepare's scan counts them.
"""

import hashlib
import io
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from ltpipe.core.errors import DataError

# SHA-256: the project's hash for every file it checks (weights too); with the CPU's SHA
# instructions it hashes about as fast as SHA-1 and twice as fast as MD5 or BLAKE2b
# (bench/fingerprint.py), far below the cost of decoding the same bytes.
HASH_NAME = "sha256"

# Longest side over shortest side. After the shortest-side resize to the model's input side
# S, the image is S x (S * ratio): at most MAX_ASPECT_RATIO times the input area (16 x 224^2 x 3
# bytes = 2.4 MB) before the centre crop. Panoramas (2:1 to 8:1) pass.
MAX_ASPECT_RATIO = 16

# What each Pillow mode becomes. Modes not listed are refused.
MODE_RULES = {
    "RGB": "used as is",
    "1": "black and white: 0 -> 0, 1 -> 255 in R, G and B",
    "L": "grey copied to R, G and B",
    "LA": "grey copied to R, G and B; alpha dropped",
    "P": "each pixel its palette colour; transparency dropped",
    "PA": "each pixel its palette colour; alpha dropped",
    "RGBA": "alpha dropped",
    "RGBX": "padding byte dropped",
    "CMYK": "R = (255 - C)(255 - K) / 255, and so on (Pillow's conversion; embedded colour profiles are not applied)",
    "YCbCr": "JPEG's full-range BT.601 YCbCr to RGB",
    "LAB": "CIE L*a*b* (a*, b* signed bytes, as TIFF stores them) to sRGB, by Pillow's LittleCMS transform",
    "HSV": "HSV to RGB",
    "I;16": "16-bit grey: round(v / 257) copied to R, G and B",
    "I;16L": "16-bit grey: round(v / 257) copied to R, G and B",
    "I;16B": "16-bit grey: round(v / 257) copied to R, G and B",
    "I;16N": "16-bit grey: round(v / 257) copied to R, G and B",
    "I": "32-bit integer grey holding 0..65535 (how Pillow decodes 16-bit PGM and some TIFFs): round(v / 257); "
         "values outside 0..65535 are refused",
    "F": "32-bit float grey in [0, 1]: floor(v * 255 + 0.5); values outside [0, 1], NaN or infinity are refused",
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class UnusableImage(DataError):
    """A readable file ltpipe refuses (its shape or colour mode): a bad image, skippable like an unreadable one."""


def content_hash(data: bytes) -> str:
    return hashlib.new(HASH_NAME, data).hexdigest()


def read_bytes(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def check_shape(width: int, height: int, path) -> None:
    """Refuse a shape whose shortest-side resize would be far larger than the model's input."""
    short, long = min(width, height), max(width, height)
    if short == 0 or long > MAX_ASPECT_RATIO * short:
        raise UnusableImage(
            f"image {path} is {width} x {height} pixels: an aspect ratio of {long / max(short, 1):,.0f}:1, over the "
            f"limit of {MAX_ASPECT_RATIO}:1 (resized so its short side is the model's input side S, it would be "
            f"S x {long / max(short, 1):,.0f}S pixels). Crop or pad it to a less extreme shape, or remove it from the "
            "list.")


def to_rgb(image: Image.Image, path) -> Image.Image:
    """``image`` (loaded or not) as 8-bit RGB, by :data:`MODE_RULES`."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode not in MODE_RULES:
        raise UnusableImage(f"image {path} has colour mode {mode!r}, which ltpipe does not convert (supported: "
                        f"{', '.join(MODE_RULES)}). Save it as 8-bit RGB or greyscale.")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the same colours, without Pillow's warning per image
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise UnusableImage(
                f"image {path} is 32-bit integer grey with values {values.min()}..{values.max()}, outside the 16-bit "
                "range 0..65535 that ltpipe scales to 8 bits. Save it as 8- or 16-bit greyscale.")
        grey = np.rint(values.astype(np.float64) / 257).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise UnusableImage(f"image {path} is 32-bit float grey holding NaN or infinite values. Replace the file.")
        if values.size and (values.min() < 0 or values.max() > 1):
            raise UnusableImage(
                f"image {path} is 32-bit float grey with values {values.min():g}..{values.max():g}; ltpipe reads "
                "float images as 0..1 (0 black, 1 white). Rescale it to 0..1, or save it as 8- or 16-bit.")
        return Image.fromarray(np.floor(values * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


class Decoded(NamedTuple):
    image: Image.Image  # 8-bit RGB
    mode: str  # the file's own colour mode
    frames: int  # frames in the file; only the first is used


def decode_rgb(data: bytes, path, draft_size: Optional[int] = None) -> Decoded:
    """Decode ``data`` (the bytes of ``path``) to 8-bit RGB.

    ``draft_size``: decode JPEGs at the smallest DCT scale keeping both sides at least this
    (Pillow's draft mode). Raises :class:`DataError` for a refused shape or mode; decoding
    errors (``OSError``, ``ValueError``, ``Image.DecompressionBombError``) propagate, so the
    caller decides whether an unreadable file is skipped.
    """
    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {path}") from None
    with opened as image:
        check_shape(image.width, image.height, path)
        mode, frames = image.mode, getattr(image, "n_frames", 1)
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        return Decoded(to_rgb(image, path), mode, frames)


def read_rgb(path, expected_hash: str = "", draft_size: Optional[int] = None) -> Decoded:
    """Read ``path`` once, check its bytes against ``expected_hash`` (if given), decode to RGB."""
    data = read_bytes(path)
    if expected_hash:
        check_hash(data, expected_hash, path)
    return decode_rgb(data, path, draft_size)


def check_hash(data: bytes, expected_hash: str, path) -> None:
    found = content_hash(data)
    if found != expected_hash:
        raise DataError(
            f"image {path} changed since prepare recorded it ({HASH_NAME} {found[:12]}..., recorded "
            f"{expected_hash[:12]}...): its features would not match data/prepared. Run `dvc repro` again: "
            "its `inputs` stage sees the new bytes, and prepare records them.")


