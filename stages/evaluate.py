"""DVC stage `evaluate`: parses params.yaml and calls `ltpipe.evaluation.run_evaluate`."""

from ltpipe.config import Params
from ltpipe.errors import main_guard
from ltpipe.evaluation import run_evaluate


@main_guard
def main() -> None:
    run_evaluate(Params.load())


if __name__ == "__main__":
    main()
