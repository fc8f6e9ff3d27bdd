"""Arguments and helpers that several subcommands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from deit.checkpoints import DEFAULT_MODEL
from deit.inference import Classifier
from deit.runtime import PRECISIONS


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (anything else is a usage error)."""

    def parse(text: str) -> int:
        value = int(text)  # argparse reports a ValueError as "invalid <name> value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` and the loading options every model-taking subcommand shares."""
    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help="checkpoint file or folder, embedded model (fashion-mnist), variant "
        f"name or Hub id (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument(
        "--preprocess",
        default="auto",
        choices=["auto", "model-card", "official", "timm"],
        help="preprocessing: the checkpoint's own (auto) or a named one",
    )
    p.add_argument("--labels", help="label file (one name per line, a JSON list or index map)")


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """``--precision``, ``--compile`` and ``--fast-decode``, for commands with a Classifier."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (reference), bf16/fp16 weights, or int8 linear layers (CPU only)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (slow first batch)"
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="on the CPU, the fastest verified engine installed (OpenVINO, same logits within "
        "1e-4; with --precision bf16, OpenVINO's bf16); says which",
    )
    p.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode large JPEGs at reduced size: faster, approximate (docs/performance.md)",
    )


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``load_model`` keywords of :func:`add_model_arguments`' options."""
    return {"revision": args.revision, "preprocess": args.preprocess, "labels": args.labels}


def classifier_from_args(args: argparse.Namespace) -> Classifier:
    """The ``Classifier`` asked for by the model, speed and ``--device`` arguments."""
    return Classifier.from_pretrained(
        args.model,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        fast_decode=args.fast_decode,
        fast=args.fast,
        **load_kwargs(args),
    )
