"""The `extract` section of params.yaml, read once into :class:`ExtractOptions`.

Each field is declared with :func:`ltpipe.core.options.option`, the only place its default and
bounds are written: :func:`options_from_params` parses the section (an unknown key, such as a
misspelt `extract.batchsize`, is refused naming the valid ones) and :meth:`ExtractOptions.validate`
checks options built in code against the same bounds.
"""

from dataclasses import dataclass

from ltpipe.core.config import Params
from ltpipe.core.options import check, option, parse
from ltpipe.features import store
from ltpipe.features.encoder import TEMPLATE_SETS

TOKEN_LAYERS = ("pre_ln", "post_ln")
ON_BAD_IMAGE = ("fail", "skip")


@dataclass(frozen=True)
class ExtractOptions:
    """How the `extract` stage runs the image encoder over every split (`extract` in params.yaml)."""

    batch_size: int = option(64, minimum=1, doc="images per encoder forward pass")
    workers: int = option(2, minimum=0, doc="DataLoader worker processes")
    tokens: bool = option(True, doc="cache the token grid (needed by the decoder head)")
    token_layer: str = option("pre_ln", choices=TOKEN_LAYERS,
                              doc="pre_ln (before the final LayerNorm, as Imbalance-VLM) or post_ln")
    templates: str = option("single", choices=TEMPLATE_SETS,
                            doc='single ("a photo of a {}.") or imagenet80 (CLIP\'s 80 templates, averaged)')
    dtype: str = option("float16", choices=tuple(store.DTYPES), doc="the cached features' float type")
    checkpoint_every: int = option(2048, minimum=1,
                                   doc="images per saved shard (whole batches): a killed extraction resumes "
                                       "from the last one")
    views: int = option(0, minimum=0,
                        doc="augmented views (random resized crop + flip) of each training image, in "
                            "train_views.h5; 0: none")
    view_seed: int = option(0, minimum=0, doc="seed of the augmented views")
    view_min_scale: float = option(0.08, above=0, maximum=1,
                                   doc="smallest random crop, as a share of the image area (Imbalance-VLM: 0.08)")
    draft: bool = option(False, doc="decode large JPEGs at 1/2-1/8 scale, never below the model input "
                                    "(Pillow draft mode: faster, pixels differ)")
    on_bad_image: str = option("fail", choices=ON_BAD_IMAGE,
                               doc="fail, or skip (unreadable images are left out, listed in the .h5 file and "
                                   "the report)")
    launcher: str = option("python", doc="read by dvc.yaml, not by Python: the command running the stage "
                                         "(`${extract.launcher} -m stages.extract`), e.g. "
                                         "\"torchrun --nproc_per_node 4\" for several GPUs/processes")

    def validate(self) -> None:
        """Refuse options built in code whose values lie outside the declared bounds and choices."""
        check(self, "extract")


def options_from_params(params: Params) -> ExtractOptions:
    """The `extract` section of ``params`` (a missing key takes its default, an unknown one is refused)."""
    return parse(ExtractOptions, params.sub("extract"))
