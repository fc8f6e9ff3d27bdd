"""``deit data pack``: write WebDataset shards (and ``classes.json``) from an image folder
or a Hugging Face ``datasets`` source, for streamed, multi-node training."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from deit.errors import UsageError

NAME = "data"
HELP = "prepare training data: pack an image folder or datasets source into WebDataset shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    pk = sub.add_parser("pack", help="write WebDataset tar shards + classes.json")
    pk.add_argument(
        "source",
        help="image folder (class folders), datasets save_to_disk folder, Parquet file/glob "
        "or Hub name",
    )
    pk.add_argument("out_dir", help="folder for SPLIT-000000.tar, ... and classes.json")
    pk.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    pk.add_argument("--split", default="train", help="split of a datasets source (and shard name)")
    pk.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="convert images to 1 or 3 channels (default: keep each image's mode)",
    )


def run(args: argparse.Namespace) -> int:
    from deit.train.packing import pack

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.action != "pack":
        raise UsageError(f"unknown action {args.action!r}")
    out = Path(args.out_dir)
    meta = pack(
        args.source, out, shard_size=args.shard_size, split=args.split, channels=args.channels
    )
    shards = sorted(meta["shards"])
    where = f"{out}/{shards[0]} .. {shards[-1]}" if shards else str(out)
    print(
        f"{meta['samples']} samples, {len(meta['classes'])} classes in {len(shards)} "
        f"shard{'s' * (len(shards) != 1)} {where}"
        + (f" ({meta['bad']} unreadable skipped)" if meta["bad"] else "")
    )
    return 0
