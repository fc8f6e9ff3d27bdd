"""The ``deit`` command: thin subcommands over the library.

Every subcommand parses its arguments, calls one library function and prints the result.
Expected failures (a missing file, a bad checkpoint, an unreadable image) print one line on
stderr and set the exit code; they never show a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from deit.checkpoints import DEFAULT_MODEL
from deit.inference import PRECISIONS, Classifier

EXIT_INPUT_FAILED = 1  # ran, but some inputs could not be processed
EXIT_USAGE = 2  # nothing ran: bad arguments, model or data


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
    """``--precision`` and ``--compile``, for commands that build a ``Classifier``."""
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
        "--fast-decode",
        action="store_true",
        help="decode large JPEGs at reduced size: faster, approximate (docs/performance.md)",
    )


def classifier_from_args(args: argparse.Namespace) -> Classifier:
    """The ``Classifier`` asked for by the model, speed and ``--device`` arguments."""
    return Classifier.from_pretrained(
        args.model,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        fast_decode=args.fast_decode,
        revision=args.revision,
        preprocess=args.preprocess,
        labels=args.labels,
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from deit.inference import expand_paths

    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError("--top-k and --batch-size must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, not {args.workers}")
    clf = classifier_from_args(args)
    paths = expand_paths(args.paths)
    if not paths:
        raise ValueError("no input images")
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


def cmd_convert(args: argparse.Namespace) -> int:
    from deit.checkpoints import convert

    out = convert(args.source, args.out, to=args.to, revision=args.revision, dtype=args.dtype)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from deit.inference import load_any

    loaded = load_any(
        args.model, revision=args.revision, preprocess=args.preprocess, labels=args.labels
    )
    model = loaded.model
    if loaded.format == "onnx":  # count the exported DeiT's parameters, not ONNX initializers
        from deit.model import DeiT

        model = DeiT(loaded.config)
    info = {
        "source": loaded.source,
        "format": loaded.format,
        "config": loaded.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "preprocess": loaded.preprocess.to_dict(),
        "num_labels": len(loaded.labels),
        "labels_sample": loaded.labels[:5],
        "metadata": loaded.metadata,
    }
    print(json.dumps(info, indent=None if args.json else 2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="classify image files, folders or globs")
    add_model_arguments(p)
    p.add_argument("paths", nargs="+", help="image files, folders (recursive) or globs")
    p.add_argument("--top-k", "-k", type=int, default=5)
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_speed_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="decoding threads")
    p.add_argument("--json", action="store_true", help="one JSON object per input line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("convert", help="convert a checkpoint to our format or transformers'")
    p.add_argument("source", help="checkpoint file, folder or Hub id")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", choices=["deit", "hf"], required=True)
    p.add_argument("--revision")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        help="store the weights in this precision (default: as the source stores them)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="show a checkpoint's architecture, preprocessing, labels")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_info)

    for register in _extra_commands():
        register(sub)
    return parser


# Subcommands defined next to their library modules: (name, help, module, add-args, run).
_MODULE_COMMANDS = (
    (
        "train",
        "train or fine-tune a DeiT student (or a CNN teacher)",
        "deit.train",
        "add_train_arguments",
        "run_train_command",
    ),
    (
        "eval",
        "top-1/top-5 of each head on a dataset",
        "deit.evaluate",
        "add_eval_arguments",
        "run_eval_command",
    ),
    (
        "plot",
        "draw a run's training curves to a PNG",
        "deit.plot",
        "add_plot_arguments",
        "run_plot_command",
    ),
    (
        "bench",
        "deit vs timm vs transformers: throughput, latency, memory, logit error",
        "deit.bench",
        "add_bench_arguments",
        "run_bench_command",
    ),
    (
        "export",
        "export to ONNX or torch.export and verify on real images",
        "deit.export",
        "add_export_arguments",
        "run_export_command",
    ),
    (
        "quantize",
        "int8 ONNX model for the CPU, with an accuracy report",
        "deit.quantize",
        "add_quantize_arguments",
        "run_quantize_command",
    ),
    (
        "serve",
        "HTTP API and web page with dynamic batching",
        "deit.serve",
        "add_serve_arguments",
        "run_serve_command",
    ),
    (
        "explain",
        "attention rollout map of an image (cls / dist token)",
        "deit.explain",
        "add_explain_arguments",
        "run_explain_command",
    ),
)


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Registration functions for the subcommands that live in their own modules."""
    import importlib

    def make(name: str, help: str, module: str, add: str, run: str) -> Callable[..., None]:
        def register(sub: argparse._SubParsersAction) -> None:
            mod = importlib.import_module(module)
            p = sub.add_parser(name, help=help)
            getattr(mod, add)(p)
            p.set_defaults(func=getattr(mod, run))

        return register

    return [make(*spec) for spec in _MODULE_COMMANDS]


# Failures a user can cause or fix (bad input, a missing file or package, a diverging run):
# one line on stderr. DEIT_DEBUG=1 shows the traceback instead.
_EXPECTED_ERRORS = (ValueError, OSError, ImportError, RuntimeError, ArithmeticError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deit`` console script."""
    import os

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `deit ... | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE
    except _EXPECTED_ERRORS as e:  # CheckpointError and ImageLoadError are ValueErrors
        if os.environ.get("DEIT_DEBUG"):
            raise
        message = str(e) or type(e).__name__
        print(f"deit {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"deit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
