"""Input throughput per data source: image folder vs Hugging Face datasets vs WebDataset.

Every source holds the same Fashion-MNIST training images (PNG, written once to a temporary
folder), and every source is read through ``deit.train.data.build_data`` with the same run
config, so the same timm training transform runs on each (random-resized crop, flip,
RandAugment, erasing, at ``--img-size``). Reported: training images per second through the
DataLoader (decode + augment + collate, no model), the median of ``--repeats`` epochs.

    python benchmarks/bench_sources.py --images 2000 --workers 0 2

Sources: ``imagefolder`` (PNG files in class folders), ``hf-disk`` (``save_to_disk``),
``hf-parquet``, ``hf-stream`` (Parquet, ``streaming=True``) and ``webdataset`` (tar shards).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import datasets

    from deit.train import sources
    from deit.train.data import build_data
    from deit.train.fashion_mnist import FASHION_MNIST_CLASSES, write_fashion_mnist_folder
    from deit.train.runconfig import load_config

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_sources_"))
    per_class = args.images // 10
    folder = write_fashion_mnist_folder(tmp / "folder", FASHION_MNIST_CLASSES, per_class)
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    ds.save_to_disk(str(tmp / "disk"))
    ds.to_parquet(str(tmp / "train.parquet"))
    n_shards = max(4, args.images // 250)
    meta = sources.pack(
        str(folder), tmp / "wds" / "train-%06d.tar", shard_size=-(-len(ds) // n_shards)
    )
    pattern = str(tmp / "wds" / f"train-{{000000..{len(meta['shards']) - 1:06d}}}.tar")
    n = len(ds)
    srcs = {
        "imagefolder": ["data.dataset=imagefolder", f"data.path={folder}"],
        "hf-disk": ["data.dataset=hf", f"data.path={tmp / 'disk'}"],
        "hf-parquet": ["data.dataset=hf", f"data.path={tmp / 'train.parquet'}"],
        "hf-stream": [
            "data.dataset=hf",
            f"data.path={tmp / 'train.parquet'}",
            "data.streaming=true",
            f"data.epoch_samples={n}",
        ],
        "webdataset": ["data.dataset=webdataset", f"data.path={pattern}"],
    }
    common = [
        f"model.img_size={args.img_size}",
        f"data.batch_size={args.batch_size}",
        "data.in_chans=3",
        "augment.repeated_aug=1",
        "run.device=cpu",
    ]
    print(f"{n} images, {args.img_size} px, batch {args.batch_size}, timm train transform")
    print(f"{'source':<12} {'workers':>7} {'images/s':>9}")
    for workers in args.workers:
        for name, extra in srcs.items():
            cfg = load_config(None, [*common, *extra, f"data.num_workers={workers}"])
            try:
                data = build_data(cfg, torch.device("cpu"))
            except ValueError as e:
                print(f"{name:<12} {workers:>7} {'-':>9}  ({e})")
                continue
            rates = []
            for epoch in range(args.repeats):
                for src in (data.train, getattr(data.train, "sampler", None)):
                    if hasattr(src, "set_epoch"):
                        src.set_epoch(epoch)
                t, seen = time.perf_counter(), 0
                for x, _, _ in data.train:
                    seen += len(x)
                rates.append(seen / (time.perf_counter() - t))
            print(f"{name:<12} {workers:>7} {statistics.median(rates):>9.0f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
