"""``deit predict``: classify image files, folders or globs."""

from __future__ import annotations

import argparse
import json
import sys

from deit.cli._args import (
    add_model_arguments,
    add_speed_arguments,
    at_least,
    classifier_from_args,
)
from deit.errors import EXIT_INPUT_FAILED, UsageError
from deit.inference import expand_paths
from deit.ood import OODResult
from deit.runtime import require

NAME = "predict"
HELP = "classify image files, folders or globs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("paths", nargs="+", help="image files, folders (recursive) or globs")
    p.add_argument("--top-k", "-k", type=int, default=5)
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_speed_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="decoding threads")
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    ray = p.add_argument_group("distributed batch inference (Ray Data; pip install 'deit[ray]')")
    ray.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="ray: decode in Ray tasks, run the model in Ray actors, write --out",
    )
    ray.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    ray.add_argument("--out", help="results file: .jsonl or .parquet (a folder of parts)")
    ray.add_argument("--actors", type=at_least(1), help="model actors (default: one per GPU)")
    ray.add_argument("--resume", action="store_true", help="skip inputs already in --out")


def run(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return run_ray(args)
    if args.out or args.address or args.resume or args.actors:
        raise UsageError("--out, --address, --actors and --resume go with --engine ray")
    if args.top_k < 1 or args.batch_size < 1:
        raise UsageError("--top-k and --batch-size must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {args.workers}")
    paths = expand_paths(args.paths)
    if not paths:
        raise UsageError("no input images")
    clf = classifier_from_args(args)
    if args.fast:
        print(f"deit predict: engine: {clf.engine}", file=sys.stderr)
    failed = 0
    progress = len(paths) > 20 and sys.stderr.isatty()
    for result in clf.predict_files(
        paths, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers, progress=progress
    ):
        failed += result.error is not None
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
        elif result.error:
            print(f"{result.path}: error: {result.error}", flush=True)
        else:
            top = "\n".join(f"  {p.score:7.2%}  {p.label}  [{p.index}]" for p in result.predictions)
            print(f"{result.path}\n{top}{unusual_line(result.ood)}", flush=True)
    if failed:
        print(f"deit: {failed} of {len(paths)} inputs failed", file=sys.stderr)
    return EXIT_INPUT_FAILED if failed else 0


def unusual_line(ood: OODResult | None) -> str:
    """The warning printed under an image unlike the training data ("" for the others)."""
    if ood is None or not ood.unusual:
        return ""
    return (
        f"\n  ! unusual: this image is unlike the model's training data, so the classes above "
        f"may mean nothing (score {ood.score:.3g}, {ood.method})"
    )


def run_ray(args: argparse.Namespace) -> int:
    """``--engine ray``: the job of :func:`deit.deploy.batch.predict_to_file`."""
    import logging

    from deit.deploy.batch import predict_to_file

    if not args.out:
        raise UsageError("--engine ray writes its results to a file: give --out X.jsonl|X.parquet")
    if args.compile or args.fast or args.labels or args.revision or args.preprocess != "auto":
        raise UsageError("--engine ray takes the model as it is: drop the loading/speed options")
    ray_data = require("ray.data", "ray[data]", "ray")
    # The command prints its own summary: Ray's per-step progress logs would drown it.
    for name in ("ray", "ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ray_data.DataContext.get_current().enable_progress_bars = False
    ray_data.DataContext.get_current().print_on_execution_start = False
    counts = predict_to_file(
        args.model,
        args.paths,
        args.out,
        address=args.address,
        top_k=args.top_k,
        batch_size=args.batch_size,
        actors=args.actors,
        precision=args.precision,
        fast_decode=args.fast_decode,
        resume=args.resume,
        progress=sys.stderr.isatty(),
    )
    print(
        f"deit predict: {counts['written']} written to {args.out} ({counts['errors']} errors), "
        f"{counts['skipped']} of {counts['inputs']} already there"
        + (f"; {counts['dropped']} lines that held no record dropped" if counts["dropped"] else ""),
        file=sys.stderr,
    )
    return EXIT_INPUT_FAILED if counts["errors"] else 0
