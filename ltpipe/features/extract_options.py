"""The `extract` section of params.yaml, read once into :class:`ExtractOptions`."""

from dataclasses import dataclass

from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError
from ltpipe.features import store
from ltpipe.features.encoder import TEMPLATE_SETS

TOKEN_LAYERS = ("pre_ln", "post_ln")
ON_BAD_IMAGE = ("fail", "skip")


@dataclass
class ExtractOptions:
    batch_size: int = 64
    workers: int = 2
    tokens: bool = True
    token_layer: str = "pre_ln"
    templates: str = "single"
    dtype: str = "float16"
    checkpoint_every: int = 2048  # images between saved shards (rounded to whole batches)
    views: int = 0  # augmented views of each training image, in train_views.h5 (0: none)
    view_seed: int = 0
    view_min_scale: float = 0.08  # smallest crop area, as a share of the image (Imbalance-VLM: 0.08)
    draft: bool = False  # decode large JPEGs at reduced size (Pillow draft mode)
    on_bad_image: str = "fail"  # fail | skip (skipped rows are left out and listed in the HDF5 file)

    def validate(self) -> None:
        if self.token_layer not in TOKEN_LAYERS:
            raise ConfigError(f"`extract.token_layer` is {self.token_layer!r}; valid: {', '.join(TOKEN_LAYERS)}.")
        if self.templates not in TEMPLATE_SETS:
            raise ConfigError(f"`extract.templates` is {self.templates!r}; valid: {', '.join(TEMPLATE_SETS)}.")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(f"`extract.on_bad_image` is {self.on_bad_image!r}; valid: {', '.join(ON_BAD_IMAGE)}.")
        if self.dtype not in store.DTYPES:
            raise ConfigError(f"`extract.dtype` is {self.dtype!r}; valid: {', '.join(store.DTYPES)}.")


def options_from_params(params: Params) -> ExtractOptions:
    section = params.sub("extract")
    options = ExtractOptions(
        batch_size=section.int("batch_size", minimum=1),
        workers=section.int("workers", minimum=0),
        tokens=section.bool("tokens"),
        token_layer=section.str("token_layer", choices=TOKEN_LAYERS),
        templates=section.str("templates", choices=TEMPLATE_SETS),
        dtype=section.str("dtype", choices=tuple(store.DTYPES)),
        checkpoint_every=section.int("checkpoint_every", minimum=1),
        views=section.int("views", minimum=0),
        view_seed=section.int("view_seed", minimum=0),
        view_min_scale=section.float("view_min_scale", minimum=0, maximum=1, exclusive_minimum=True),
        draft=section.bool("draft"),
        on_bad_image=section.str("on_bad_image", choices=ON_BAD_IMAGE),
    )
    options.validate()
    return options
