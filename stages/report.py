"""DVC stage `report`: parses params.yaml and calls `ltpipe.evaluation.report.run_report`."""

from ltpipe.core.config import Params
from ltpipe.core.errors import main_guard
from ltpipe.evaluation.report import run_report


@main_guard
def main() -> None:
    run_report(Params.load())


if __name__ == "__main__":
    main()
