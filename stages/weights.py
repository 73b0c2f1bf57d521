"""DVC stage `weights`: parses params.yaml and calls `ltpipe.features.models.run_stage`."""

from ltpipe.core.config import Params
from ltpipe.core.errors import main_guard
from ltpipe.features.models import run_stage


@main_guard
def main() -> None:
    run_stage(Params.load())


if __name__ == "__main__":
    main()
