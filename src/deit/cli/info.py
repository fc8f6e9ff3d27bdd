"""``deit info``: a checkpoint's architecture, preprocessing and labels."""

from __future__ import annotations

import argparse
import json

from deit.cli._args import add_model_arguments, load_kwargs
from deit.inference import load_any

NAME = "info"
HELP = "show a checkpoint's architecture, preprocessing, labels"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="one line of JSON")


def run(args: argparse.Namespace) -> int:
    # an exported file's metadata only: its graph is never compiled (the parameters are
    # counted on the meta device, from its config)
    loaded = load_any(args.model, engine=False, **load_kwargs(args))
    info = {
        "source": loaded.source,
        "format": loaded.format,
        "config": loaded.config.to_dict(),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "preprocess": loaded.preprocess.to_dict(),
        "num_labels": len(loaded.labels),
        "labels_sample": loaded.labels[:5],
        "metadata": loaded.metadata,
    }
    print(json.dumps(info, indent=None if args.json else 2, ensure_ascii=False))
    return 0
