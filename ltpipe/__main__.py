"""`python -m ltpipe list [KIND ...] [--markdown] [--write FILE]`: every name a user can type.
`python -m ltpipe presets [list [PATTERN ...] | show NAME | run NAME [--queue] [--print] [-S key=value ...]]`:
the papers' setups (docs/presets.md)."""

import argparse
import subprocess
import sys
from pathlib import Path

from ltpipe import catalog, presets
from ltpipe.core.errors import ConfigError

PRESET_ACTIONS = ("list", "show", "run")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltpipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="heads, losses, samplers, stage-2 methods, datasets, fine-tuning "
                                               "modes: names, tasks, options with defaults")
    listing.add_argument("kinds", nargs="*", metavar="KIND", help=f"any of {', '.join(catalog.KINDS)} (default: all)")
    listing.add_argument("--markdown", action="store_true", help="Markdown tables (the methods reference)")
    listing.add_argument("--write", type=Path, metavar="FILE",
                         help="replace the GENERATED block of FILE (docs/methods.md) instead of printing")
    preset_parser = commands.add_parser("presets", help="the papers' setups: list, show or run one as a DVC "
                                                        "experiment")
    actions = preset_parser.add_subparsers(dest="action")
    preset_list = actions.add_parser("list", help="the presets (the default action)")
    preset_list.add_argument("patterns", nargs="*", metavar="PATTERN", help="only names containing every PATTERN")
    show = actions.add_parser("show", help="a preset's params, deviations from the paper and published figure")
    show.add_argument("name")
    run = actions.add_parser("run", help="`dvc exp run` the preset as an experiment named after it")
    run.add_argument("name")
    run.add_argument("--queue", action="store_true", help="queue it (`dvc queue start` runs the queue)")
    run.add_argument("--print", dest="dry", action="store_true", help="print the command, do not run it")
    run.add_argument("--exp-name", metavar="EXP", help="the experiment's name (default: the preset's)")
    run.add_argument("-S", "--set-param", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                     help="a param on top of the preset's (as `dvc exp run -S`); repeatable")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["presets"] and (len(argv) == 1 or argv[1] not in PRESET_ACTIONS + ("-h", "--help")):
        argv.insert(1, "list")  # `presets [PATTERN ...]` lists
    args = parser.parse_args(argv)
    try:
        if args.command == "presets":
            return presets_command(args)
        kinds = args.kinds or list(catalog.KINDS)
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


def presets_command(args) -> int:
    if args.action == "show":
        print(presets.describe(presets.get(args.name)))
        print("run it with:\n  python -m ltpipe presets run " + args.name)
        return 0
    if args.action == "run":
        preset = presets.get(args.name)
        cmd = presets.command(preset, queue=args.queue, name=args.exp_name, extra=args.extra)
        print(" ".join(presets.hydra_quote(part) for part in cmd), flush=True)
        if args.dry:
            return 0
        try:
            return subprocess.run(cmd).returncode
        except FileNotFoundError:
            raise ConfigError("`dvc` is not on PATH: activate the project's environment (`source "
                              ".venv/bin/activate`) and run this again, or run the printed command yourself.") from None
    patterns = getattr(args, "patterns", None) or []
    chosen = presets.matching(patterns)
    if not chosen:
        raise ConfigError(f"no preset name contains {' and '.join(map(repr, patterns))}; "
                          "`python -m ltpipe presets` lists them all.")
    width = max(len(p.name) for p in chosen)
    family = None
    for preset in chosen:
        if preset.family != family:
            family = preset.family
            print(f"{'' if preset is chosen[0] else chr(10)}{family}: {preset.paper}; {preset.table}")
        figure = ", ".join(f"{k} {v:.2f}" for k, v in (preset.published or {}).items()) or "-"
        print(f"  {preset.name:<{width}}  {preset.row}  [published: {figure}]")
    print(f"\n{len(chosen)} preset(s). `python -m ltpipe presets show NAME` prints one; "
          "`python -m ltpipe presets run NAME [--queue]` runs it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
