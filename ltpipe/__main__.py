"""`python -m ltpipe list [KIND ...] [--markdown] [--write FILE]`: every name a user can type."""

import argparse
import sys
from pathlib import Path

from ltpipe import catalog
from ltpipe.core.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="heads, losses, samplers, stage-2 methods, datasets, fine-tuning "
                                               "modes: names, tasks, options with defaults")
    listing.add_argument("kinds", nargs="*", metavar="KIND", help=f"any of {', '.join(catalog.KINDS)} (default: all)")
    listing.add_argument("--markdown", action="store_true", help="Markdown tables (the methods reference)")
    listing.add_argument("--write", type=Path, metavar="FILE",
                         help="replace the GENERATED block of FILE (docs/methods.md) instead of printing")
    args = parser.parse_args(argv)
    kinds = args.kinds or list(catalog.KINDS)
    try:
        output = catalog.markdown(kinds) if args.markdown or args.write else catalog.text(kinds)
        if args.write:
            catalog.write_block(args.write, output)
            print(f"wrote the {', '.join(kinds)} reference into {args.write}")
        else:
            print(output, end="" if output.endswith("\n") else "\n")
    except ConfigError as exc:
        print(f"ltpipe error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
