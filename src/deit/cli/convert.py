"""``deit convert``: a checkpoint in our format or transformers'."""

from __future__ import annotations

import argparse

from deit.saving import convert

NAME = "convert"
HELP = "convert a checkpoint to our format or transformers'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="checkpoint file, folder or Hub id")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", choices=["deit", "hf"], required=True)
    p.add_argument("--revision")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        help="store the weights in this precision (default: as the source stores them)",
    )


def run(args: argparse.Namespace) -> int:
    out = convert(args.source, args.out, to=args.to, revision=args.revision, dtype=args.dtype)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
