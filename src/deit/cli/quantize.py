"""``deit quantize``: an int8 ONNX model for the CPU, with an accuracy and speed report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deit.checkpoints import load_model
from deit.cli._args import add_model_arguments, at_least, load_kwargs
from deit.deploy.export import HEADS
from deit.deploy.quantize import format_quant_report, quantize_model
from deit.errors import UsageError

NAME = "quantize"
HELP = "int8 ONNX model for the CPU, with an accuracy report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("out", help="output .onnx file")
    p.add_argument("--data", help="fashion-mnist[:test|train] or an image folder (labelled)")
    p.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files")
    p.add_argument(
        "--limit", type=at_least(0), default=1000, help="images of --data to use (0: all)"
    )
    p.add_argument("--head", choices=HEADS, default="avg")
    p.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    p.add_argument("--bench-runs", type=at_least(0), default=100, help="timing runs (0: no timing)")
    p.add_argument("--threads", type=at_least(1), help="intra-op threads for timing (default: all)")
    p.add_argument("--keep-fp32", metavar="PATH", help="also keep the fp32 ONNX model here")
    p.add_argument(
        "--portable",
        action="store_true",
        help="quantize the portable ONNX export instead of ONNX Runtime's fused graph",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".onnx" or (
        args.keep_fp32 and Path(args.keep_fp32).resolve() == out.resolve()
    ):
        raise UsageError(
            f"the output must be a .onnx file other than --keep-fp32, not {args.out!r}"
        )
    loaded = load_model(args.model, **load_kwargs(args))
    report = quantize_model(
        loaded,
        args.out,
        data=args.data,
        data_root=args.data_root,
        limit=args.limit or None,
        head=args.head,
        per_channel=args.per_channel,
        bench_runs=args.bench_runs,
        threads=args.threads,
        keep_fp32=args.keep_fp32,
        fused=not args.portable,
    )
    print(json.dumps(report.to_dict()) if args.json else format_quant_report(report))
    return 0
