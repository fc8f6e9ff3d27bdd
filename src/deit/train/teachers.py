"""Teachers for distillation.

A teacher is any classifier: a timm or torchvision model by name, a ``torch.export`` or
TorchScript file (TorchScript only with ``trust_code``: it is a program, see
:mod:`deit.safety`), or a directory written by ``deit train`` (a DeiT in the ``deit`` format, or
a CNN in the ``deit-classifier`` format of :mod:`deit.train.classifiers`). :class:`Teacher`
freezes it and maps the student's batch into the teacher's input space: undo the student's
normalisation, adapt grayscale↔RGB, resize to the teacher's resolution, apply the teacher's
normalisation.

References:
    facebookresearch/deit ``main.py`` (teacher in eval mode, no gradient);
    timm ``task/token_distillation.py`` (re-normalising for the teacher).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deit.checkpoints import load_model
from deit.errors import CheckpointError
from deit.safety import is_torchscript, load_exported_module, load_torchscript
from deit.train.classifiers import build_classifier, is_classifier_dir, load_classifier, logits_of
from deit.train.data import InputSpec
from deit.transforms import IMAGENET_MEAN, IMAGENET_STD


class Teacher(nn.Module):
    """A frozen classifier fed with the student's batches.

    Args:
        model: the teacher network (returns logits, DeiTOutput, or a tuple).
        student: the student's input spec (how its batches are normalised).
        teacher: the teacher's input spec.
    """

    def __init__(self, model: nn.Module, student: InputSpec, teacher: InputSpec) -> None:
        super().__init__()
        with contextlib.suppress(NotImplementedError):  # torch.export modules keep their mode
            model.eval()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.student, self.spec = student, teacher
        self.register_buffer(
            "s_mean", torch.tensor(student.mean).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("s_std", torch.tensor(student.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer(
            "t_mean", torch.tensor(teacher.mean).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("t_std", torch.tensor(teacher.std).view(1, -1, 1, 1), persistent=False)
        self.identity = student == teacher

    s_mean: Tensor
    s_std: Tensor
    t_mean: Tensor
    t_std: Tensor

    def train(self, mode: bool = True) -> Teacher:
        """The teacher always stays in eval mode (set once, at construction)."""
        self.training = False
        return self

    def adapt(self, x: Tensor) -> Tensor:
        """Student-normalised batch → teacher-normalised batch at the teacher's size."""
        if self.identity:
            return x
        x = x.float() * self.s_std + self.s_mean  # pixel values in [0, 1]
        sc, tc = self.student.in_chans, self.spec.in_chans
        if sc == 1 and tc == 3:
            x = x.expand(-1, 3, -1, -1)
        elif sc == 3 and tc == 1:
            w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
        elif sc != tc:
            raise ValueError(f"cannot adapt {sc}-channel batches to a {tc}-channel teacher")
        if x.shape[-1] != self.spec.img_size or x.shape[-2] != self.spec.img_size:
            x = F.interpolate(x, size=(self.spec.img_size,) * 2, mode="bilinear", antialias=True)
        return (x - self.t_mean) / self.t_std

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model(self.adapt(x))).float()


def _spec_with(base: InputSpec, mean: Any, std: Any, img_size: Any, in_chans: Any) -> InputSpec:
    return InputSpec(
        tuple(mean) if mean is not None else base.mean,
        tuple(std) if std is not None else base.std,
        img_size if img_size is not None else base.img_size,
        in_chans if in_chans is not None else base.in_chans,
    )


def _load_network(
    source: str, student: InputSpec, num_classes: int, trust_code: bool = False
) -> tuple[nn.Module, InputSpec]:
    """The raw teacher network and the input spec it declares (student's when unknown)."""
    path = Path(source)
    if source.startswith(("timm:", "torchvision:")):
        in_chans = 3
        model = build_classifier(source, num_classes, in_chans, pretrained=True, keep_head=True)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = cfg.get("input_size", (3, 224, 224))[-1]
        spec = InputSpec(
            tuple(cfg.get("mean", IMAGENET_MEAN)),
            tuple(cfg.get("std", IMAGENET_STD)),
            size,
            in_chans,
        )
        return model, spec
    if path.is_dir():
        if is_classifier_dir(path):
            model, config = load_classifier(path)
            return model, InputSpec.from_dict(config["input"])
        loaded = load_model(path)
        return loaded.model, InputSpec.of(loaded)
    if path.suffix == ".pt2":  # checked first: nothing in it may run code
        return load_exported_module(path, trust_code=trust_code), student
    if path.is_file():
        if not is_torchscript(path):
            raise CheckpointError(
                f"teacher {path} is not a TorchScript file (torch.jit.save); a teacher is a "
                "timm:/torchvision: name, a TorchScript or .pt2 file, or a deit train model "
                "directory"
            )
        return load_torchscript(path, trust_code=trust_code), student  # refused unless trusted
    raise FileNotFoundError(
        f"teacher {source!r} is not a timm:/torchvision: name, file or directory"
    )


def load_teacher(
    source: str,
    *,
    student: InputSpec,
    num_classes: int,
    device: str | torch.device = "cpu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    trust_code: bool = False,
) -> Teacher:
    """Load, freeze and wrap a teacher; check its class count against the student's.

    Args:
        source: ``timm:NAME``, ``torchvision:NAME``, a TorchScript file, a ``.pt2``
            ``torch.export`` file, or a directory written by ``deit train``.
        student: how the student's batches are normalised and shaped.
        num_classes: the student's class count.
        device: where the teacher runs.
        mean, std, img_size, in_chans: override what the teacher declares (needed for
            TorchScript / export files, which declare nothing and default to the student's).
        trust_code: allow a file that runs code when loaded: a TorchScript program, or a
            ``.pt2`` holding pickles (see :mod:`deit.safety`); logged as a warning.

    Raises:
        ValueError: the teacher predicts a different number of classes.
        UnsafeFileError: a TorchScript or unsafe ``.pt2`` file without ``trust_code``.
    """
    network, declared = _load_network(source, student, num_classes, trust_code)
    spec = _spec_with(declared, mean, std, img_size, in_chans)
    teacher = Teacher(network, student, spec).to(device)
    probe = torch.zeros(2, student.in_chans, student.img_size, student.img_size, device=device)
    classes = teacher(probe).shape[-1]
    if classes != num_classes:
        raise ValueError(
            f"teacher {source!r} predicts {classes} classes but the student has {num_classes}"
        )
    return teacher
