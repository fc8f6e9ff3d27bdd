"""``deit quantize``: an int8 ONNX model for the CPU, with an accuracy and speed report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deit.checkpoints import load_model
from deit.cli._args import add_model_arguments, at_least, load_kwargs
from deit.deploy.openvino import format_openvino_report, quantize_openvino
from deit.deploy.quantize import format_quant_report, quantize_model
from deit.errors import UsageError
from deit.model import HEADS

NAME = "quantize"
HELP = "int8 model for the CPU (ONNX Runtime or OpenVINO), with an accuracy report"
SUFFIXES = {"onnxruntime": ".onnx", "openvino": ".xml"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("out", help="output file: .onnx (ONNX Runtime) or .xml (OpenVINO)")
    p.add_argument(
        "--engine",
        choices=list(SUFFIXES),
        default="onnxruntime",
        help="ONNX Runtime's dynamic int8, or OpenVINO with NNCF's calibrated int8",
    )
    p.add_argument(
        "--calibration",
        type=at_least(1),
        default=300,
        help="images of --data that calibrate (--engine openvino)",
    )
    p.add_argument("--data", help="fashion-mnist[:test|train] or an image folder (labelled)")
    p.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files")
    p.add_argument(
        "--limit", type=at_least(0), default=1000, help="images of --data to use (0: all)"
    )
    p.add_argument("--head", choices=HEADS, default="avg")
    p.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    p.add_argument("--bench-runs", type=at_least(0), default=100, help="timing runs (0: no timing)")
    p.add_argument("--threads", type=at_least(1), help="intra-op threads for timing (default: all)")
    p.add_argument("--keep-fp32", metavar="PATH", help="also keep the fp32 model here")
    p.add_argument(
        "--portable",
        action="store_true",
        help="quantize the portable ONNX export instead of ONNX Runtime's fused graph",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    out, suffix = Path(args.out), SUFFIXES[args.engine]
    if out.suffix != suffix or (args.keep_fp32 and Path(args.keep_fp32).resolve() == out.resolve()):
        raise UsageError(
            f"the output must be a {suffix} file other than --keep-fp32, not {args.out!r}"
        )
    loaded = load_model(args.model, **load_kwargs(args))
    if args.engine == "openvino":
        ov_report = quantize_openvino(
            loaded,
            args.out,
            data=args.data,
            data_root=args.data_root,
            limit=args.limit or None,
            calibration=args.calibration,
            head=args.head,
            bench_runs=args.bench_runs,
            threads=args.threads,
            keep_fp32=args.keep_fp32,
        )
        print(json.dumps(ov_report.to_dict()) if args.json else format_openvino_report(ov_report))
        return 0
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
