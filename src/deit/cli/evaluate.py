"""``deit eval``: top-1/top-5 of each head on a dataset."""

from __future__ import annotations

import argparse
import json

from deit.errors import EXIT_INPUT_FAILED
from deit.train.evaluate import EvalReport, evaluate

NAME = "eval"
HELP = "top-1/top-5 of each head on a dataset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint, model directory or Hub id")
    p.add_argument(
        "--data",
        default="fashion-mnist:test",
        help="fashion-mnist[:test|train] or an image-folder directory",
    )
    p.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--teacher", help="also score this teacher and the agreement")
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="allow a teacher file that runs code when loaded (TorchScript; a .pt2 holding "
        "pickles): only for files you trust",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--confusion-matrix", metavar="PNG", help="write the confusion matrix")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def summary(report: EvalReport) -> str:
    """The one-line result: top-1/top-5, each head, the teacher and the agreement."""
    line = (
        f"{report.source} on {report.data} ({report.num_samples} images): "
        f"top-1 {100 * report.top1:.2f}%  top-5 {100 * report.top5:.2f}%  "
        f"cls head {100 * report.cls_top1:.2f}%"
    )
    if report.dist_top1 is not None:
        line += f"  dist head {100 * report.dist_top1:.2f}%"
    if report.teacher_top1 is not None:
        line += f"  teacher {100 * report.teacher_top1:.2f}%  agreement "
        line += f"{100 * (report.agreement or 0.0):.2f}%"
    return line


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 1 when some images could not be read."""
    report = evaluate(
        args.model,
        args.data,
        teacher=args.teacher,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        num_workers=args.num_workers,
        data_root=args.data_root,
        confusion_matrix=args.confusion_matrix,
        trust_code=args.trust_code,
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(summary(report))
        for bad in report.bad_samples:
            print(f"unreadable: {bad['path']}: {bad['reason']}")
    return EXIT_INPUT_FAILED if report.bad_samples else 0
