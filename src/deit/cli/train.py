"""``deit train``: train or fine-tune a DeiT student (or a CNN teacher)."""

from __future__ import annotations

import argparse
import logging

from deit.train.loop import train
from deit.train.runconfig import load_config

NAME = "train"
HELP = "train or fine-tune a DeiT student (or a CNN teacher)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="recipe file (.toml, or a run's config.json)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. optim.lr=1e-3 distill.kind=hard",
    )
    p.add_argument("--out", help="run directory (default: run.out_dir/run.name)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt (start afresh, with a warning, when there is none)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, out_dir=args.out, resume=args.resume)
    print(f"run directory: {run_dir}\nmodel: {run_dir / 'model'}")
    return 0
