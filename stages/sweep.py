"""DVC matrix stage `sweep@<head>-<loss>-<seed>`: one cell, see ltpipe.training.sweep.run_cell."""

import sys

from ltpipe.core.config import Params
from ltpipe.core.errors import ConfigError, main_guard
from ltpipe.training.sweep import run_cell


@main_guard
def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or not args[2].isdigit():
        raise ConfigError(f"usage: python -m stages.sweep HEAD LOSS SEED (dvc.yaml passes them), got {args}")
    run_cell(Params.load(), args[0], args[1], int(args[2]))


if __name__ == "__main__":
    main()
