"""``deit calibrate``: fit a model's out-of-distribution statistics on labelled data."""

from __future__ import annotations

import argparse
import json

from deit.train.evaluate import calibrate

NAME = "calibrate"
HELP = "fit the out-of-distribution score (unusual images) of a model on labelled data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint, model directory or Hub id")
    p.add_argument(
        "--data",
        required=True,
        help="labelled training data, as deit eval reads it: fashion-mnist[:train|test]"
        "[[start:stop]], an image-folder directory, hf:... or webdataset:...",
    )
    p.add_argument(
        "--val-data",
        help="held-out labelled data for the threshold (default: 10%% of --data, held out)",
    )
    p.add_argument(
        "--out",
        help="model folder to write ood.safetensors into (default: the model's folder; "
        "a model file or Hub id is saved there whole)",
    )
    p.add_argument("--limit", type=int, help="fit on at most this many images of --data")
    p.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the statistics' description")


def run(args: argparse.Namespace) -> int:
    stats, folder = calibrate(
        args.model,
        args.data,
        val_data=args.val_data,
        out=args.out,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        data_root=args.data_root,
    )
    if args.json:
        print(json.dumps(stats.describe()))
        return 0
    info = stats.info
    print(
        f"wrote {folder}/ood.safetensors: {stats.method} on {stats.dim} features, "
        f"{info['classes_fitted']} classes, {info['train_samples']} images ({info['data']}); "
        f"threshold {stats.threshold:.4g} accepts 95% of {info['val_samples']} held-out images"
    )
    return 0
