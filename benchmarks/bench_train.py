"""Training-side benchmarks: augmentation pipelines (CPU) and training steps (CPU or GPU).

``augment``: images/s of the candidate train-augmentation pipelines (DeiT recipe: random
resized crop, flip, RandAugment m9, random erasing 0.25, normalise) on one real photo at
224 px and on Fashion-MNIST images at 28 px, single process.

``steps``: training images/s of ``deit.train.loop``'s step (our DeiT, our loss on both heads,
AdamW) against the same-shaped timm model with timm's loss, interleaved in one process on the
same batch; optionally both compiled, in bf16/fp16, on a GPU.

Usage:
    python benchmarks/bench_train.py augment [--seconds 3]
    python benchmarks/bench_train.py steps --img-size 28 --patch-size 4 --in-chans 1 \
        --num-classes 10   # the Fashion-MNIST student's shape, CPU
    python benchmarks/bench_train.py steps --device cuda --dtype bf16 --batch 256 --compile
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
    from deit.train.augment import image_train_transform
    from deit.train.runconfig import AugmentSection

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

    from deit.train.augment import random_crop_flip, random_erasing
    from deit.train.fashion_mnist import load_fashion_mnist

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
    print(
        f"  28 px  {'deit.train.data batch (crop+flip+erase)':<32} {rate:>9.0f} img/s (2 threads)"
    )


def bench_steps(args: argparse.Namespace) -> None:
    import json

    import timm
    from timm.loss import SoftTargetCrossEntropy

    from deit.config import VARIANTS
    from deit.model import DeiT
    from deit.runtime import autocast
    from deit.train.losses import DistillationLoss

    torch.manual_seed(0)
    dev = torch.device(args.device)
    shape = {"img_size": args.img_size, "patch_size": args.patch_size, "in_chans": args.in_chans}
    shape = {k: v for k, v in shape.items() if v is not None}
    cfg = VARIANTS[args.variant].replace(num_classes=args.num_classes, **shape)
    ours = DeiT(cfg).to(dev)
    theirs = timm.create_model(args.variant, num_classes=args.num_classes, **shape).to(dev)
    theirs.set_distilled_training(True)
    b, c, (h, w) = args.batch, cfg.in_chans, cfg.image_hw
    x = torch.randn(b, c, h, w, device=dev)
    y = torch.softmax(torch.randn(b, args.num_classes, device=dev), -1)
    our_loss, timm_loss = DistillationLoss(kind="none"), SoftTargetCrossEntropy()
    fused = {"fused": True} if dev.type == "cuda" else {}
    opt_a = torch.optim.AdamW(ours.parameters(), **fused)
    opt_b = torch.optim.AdamW(theirs.parameters(), **fused)
    fwd_a = torch.compile(ours) if args.compile else ours
    fwd_b = torch.compile(theirs) if args.compile else theirs

    def step(model: Any, loss_fn: Callable[[Any], torch.Tensor], opt: Any) -> None:
        with autocast(dev, args.dtype):
            loss = loss_fn(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timm_step() -> None:
        step(fwd_b, lambda o: (timm_loss(o[0].float(), y) + timm_loss(o[1].float(), y)) / 2, opt_b)

    fns = {"deit": lambda: step(fwd_a, lambda o: our_loss(x, o, y), opt_a), "timm": timm_step}
    spent = dict.fromkeys(fns, 0.0)
    for fn in fns.values():  # warm-up (and compilation)
        for _ in range(3):
            fn()
    for _ in range(args.steps):  # interleaved, so load changes hit both alike
        for name, fn in fns.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            spent[name] += time.perf_counter() - start
    rates = {name: args.steps * b / t for name, t in spent.items()}
    setting = (
        f"{args.variant} at {h}x{w} px / patch {cfg.patch_size}, batch {b}, {args.dtype}, "
        f"{'compiled' if args.compile else 'eager'}, {dev}"
        + (f", {torch.get_num_threads()} threads" if dev.type == "cpu" else "")
    )
    if args.json:
        for name, rate in rates.items():
            print(json.dumps({"impl": name, "setting": setting, "img_per_s": round(rate, 1)}))
        return
    print(setting)
    for name, rate in rates.items():
        print(f"  {name:<6} {rate / b:7.2f} steps/s  {rate:9.0f} img/s")
    print(f"  ratio deit/timm: {rates['deit'] / rates['timm']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("augment").add_argument("--seconds", type=float, default=3.0)
    p = sub.add_parser("steps")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variant", default="deit_tiny_distilled_patch16_224")
    p.add_argument("--img-size", type=int, help="default: the variant's")
    p.add_argument("--patch-size", type=int, help="default: the variant's")
    p.add_argument("--in-chans", type=int, help="default: the variant's")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.what == "augment":
        bench_augment(args.seconds)
    else:
        bench_steps(args)


if __name__ == "__main__":
    main()
