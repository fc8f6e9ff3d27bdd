"""``deit export``: ONNX or torch.export, verified against eager PyTorch on real images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deit.checkpoints import load_model
from deit.cli._args import add_model_arguments, load_kwargs
from deit.deploy.export import (
    DEFAULT_OPSET,
    export_onnx,
    export_torch,
    format_report,
    load_inputs,
    verify_export,
)
from deit.deploy.openvino import export_openvino
from deit.deploy.ort_graph import OPSET as ORT_OPSET
from deit.errors import EXIT_INPUT_FAILED, UsageError
from deit.inference import expand_paths
from deit.model import HEADS

NAME = "export"
HELP = "export to ONNX, torch.export or OpenVINO and verify on real images"
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2", "openvino": ".xml"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("out", help="output file: .onnx, .pt2, or .xml (OpenVINO IR, with its .bin)")
    p.add_argument("--format", choices=list(SUFFIXES), default="onnx")
    p.add_argument("--head", choices=HEADS, default="avg", help="logits to export (default avg)")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension")
    p.add_argument(
        "--opset",
        type=int,
        help=f"ONNX opset (default {DEFAULT_OPSET}; {ORT_OPSET} with --ort-fused)",
    )
    p.add_argument(
        "--ort-fused",
        action="store_true",
        help="ONNX Runtime's fused Attention operator: faster on its CPU provider, "
        "runs in ONNX Runtime only",
    )
    p.add_argument(
        "--images", nargs="+", help="images, folders or globs to verify on (default: samples)"
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Write the file, verify it, print the report (exit 1 if it differs)."""
    suffix = SUFFIXES[args.format]
    if Path(args.out).suffix != suffix:
        raise UsageError(f"--format {args.format} writes a {suffix} file, not {args.out!r}")
    images = expand_paths(args.images) if args.images else None
    loaded = load_model(args.model, **load_kwargs(args))
    if images is not None:
        load_inputs(loaded, images)  # a bad image fails now, before anything is written
    if args.format == "openvino":
        path = export_openvino(loaded, args.out, head=args.head)
    elif args.format == "onnx":
        path = export_onnx(
            loaded,
            args.out,
            head=args.head,
            dynamic_batch=args.dynamic_batch,
            opset=args.opset,
            fused=args.ort_fused,
        )
    else:
        path = export_torch(loaded, args.out, head=args.head, dynamic_batch=args.dynamic_batch)
    report = verify_export(path, loaded, images, tolerance=args.tolerance, raise_on_failure=False)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        size = sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.is_file())
        print(f"wrote {path} ({size / 1e6:.1f} MB)")
        print(format_report(report))
    return 0 if report.passed else EXIT_INPUT_FAILED
