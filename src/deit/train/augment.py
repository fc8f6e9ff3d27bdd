"""Train-time augmentation: batch ops on device tensors, and per-image transforms.

Tensor data (Fashion-MNIST) is augmented a whole batch at a time on the training device
(:func:`random_crop_flip`, :func:`random_erasing`); image folders go through timm's
``create_transform`` (the DeiT recipe: RandomResizedCrop, flip, RandAugment, random erasing).
Mixup/CutMix (timm) is applied by the training loop on top of either. Why timm, with measured
throughput: ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from deit.transforms import PreprocessConfig, preprocess_image


def random_crop_flip(x: Tensor, padding: int, hflip: float) -> Tensor:
    """Per-sample random crop after zero padding, and horizontal flip, on a batch (B,C,H,W)."""
    b, _, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
        rows = (dy + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (dx + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        ci = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = xp[bi, ci, rows, cols]  # (B, C, H, W)
    if hflip > 0:
        flip = torch.rand(b, 1, 1, 1, device=x.device) < hflip
        x = torch.where(flip, x.flip(-1), x)
    return x


def random_erasing(x: Tensor, prob: float, area: tuple[float, float] = (0.02, 1 / 3)) -> Tensor:
    """Batched random erasing (timm ``mode='pixel'``): one box per chosen sample, N(0,1) fill.

    Same distributions as timm (area fraction U(0.02, 1/3), log-aspect U(log 0.3, log 1/0.3))
    but a single attempt per sample instead of up to ten: boxes that don't fit are skipped.
    """
    if prob <= 0:
        return x
    b, _, h, w = x.shape
    dev = x.device
    target = torch.empty(b, device=dev).uniform_(*area) * h * w
    aspect = torch.exp(torch.empty(b, device=dev).uniform_(math.log(0.3), math.log(1 / 0.3)))
    eh = torch.sqrt(target * aspect).round().long()
    ew = torch.sqrt(target / aspect).round().long()
    ok = (torch.rand(b, device=dev) < prob) & (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    top = (torch.rand(b, device=dev) * (h - eh + 1).clamp(min=1)).long()
    left = (torch.rand(b, device=dev) * (w - ew + 1).clamp(min=1)).long()
    r = torch.arange(h, device=dev).view(1, h, 1)
    c = torch.arange(w, device=dev).view(1, 1, w)
    box = (r >= top.view(b, 1, 1)) & (r < (top + eh).view(b, 1, 1))
    box = box & (c >= left.view(b, 1, 1)) & (c < (left + ew).view(b, 1, 1)) & ok.view(b, 1, 1)
    return torch.where(box.unsqueeze(1), torch.randn_like(x), x)


def image_train_transform(
    img_size: int, aug: Any, mean: Sequence[float], std: Sequence[float]
) -> Any:
    """timm's training transform (random-resized crop, flip, RandAugment, erasing) for PIL input.

    ``aug`` is the run config's ``AugmentSection``.
    """
    try:
        from timm.data import create_transform
    except ImportError as e:
        raise ImportError("training on image folders needs timm: pip install 'deit[train]'") from e
    transform = create_transform(
        img_size,
        is_training=True,
        scale=tuple(aug.scale),
        hflip=aug.hflip,
        auto_augment=aug.randaugment or None,
        interpolation=aug.interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=aug.random_erasing,
        re_mode="pixel",
        color_jitter=0.0,
    )
    _allow_zero_bit_posterize(transform)
    return transform


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, with 0 bits giving a black image as Pillow < 12 did (it now raises)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform: Any) -> None:
    """Patch this transform's RandAugment posterize ops (magnitude 10 keeps 0 bits).

    timm's ``PosterizeIncreasing`` at the top magnitude asks Pillow for 0 bits, which Pillow 12+
    rejects with ``ValueError``; ``rand-m9-mstd0.5`` reaches magnitude 10 about once in 40
    draws, so training would crash. Only this transform's op objects are changed.
    """
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize


def image_eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875
) -> Callable[[Image.Image], Tensor]:
    """Official DeiT eval transform (shorter side to ``img_size / crop_pct``, center crop,
    bicubic), computed by :mod:`deit.transforms` exactly as a saved model's preprocessing."""
    cfg = dataclasses.replace(
        PreprocessConfig.official(img_size, crop_pct),
        mean=tuple(mean),
        std=tuple(std),
        channels=len(mean),
    )
    return functools.partial(preprocess_image, cfg=cfg)
