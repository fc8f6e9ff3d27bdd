"""``deit predict``: classify image files, folders or globs."""

from __future__ import annotations

import argparse
import json
import sys

from deit.cli._args import add_model_arguments, add_speed_arguments, classifier_from_args
from deit.errors import EXIT_INPUT_FAILED, UsageError
from deit.inference import expand_paths

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


def run(args: argparse.Namespace) -> int:
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
            print(f"{result.path}\n{top}", flush=True)
    if failed:
        print(f"deit: {failed} of {len(paths)} inputs failed", file=sys.stderr)
    return EXIT_INPUT_FAILED if failed else 0
