"""The images of a prepared split as a torch dataset, decoded for the image tower."""

from pathlib import Path
from typing import Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset

from ltpipe.core.errors import DataError
from ltpipe.data.images import UnusableImage, read_rgb
from ltpipe.data.manifest import Prepared


class ImageFiles(Dataset):
    """Images of a split. With ``draft_size``, JPEGs are decoded at the smallest DCT scale
    (1/2, 1/4, 1/8) that keeps both sides at least ``draft_size`` (Pillow's draft mode):
    much less decoding for images far larger than the model input, slightly different
    pixels, so it is opt-in (``extract.draft``).

    Images are read and converted by :mod:`ltpipe.data.images`. With ``hashes`` (prepare's
    ``sha256`` column), each file's bytes must still be those prepare hashed.

    With ``skip_bad``, an unreadable (or refused) image yields a black placeholder and its
    error, so the batch goes on; the placeholder's row is dropped when the file is assembled.
    A file changed since prepare is never skipped: the dataset itself is out of date."""

    def __init__(self, root: Path, paths: Sequence[str], transform, draft_size: Optional[int] = None,
                 skip_bad: bool = False, hashes: Optional[Sequence[str]] = None):
        self.root = Path(root)
        self.paths = list(paths)
        self.transform = transform
        self.draft_size = draft_size
        self.skip_bad = skip_bad
        self.hashes = list(hashes) if hashes is not None else None

    @classmethod
    def of_split(cls, prepared: Prepared, split: str, transform, draft_size: Optional[int] = None,
                 skip_bad: bool = False) -> "ImageFiles":
        """The images of a prepared split, checked against prepare's content hashes."""
        rows = prepared.split(split)
        return cls(prepared.root, rows["path"].tolist(), transform, draft_size, skip_bad,
                   prepared.content_hashes(split))

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Tuple[Image.Image, str]:
        """The image as RGB and ``""``, or (skipping) a placeholder and the reason it is unreadable."""
        path = self.root / self.paths[index]
        try:
            return read_rgb(path, self.hashes[index] if self.hashes else "", self.draft_size).image, ""
        except UnusableImage as exc:
            if self.skip_bad:
                return Image.new("RGB", (32, 32)), f"{type(exc).__name__}: {exc}"
            raise DataError(f"{exc} Or set `extract.on_bad_image: skip` to leave it out (it is then listed in the "
                            "feature file).") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            if self.skip_bad:
                return Image.new("RGB", (32, 32)), f"{type(exc).__name__}: {exc}"
            raise DataError(
                f"cannot read image {path}: {exc}. Replace or remove the file and re-run extraction, or set "
                "`extract.on_bad_image: skip` to leave it out (it is then listed in the feature file)."
            ) from None

    def __getitem__(self, index: int):
        image, error = self.load(index)
        return self.transform(image), index, error
