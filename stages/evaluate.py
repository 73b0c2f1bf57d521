"""DVC stage `evaluate`: parses params.yaml and calls `ltpipe.evaluation.evaluate.run_evaluate`."""

from ltpipe.core.config import Params
from ltpipe.core.errors import main_guard
from ltpipe.evaluation.evaluate import run_evaluate


@main_guard
def main() -> None:
    run_evaluate(Params.load())


if __name__ == "__main__":
    main()
