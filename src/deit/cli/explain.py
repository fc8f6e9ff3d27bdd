"""``deit explain``: the attention rollout of an image, as an overlay PNG."""

from __future__ import annotations

import argparse

from deit.checkpoints import load_model
from deit.cli._args import add_model_arguments, load_kwargs
from deit.errors import EXIT_INPUT_FAILED, ImageLoadError
from deit.explain import explain_to_file

NAME = "explain"
HELP = "attention rollout map of an image (cls / dist token)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("image", help="image file")
    p.add_argument("--token", choices=["cls", "dist", "both"], default="both")
    p.add_argument("--out", "-o", required=True, help="output PNG")


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, **load_kwargs(args))
    try:
        path = explain_to_file(loaded, args.image, args.out, args.token)
    except ImageLoadError as e:  # the command ran, and its one input could not be read
        e.args = (f"{args.image}: {e}",)
        e.exit_code = EXIT_INPUT_FAILED
        raise
    print(f"wrote {path}")
    return 0
