"""DVC stage `finetune@<mode>`: see ltpipe.finetune.run.run_stage; per-step logs go to dvclive."""

import contextlib
import shutil
import sys
from typing import List, Optional

from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError, main_guard
from ltpipe.finetune.run import run_stage, trim_log


@contextlib.contextmanager
def dvclive_logger(log_dir, resume_step: int):
    if resume_step:
        trim_log(log_dir, resume_step)  # steps after the last checkpoint are trained again
    else:
        shutil.rmtree(log_dir, ignore_errors=True)  # a fresh run: no rows of an earlier one
    from dvclive import Live  # imported when logging starts, not with the module: it pulls in dvc and pandas (~0.4 s)

    # dvcyaml=None: the pipeline's dvc.yaml declares the plots; dvclive must not edit it mid-stage.
    with Live(dir=str(log_dir), resume=bool(resume_step), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        def log(row):
            live.step = row["step"]
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    live.log_metric(key, value)
            live.next_step()

        yield log


@main_guard
def main(argv: Optional[List[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise ConfigError(f"usage: python -m stages.finetune MODE (dvc.yaml passes it), got {args}")
    run_stage(Params.load(), args[0], dvclive_logger)


if __name__ == "__main__":
    main()
