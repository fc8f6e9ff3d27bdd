"""``deit plot``: a run's training curves, or several runs compared, as a PNG."""

from __future__ import annotations

import argparse

from deit.errors import UsageError
from deit.train.plot import plot_compare, plot_run

NAME = "plot"
HELP = "draw a run's training curves to a PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a `deit train` run directory; several are overlaid in one comparison plot",
    )
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png; required for several runs)")
    p.add_argument(
        "--label",
        action="append",
        help="legend entry of each run, in order (repeat; default the directories' names); "
        "runs with the same label are averaged, with a min-max band",
    )


def run(args: argparse.Namespace) -> int:
    if len(args.run_dirs) == 1 and not args.label:
        path = plot_run(args.run_dirs[0], args.out)
    elif not args.out:
        raise UsageError("--out is required with several runs or with --label")
    else:
        path = plot_compare(args.run_dirs, args.out, args.label)
    print(path)
    return 0
