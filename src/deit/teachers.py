"""Teachers for distillation, and the non-DeiT classifiers the training loop can train.

A teacher is any classifier: a timm or torchvision model by name, a TorchScript or
``torch.export`` file, or a directory written by ``deit train`` (a DeiT in the ``deit`` format,
or a CNN in the ``deit-classifier`` format defined here). :class:`Teacher` freezes it and maps
the student's batch into the teacher's input space: undo the student's normalisation, adapt
grayscale↔RGB, resize to the teacher's resolution, apply the teacher's normalisation.

References:
    facebookresearch/deit ``main.py`` (teacher in eval mode, no gradient);
    timm ``task/token_distillation.py`` (re-normalising for the teacher).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deit.checkpoints import CLASSIFIER_FORMAT, CheckpointError, read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input: normalisation, square side and channel count."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int
    in_chans: int


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
            head = {} if keep_head and pretrained else {"num_classes": num_classes}
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


def _load_network(source: str, student: InputSpec, num_classes: int) -> tuple[nn.Module, InputSpec]:
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
            return model, InputSpec(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in config["input"].items()}
            )
        from deit.checkpoints import load_model

        loaded = load_model(path)
        p = loaded.preprocess
        img = loaded.config.image_hw[0]
        return loaded.model, InputSpec(tuple(p.mean), tuple(p.std), img, loaded.config.in_chans)
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module(), student
    if path.is_file():
        try:
            return torch.jit.load(str(path), map_location="cpu"), student
        except RuntimeError as e:
            raise CheckpointError(
                f"teacher {path} is not a TorchScript file (torch.jit.save); a teacher is a "
                "timm:/torchvision: name, a TorchScript or .pt2 file, or a deit train model "
                "directory"
            ) from e
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

    Raises:
        ValueError: the teacher predicts a different number of classes.
    """
    network, declared = _load_network(source, student, num_classes)
    spec = _spec_with(declared, mean, std, img_size, in_chans)
    teacher = Teacher(network, student, spec).to(device)
    probe = torch.zeros(2, student.in_chans, student.img_size, student.img_size, device=device)
    classes = teacher(probe).shape[-1]
    if classes != num_classes:
        raise ValueError(
            f"teacher {source!r} predicts {classes} classes but the student has {num_classes}"
        )
    return teacher


# --------------------------------------------------------------------------- students


def build_student(cfg: Any, num_classes: int, spec: InputSpec, log: Any) -> tuple[nn.Module, str]:
    """The model a run trains, and its architecture name (``"deit"`` or a classifier name).

    With ``cfg.model.init`` the architecture comes from that checkpoint and is adapted to the
    data (see :func:`finetune_state`); otherwise ``cfg.model.name`` plus its shape fields.
    """
    from deit.config import VARIANTS, DeiTConfig
    from deit.model import DeiT

    m = cfg.model
    if m.init:
        return _from_checkpoint(cfg, num_classes, spec, log)
    if m.name not in VARIANTS and m.name != "deit":
        return build_classifier(m.name, num_classes, spec.in_chans, m.pretrained), m.name
    fields = {
        k: getattr(m, k)
        for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "distilled")
    }
    config = VARIANTS.get(m.name, DeiTConfig()).replace(
        img_size=spec.img_size,
        in_chans=spec.in_chans,
        num_classes=num_classes,
        drop_path_rate=m.drop_path_rate,
        **{k: v for k, v in fields.items() if v is not None},
    )
    return DeiT(config), "deit"


def _from_checkpoint(
    cfg: Any, num_classes: int, spec: InputSpec, log: Any
) -> tuple[nn.Module, str]:
    from deit.model import DeiT

    init = cfg.model.init
    if Path(init).is_dir() and is_classifier_dir(init):
        old, config = load_classifier(init)
        model = build_classifier(config["arch"], num_classes, spec.in_chans)
        state = {
            k: v for k, v in old.state_dict().items() if v.shape == model.state_dict()[k].shape
        }
        skipped = sorted(set(model.state_dict()) - set(state))
        model.load_state_dict(state, strict=False)
        log.info(
            "fine-tuning %s from %s; re-initialised: %s",
            config["arch"],
            init,
            ", ".join(skipped) or "nothing",
        )
        return model, config["arch"]
    from deit.checkpoints import load_model

    loaded = load_model(init)
    new = loaded.config.replace(
        img_size=spec.img_size,
        in_chans=spec.in_chans,
        num_classes=num_classes,
        drop_path_rate=cfg.model.drop_path_rate,
        distilled=loaded.config.distilled if cfg.model.distilled is None else cfg.model.distilled,
    )
    state, notes = finetune_state(loaded.model.state_dict(), loaded.config, new)
    model = DeiT(new)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(notes["reinit"]):
        raise ValueError(f"fine-tuning {init}: missing {missing}, unexpected {unexpected}")
    log.info("fine-tuning DeiT from %s: %s", init, "; ".join(notes["log"]) or "same shape")
    return model, "deit"


def finetune_state(
    state: dict[str, Tensor], old: Any, new: Any
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Adapt a DeiT state dict from config ``old`` to config ``new``.

    Heads are dropped (so re-initialised) when the class count changes; the position
    embedding is resized bicubically to the new patch grid; the patch projection is summed
    (RGB → gray) or spread (gray → RGB) over input channels; a distillation token is added
    (copied from the class token) or removed.

    Returns:
        The new state dict and ``{"reinit": [keys left to the new init], "log": [notes]}``.
    """
    from deit.model import resize_pos_embed

    state, reinit, notes = dict(state), [], []
    pos = state["pos_embed"]
    if old.distilled and not new.distilled:
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        for k in ("dist_token", "head_dist.weight", "head_dist.bias"):
            state.pop(k, None)
        notes.append("removed the distillation token")
    elif new.distilled and not old.distilled:
        pos = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        state["dist_token"] = state["cls_token"].clone()
        state["head_dist.weight"], state["head_dist.bias"] = (
            state["head.weight"].clone(),
            state["head.bias"].clone(),
        )
        notes.append("added a distillation token (copied from the class token)")
    if old.grid_size != new.grid_size:
        pos = resize_pos_embed(pos, new.num_prefix_tokens, old.grid_size, new.grid_size)
        notes.append(f"pos_embed resized {old.grid_size} -> {new.grid_size}")
    state["pos_embed"] = pos
    w = state["patch_embed.proj.weight"]
    if old.in_chans != new.in_chans:
        if new.in_chans == 1:
            state["patch_embed.proj.weight"] = w.sum(dim=1, keepdim=True)
        elif old.in_chans == 1:
            state["patch_embed.proj.weight"] = w.repeat(1, new.in_chans, 1, 1) / new.in_chans
        else:
            raise ValueError(f"cannot adapt {old.in_chans} input channels to {new.in_chans}")
        notes.append(f"patch embedding adapted from {old.in_chans} to {new.in_chans} channels")
    if old.num_classes != new.num_classes:
        heads = [k for k in list(state) if k.startswith(("head.", "head_dist."))]
        for k in heads:
            state.pop(k)
        reinit += heads
        notes.append(
            f"re-initialised {', '.join(heads)} ({old.num_classes} -> {new.num_classes} classes)"
        )
    return state, {"reinit": reinit, "log": notes}
