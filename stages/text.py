"""DVC stage `text`: parses params.yaml and calls `ltpipe.features.extract.run_text_stage`."""

from ltpipe.core.config import Params
from ltpipe.core.errors import main_guard
from ltpipe.features.extract import run_text_stage


@main_guard
def main() -> None:
    run_text_stage(Params.load())


if __name__ == "__main__":
    main()
