"""DVC stage `prepare`: parses params.yaml and calls `ltpipe.data.run_stage`."""

from ltpipe.config import Params
from ltpipe.data import run_stage
from ltpipe.errors import main_guard


@main_guard
def main() -> None:
    run_stage(Params.load())


if __name__ == "__main__":
    main()
