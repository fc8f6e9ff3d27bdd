"""Classifiers other than DeiT that the training loop can train and distill from.

``fmnist_cnn`` (:class:`FashionCNN`, the project's Fashion-MNIST teacher), any timm model
(``timm:NAME``) or torchvision model (``torchvision:NAME``). Trained ones are saved in the
``deit-classifier`` format: ``model.safetensors`` plus a ``config.json`` naming the
architecture, the input it expects and the labels (:func:`save_classifier`,
:func:`load_classifier`); the format's name lives in :mod:`deit.checkpoints`, which
recognises such folders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deit.checkpoints import CLASSIFIER_FORMAT, read_json
from deit.errors import CheckpointError
from deit.train.data import InputSpec


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class FashionCNN(nn.Sequential):
    """Six 3x3 conv + BatchNorm + ReLU layers in three stages (64, 128, 256), global pooling.

    About 1.2M parameters; a strong, fast teacher for 28 px grayscale data (≥ 93% on
    Fashion-MNIST in a few GPU-seconds).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 64) -> None:
        w = width
        super().__init__(
            *_conv_bn(in_chans, w),
            *_conv_bn(w, w),
            nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w),
            *_conv_bn(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w),
            *_conv_bn(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(4 * w, num_classes),
        )


def build_classifier(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    keep_head: bool = False,
) -> nn.Module:
    """A non-DeiT classifier: ``fmnist_cnn[_small]``, ``timm:NAME`` or ``torchvision:NAME``.

    ``keep_head`` (teachers) keeps a pretrained timm model's own classifier instead of a new,
    random one for ``num_classes``: the caller then checks that the class counts agree.
    """
    if name in ("fmnist_cnn", "fmnist_cnn_small"):
        return FashionCNN(num_classes, in_chans, width=64 if name == "fmnist_cnn" else 32)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"{name} needs timm: pip install timm") from e
        try:
            head: dict[str, Any] = {} if keep_head and pretrained else {"num_classes": num_classes}
            return timm.create_model(name[5:], pretrained=pretrained, in_chans=in_chans, **head)
        except Exception as e:
            raise RuntimeError(f"could not create {name} (pretrained={pretrained}): {e}") from e
    if name.startswith("torchvision:"):
        try:
            from torchvision import models
        except ImportError as e:
            raise ImportError(f"{name} needs torchvision: pip install torchvision") from e
        weights = "DEFAULT" if pretrained else None
        kwargs = {} if pretrained else {"num_classes": num_classes}
        model = models.get_model(name[12:], weights=weights, **kwargs)
        if in_chans != 3:
            raise ValueError(f"{name}: torchvision models take 3 channels, not {in_chans}")
        return model
    raise ValueError(
        f"unknown classifier {name!r}: use fmnist_cnn, fmnist_cnn_small, timm:NAME "
        "or torchvision:NAME"
    )


def save_classifier(
    model: nn.Module,
    out_dir: str | Path,
    *,
    arch: str,
    num_classes: int,
    spec: InputSpec,
    labels: Sequence[str],
    preprocess: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a non-DeiT classifier as ``model.safetensors`` + ``config.json``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    config = {
        "format": CLASSIFIER_FORMAT,
        "arch": arch,
        "num_classes": num_classes,
        "input": asdict(spec),
        "labels": list(labels),
        "preprocess": preprocess or {},
        "metadata": metadata or {},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def is_classifier_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_classifier`."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and read_json(cfg).get("format") == CLASSIFIER_FORMAT


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a :func:`save_classifier` directory; returns the eval-mode model and its config."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_json(path / "config.json")
    try:
        spec = config["input"]
        model = build_classifier(config["arch"], config["num_classes"], spec["in_chans"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not a classifier config: {e!r}") from e
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.to(device).eval(), config


def logits_of(out: Any) -> Tensor:
    """Inference logits from a tensor, a DeiTOutput / HF output (``.logits``) or a tuple."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, tuple | list):
        return out[0]
    raise TypeError(f"cannot read logits from {type(out).__name__}")
