"""``deit eval``: top-1/top-5 of each head on a dataset."""

from __future__ import annotations

import argparse
import json

from deit.errors import EXIT_INPUT_FAILED, UsageError
from deit.train.evaluate import EvalReport, OODReport, evaluate, evaluate_ood

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
    p.add_argument(
        "--ood",
        metavar="DIR",
        help="out-of-distribution images (a folder or glob): report how well the model's "
        "unusual-image score separates them from --data (AUROC, FPR at 95%% TPR) instead of "
        "the per-head accuracy",
    )


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


def ood_summary(r: OODReport) -> str:
    """The out-of-distribution result in two lines (OOD = positive class)."""
    return (
        f"{r.source} on {r.data} ({r.num_in} images, top-1 {100 * r.top1:.2f}%) vs {r.ood} "
        f"({r.num_out} images): {r.method} AUROC {100 * r.auroc:.2f}%, FPR at 95% TPR "
        f"{100 * r.fpr95:.2f}% (max softmax: {100 * r.msp_auroc:.2f}%, {100 * r.msp_fpr95:.2f}%)"
        f"\nat the model's threshold {r.threshold:.4g}: {100 * r.in_flagged:.2f}% of --data "
        f"and {100 * r.out_flagged:.2f}% of the OOD images called unusual"
    )


def run(args: argparse.Namespace) -> int:
    """Exit 0 on success, 1 when some images could not be read."""
    if args.ood:
        if args.teacher or args.confusion_matrix or args.precision != "fp32":
            raise UsageError(
                "--ood measures the model in fp32: drop --teacher, "
                "--confusion-matrix and --precision"
            )
        ood = evaluate_ood(
            args.model,
            args.data,
            args.ood,
            batch_size=args.batch_size,
            device=args.device,
            num_workers=args.num_workers,
            data_root=args.data_root,
        )
        print(json.dumps(ood.to_dict()) if args.json else ood_summary(ood))
        return EXIT_INPUT_FAILED if ood.unreadable else 0
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
