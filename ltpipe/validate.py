"""Every option check that needs no data, run before any image is read (issue 25, part 3).

The `train`, sweep-cell and fine-tuning stages read their options when they start, which on a first
`dvc repro` comes after extraction (hours on a benchmark): a bad `train.lr` or `heads.decoder.depth`
would be refused only then. The `inputs` stage, first on every run, calls :func:`check_once`, which
reads those options the way those stages will, so the same one-line refusal comes before any work.

The checks import torch and the training code (about 2 s), so they run only when params.yaml's
content is new to this user: the contents already checked are remembered beside the stat cache, and
an unchanged `dvc repro` stays within its budget. What needs the data (a loss's variant for a task
the dataset decides, features for the decoder's tokens) is still checked where the data is read.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import ltpipe
from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError

_REMEMBERED = 256  # contents of params.yaml remembered as checked


def check_once(params: Params, cache_folder: Path) -> bool:
    """:func:`check_options` unless this content of params.yaml passed before; whether it ran. A record
    that cannot be read or written only means the checks run again."""
    key = hashlib.sha256(f"{ltpipe.__version__}\n{json.dumps(params.data, sort_keys=True, default=str)}"
                         .encode()).hexdigest()
    record = Path(cache_folder) / "checked-params"
    try:
        checked = record.read_text().split()
    except OSError:
        checked = []
    if key in checked:
        return False
    check_options(params)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f"{record.name}.{os.getpid()}")
        partial.write_text("\n".join([*checked[-(_REMEMBERED - 1):], key]) + "\n")
        os.replace(partial, record)
    except OSError:
        pass
    return True


def dataset_task(params: Params) -> Optional[str]:
    """`task`, or with `task: auto` the dataset's own (None where only its data can tell)."""
    from ltpipe.datasets.registry import DATASETS
    from ltpipe.evaluation.results import TASKS

    task = params.str("task", choices=TASKS)
    if task != "auto":
        return task
    name = params.str("dataset")
    tasks = DATASETS.capability(name, "tasks")
    if len(tasks) == 1:
        return tasks[0]
    multilabel = getattr(DATASETS.options(name, params), "multilabel", None)
    return None if multilabel is None else ("multi" if multilabel else "single")


def check_options(params: Params) -> None:
    """Read the main experiment's, every sweep cell's and every listed fine-tuning mode's options as
    their stages will (the same refusals, raised here)."""
    from ltpipe import losses
    from ltpipe.evaluation.report import sweep_list
    from ltpipe.evaluation.results import check_posthoc
    from ltpipe.finetune import modes
    from ltpipe.finetune.model import check_head
    from ltpipe.finetune.train import FinetuneConfig
    from ltpipe.training import stage2
    from ltpipe.training.spec import read_run_spec

    task = dataset_task(params)
    if task is None:
        return
    main = read_run_spec(params, task)
    if main.stage2 is not None:
        stage2.check_head(main.stage2.name, main.head)
    check_posthoc(params, task == "multi")
    sweep = params.sub("sweep")
    for head in sweep_list(sweep, "heads", str):
        for loss in sweep_list(sweep, "losses", str):
            if losses.LOSSES.get(loss).for_task(task) is None:
                continue  # the sweep skips this cell, saying so
            for seed in sweep_list(sweep, "seeds", int):
                read_run_spec(params, task, head=head, loss=loss, seed=seed, sampler_key="sweep.sampler",
                              train_key="sweep.train", with_stage2=False)
    finetune = params.sub("finetune")
    listed = finetune.raw("modes")
    if not isinstance(listed, list) or not all(isinstance(mode, str) for mode in listed):
        raise ConfigError(f"`finetune.modes` must be a list of mode names (e.g. `[bitfit]`; `[]`: none), got "
                          f"{listed!r}.")
    for mode in listed:
        check_head(modes.build(mode, modes.MODES.options(mode, params)), main.head)
        FinetuneConfig.from_params(finetune.sub("train"))
