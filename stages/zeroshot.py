"""DVC stage `zeroshot`: parses params.yaml and calls `ltpipe.evaluation.evaluate.run_zeroshot`."""

from ltpipe.core.config import Params
from ltpipe.core.errors import main_guard
from ltpipe.evaluation.zeroshot import run_zeroshot


@main_guard
def main() -> None:
    run_zeroshot(Params.load())


if __name__ == "__main__":
    main()
