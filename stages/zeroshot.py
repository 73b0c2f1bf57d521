"""DVC stage `zeroshot`: parses params.yaml and calls `ltpipe.evaluation.run_zeroshot`."""

from ltpipe.config import Params
from ltpipe.errors import main_guard
from ltpipe.evaluation import run_zeroshot


@main_guard
def main() -> None:
    run_zeroshot(Params.load())


if __name__ == "__main__":
    main()
