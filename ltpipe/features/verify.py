"""Check every checksum of feature cache files: ``python -m ltpipe.features.verify [files]``.

Without arguments, every ``data/features/*.h5``. Prints one line per file and exits 1 if
any file is damaged or carries no checksums, naming it and the fix. Reads every byte of
the checked datasets: about as long as copying the files.
"""

import argparse
import sys
from pathlib import Path

from ltpipe.core import paths
from ltpipe.core.errors import DataError
from ltpipe.features import store


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path,
                        help=f"cache files (default: {paths.FEATURES_DIR}/*.h5 and {paths.TEXT_FEATURES})")
    files = parser.parse_args(argv).files or [*sorted(paths.FEATURES_DIR.glob("*.h5")),
                                              *([paths.TEXT_FEATURES] if paths.TEXT_FEATURES.is_file() else [])]
    if not files:
        print(f"ltpipe error: no feature cache files in {paths.FEATURES_DIR}. Run `dvc repro extract` or name the "
              "files.", file=sys.stderr)
        return 1
    failed = 0
    for path in files:
        try:
            checked = store.verify_file(path)
        except DataError as exc:
            failed += 1
            print(f"ltpipe error: {exc}", file=sys.stderr)
            continue
        if checked:
            print(f"ok {path}")
        else:
            failed += 1
            print(f"ltpipe error: {path} carries no checksums (written by an older ltpipe or another tool), so it "
                  "cannot be verified. Re-extract it to add them: delete it and run `dvc repro -f extract`.",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
