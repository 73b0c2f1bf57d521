"""DVC stage `report`: parses params.yaml and calls `ltpipe.report.run_report`."""

from ltpipe.config import Params
from ltpipe.errors import main_guard
from ltpipe.report import run_report


@main_guard
def main() -> None:
    run_report(Params.load())


if __name__ == "__main__":
    main()
