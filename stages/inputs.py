"""DVC stage `inputs`: parses params.yaml and calls `ltpipe.datasets.inputs.run_stage`."""

from ltpipe.core.config import Params
from ltpipe.core.errors import main_guard
from ltpipe.datasets.inputs import run_stage


@main_guard
def main() -> None:
    run_stage(Params.load())


if __name__ == "__main__":
    main()
