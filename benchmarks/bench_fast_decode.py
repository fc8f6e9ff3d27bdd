"""What `--fast-decode` (JPEG decoded at reduced size) changes in predictions, and what it saves.

Two measurements, both exact decoding vs ``fast_decode=True`` through ``Classifier``:

* the embedded Fashion-MNIST model (trained) on a seeded sample of the test split, each
  image upscaled to ``--size`` pixels and saved as JPEG: top-1 agreement, both accuracies;
* DeiT-tiny-distilled with random weights (no trained ImageNet model is available offline)
  on the sample photos of ``--images`` at 1920x1280: top-1 agreement and the largest logit
  difference. Random models have small margins between classes, so this agreement is a
  pessimistic bound.

    python benchmarks/bench_fast_decode.py --limit 2000 --size 1024

Prints one JSON object per measurement with ``--json``. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from deit.checkpoints import load_model
from deit.config import VARIANTS
from deit.inference import Classifier
from deit.labels import imagenet_labels
from deit.model import DeiT
from deit.saving import save_model
from deit.train.fashion_mnist import load_fashion_mnist
from deit.transforms import PreprocessConfig, preprocess


def _compare(clf: Classifier, paths: list[str], labels: list[int] | None) -> dict[str, float]:
    out: dict[str, float] = {"images": len(paths)}
    top1: dict[bool, list[int]] = {}
    logits: dict[bool, torch.Tensor] = {}
    for fast in (False, True):
        start = time.perf_counter()
        pixels = preprocess(paths, clf.loaded.preprocess, fast_decode=fast)
        out[f"decode_ms_{'fast' if fast else 'exact'}"] = (
            1e3 * (time.perf_counter() - start) / len(paths)
        )
        logits[fast] = torch.cat([clf.logits(batch) for batch in pixels.split(64)])
        top1[fast] = logits[fast].argmax(-1).tolist()
    out["top1_agreement"] = sum(a == b for a, b in zip(top1[False], top1[True])) / len(paths)
    out["max_abs_logit_diff"] = float((logits[False] - logits[True]).abs().max())
    if labels is not None:
        for fast in (False, True):
            hits = sum(a == b for a, b in zip(top1[fast], labels))
            out[f"top1_{'fast' if fast else 'exact'}"] = hits / len(paths)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2000, help="Fashion-MNIST test images")
    parser.add_argument("--size", type=int, default=1024, help="side of the upscaled JPEGs")
    parser.add_argument("--images", type=Path, default=Path("tests/fixtures/images"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="deit-fast-decode-"))

    images, labels = load_fashion_mnist("test")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: args.limit]
    paths = []
    for i in pick.tolist():
        paths.append(str(tmp / f"fm{i:05d}.jpg"))
        img = Image.fromarray(images[i, 0].numpy(), "L").convert("RGB")
        img.resize((args.size, args.size), Image.Resampling.BICUBIC).save(paths[-1], quality=90)
    fm = _compare(
        Classifier.from_pretrained("fashion-mnist", device="cpu"), paths, labels[pick].tolist()
    )
    results = [{"model": "fashion-mnist (trained)", "size": args.size, **fm}]

    torch.manual_seed(0)
    save_model(
        DeiT(VARIANTS["deit_tiny_distilled_patch16_224"]),
        tmp / "tiny",
        labels=imagenet_labels(),
        preprocess=PreprocessConfig.model_card(),
    )
    photos = []
    for src in sorted(args.images.glob("*")):
        if src.suffix.lower() in (".png", ".jpg", ".jpeg"):
            photos.append(str(tmp / f"{src.stem}.jpg"))
            img = Image.open(src).convert("RGB").resize((1920, 1280), Image.Resampling.BICUBIC)
            img.save(photos[-1], quality=90)
    tiny = Classifier(load_model(tmp / "tiny"), device="cpu")
    results.append(
        {
            "model": "deit-tiny-distilled (random weights)",
            "size": "1920x1280",
            **_compare(tiny, photos, None),
        }
    )

    for r in results:
        print(json.dumps(r) if args.json else r)


if __name__ == "__main__":
    main()
