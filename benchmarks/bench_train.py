"""Training-side benchmarks on this machine's CPU.

``augment``: images/s of the candidate train-augmentation pipelines (DeiT recipe: random
resized crop, flip, RandAugment m9, random erasing 0.25, normalise) on one real photo at
224 px and on Fashion-MNIST images at 28 px, single process.

``steps``: training steps/s of ``deit.train``'s step (our DeiT, our loss, AdamW) against the
same-shaped timm model with timm's loss in the same process, on the same batches.

Usage:
    python benchmarks/bench_train.py augment [--seconds 3]
    python benchmarks/bench_train.py steps [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "chelsea.png"


def _rate(fn: Callable[[], Any], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after two warm-up calls)."""
    fn(), fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def _pipelines(size: int) -> dict[str, Any]:
    from torchvision.transforms import v2

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    from deit.augment import image_train_transform
    from deit.runconfig import AugmentSection

    timm_tf = image_train_transform(size, AugmentSection(), mean, std)
    tv = v2.Compose(
        [
            v2.RandomResizedCrop(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(num_ops=2, magnitude=9),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            v2.RandomErasing(0.25, value="random"),
        ]
    )
    return {
        "timm create_transform (PIL)": timm_tf,
        "torchvision v2 (PIL)": tv,
        "torchvision v2 (uint8 tensor)": tv,
    }


def bench_augment(seconds: float) -> None:
    from PIL import Image

    from deit.augment import random_crop_flip, random_erasing
    from deit.data import load_fashion_mnist

    torch.set_num_threads(1)
    photo = Image.open(PHOTO).convert("RGB")
    x, _ = load_fashion_mnist("test")
    small = Image.fromarray(x[0, 0].numpy()).convert("RGB")
    print(f"torch threads 1; photo {PHOTO.name} {photo.size}; Fashion-MNIST 28x28 as RGB")
    for size, image in ((224, photo), (28, small)):
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        for name, tf in _pipelines(size).items():
            src = tensor if "tensor" in name else image
            rate = _rate(lambda tf=tf, src=src: tf(src), seconds)
            print(f"{size:>4} px  {name:<32} {rate:>9.0f} img/s")
    batch = x[:1024].float().div(255)

    def device_batch() -> None:
        random_erasing((random_crop_flip(batch, 2, 0.5) - 0.29) / 0.35, 0.25)

    torch.set_num_threads(2)
    rate = _rate(device_batch, seconds) * len(batch)
    print(f"  28 px  {'deit.data batch (crop+flip+erase)':<32} {rate:>9.0f} img/s (2 threads)")


def bench_steps(steps: int) -> None:
    import timm
    from timm.loss import SoftTargetCrossEntropy

    from deit.config import DeiTConfig
    from deit.losses import DistillationLoss
    from deit.model import DeiT

    torch.manual_seed(0)
    cfg = DeiTConfig(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3
    )
    ours = DeiT(cfg)
    theirs = timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10
    )
    theirs.set_distilled_training(True)
    x, y = torch.randn(64, 1, 28, 28), torch.softmax(torch.randn(64, 10), -1)
    our_loss, timm_loss = DistillationLoss(kind="none"), SoftTargetCrossEntropy()

    def step(model: torch.nn.Module, loss_fn: Callable[[Any], torch.Tensor], opt: Any) -> None:
        loss = loss_fn(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    opt_a = torch.optim.AdamW(ours.parameters())
    opt_b = torch.optim.AdamW(theirs.parameters())
    fns = {
        "deit (ours)": lambda: step(ours, lambda o: our_loss(x, o, y), opt_a),
        "timm": lambda: step(
            theirs, lambda o: (timm_loss(o[0], y) + timm_loss(o[1], y)) / 2, opt_b
        ),
    }
    spent = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        fn(), fn()
    for _ in range(steps):  # interleaved, so load changes hit both alike
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            spent[name] += time.perf_counter() - start
    rates = {name: steps / t for name, t in spent.items()}
    threads = torch.get_num_threads()
    print(f"DeiT-tiny-distilled shape, 28 px / patch 4, batch 64, fp32, {threads} threads")
    for name, rate in rates.items():
        print(f"  {name:<12} {rate:6.2f} steps/s  {64 * rate:7.0f} img/s")
    print(f"  ratio ours/timm: {rates['deit (ours)'] / rates['timm']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("augment").add_argument("--seconds", type=float, default=3.0)
    sub.add_parser("steps").add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.what == "augment":
        bench_augment(args.seconds)
    else:
        bench_steps(args.steps)


if __name__ == "__main__":
    main()
