"""Fine-tuning: the recipe that is the default when ``model.init`` is given, and what reads the
data the way the initial model was trained.

:func:`resolve` is called by ``deit.train.loop.train`` before anything is built. It changes only
values the user left at their defaults: keys set by a recipe file or a ``section.key=value``
override (``TrainConfig.explicit``), or changed in Python from the dataclass default, always
win. Every change is appended to ``cfg.notes`` (saved in ``RUN/config.json``) and logged.

Where the values come from (see ``docs/training.md``, "Fine-tuning"):

* the official DeiT fine-tuning runs (``--finetune``: 30 epochs, small lr, tiny weight decay),
  BEiT/timm fine-tuning (layer-wise lr decay 0.65-0.75, short warm-up, drop path 0.1) and
  the paper's transfer experiments (CIFAR, Flowers, Cars, iNat: the ImageNet model fine-tuned
  with a lower learning rate, no repeated augmentation);
* augmentation sized to the data: RandAugment, mixup/cutmix and random erasing only when the
  training set is large, crops kept large on small or low-resolution data;
* a batch that gives an epoch at least ~16 steps on small folders.

A small image folder trained from scratch gets a recipe of its own (:func:`scratch_recipe`):
DeiT's ImageNet regularisation would keep a small student from learning it at all.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deit.checkpoints import LoadedModel
from deit.config import DeiTConfig
from deit.errors import ConfigError
from deit.images import IMAGE_EXTENSIONS
from deit.labels import label_map
from deit.model import DeiT
from deit.train.data import InputSpec
from deit.train.runconfig import TrainConfig
from deit.transforms import PreprocessConfig

log = logging.getLogger("deit.train.finetune")

SMALL_DATA = 10_000  # training images: below this, no RandAugment / mixup / cutmix / erasing
LARGE_DATA = 100_000  # at or above this, the from-scratch augmentation strength
LOW_RES = 64  # pixels: below this, no RandAugment (its ops wipe out 28-32 px images)
MIN_EPOCH_STEPS = 16  # small data: the batch leaves an epoch at least this many steps
FT_MIN_STEPS = 1000  # fine-tuning on small data: at least this many optimizer steps in all
SCRATCH_MIN_STEPS = 3000  # from scratch on small data: at least this many
# small data, from scratch or fine-tuned to new classes: the lr whatever the batch (the batch
# shrinks on small data to give enough steps; a rate scaled with it would undo that)
SMALL_DATA_LR = 1e-3
FLIP_PIXELS = 32  # from scratch, the flip check's probe reads the images at this size
KNOWN_CLASSES_LR = 1e-4  # base lr (x batch / 512) when every class is one the model knows
TRANSFER_LR = 2e-3  # base lr when some class is new (x batch / 512: 2.5e-4 at batch 64)
HEAD_LR_SCALE = 10.0  # the heads' lr over the body's when some class is new


def is_explicit(cfg: TrainConfig, key: str) -> bool:
    """Whether ``section.key`` was set by the user (recipe, override, or changed in Python)."""
    if key in cfg.explicit:
        return True
    section, name = key.split(".")
    return bool(getattr(getattr(cfg, section), name) != getattr(getattr(_DEFAULT, section), name))


_DEFAULT = TrainConfig()


def set_default(cfg: TrainConfig, key: str, value: Any, why: str) -> bool:
    """Set ``key`` to ``value`` unless the user set it; note the change. True if changed."""
    section, name = key.split(".")
    old = getattr(getattr(cfg, section), name)
    if is_explicit(cfg, key) or old == value:
        return False
    setattr(getattr(cfg, section), name, value)
    note(cfg, f"{key} = {value!r} (default {old!r}): {why}")
    return True


def note(cfg: TrainConfig, text: str) -> None:
    """Record ``text`` in ``cfg.notes`` (once)."""
    if text not in cfg.notes:  # logged by the loop once its train.log is open
        cfg.notes.append(text)


def count_train_images(cfg: TrainConfig, train_data: Any = None) -> int | None:
    """How many training images the run will see per epoch (before repeated augmentation);
    None when the source does not say (a streamed dataset, say)."""
    if train_data is not None:
        try:
            n = len(train_data)
        except TypeError:
            return None
    elif cfg.data.dataset == "fashion-mnist":
        n = 60_000
    elif cfg.data.dataset != "imagefolder":
        return None
    else:
        root = Path(cfg.data.path)
        n = sum(
            1
            for d in (root.iterdir() if root.is_dir() else ())
            if d.is_dir()
            for f in d.rglob("*")
            if f.suffix.lower() in IMAGE_EXTENSIONS
        )
    return min(n, cfg.data.train_subset) if cfg.data.train_subset else n


def folder_channels(path: str | Path, sample: int = 16) -> int | None:
    """1 if the first images of an image folder are all grayscale, 3 if any is colour."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        return None
    files = [
        f
        for d in sorted(root.iterdir())
        if d.is_dir()
        for f in sorted(d.iterdir())[:4]
        if f.suffix.lower() in IMAGE_EXTENSIONS
    ][:sample]
    modes = set()
    for f in files:
        try:
            with Image.open(f) as im:
                modes.add(im.mode)
        except Exception:  # unreadable files are the loader's business
            continue
    if not modes:
        return None
    return 1 if modes <= {"1", "L", "LA", "I", "I;16", "F"} else 3


def recipe(
    cfg: TrainConfig, n_train: int | None, img_size: int, new_classes: bool | None = None
) -> None:
    """Apply the fine-tuning recipe's defaults for ``n_train`` images of ``img_size`` px
    (``None``: size unknown, the medium-size augmentation and the batch size left alone).

    ``new_classes``: whether some class matches none of the initial model's labels (None:
    unknown, taken as yes). Then the new head rows are fitted on frozen features first
    (``schedule.linear_probe``), the body trains at the transfer rate and the heads at
    ``HEAD_LR_SCALE`` times it; when every class is one the model knows, the gentle rate of a
    model that only has to specialise.
    """
    size = f"{n_train} training images of {img_size} px"
    if n_train is None:
        note(cfg, "training-set size unknown: medium-size fine-tuning augmentation")
        n_train, size = LARGE_DATA - 1, f"an unknown number of images of {img_size} px"
        cfg.explicit.add("data.batch_size")  # nothing to size it by
    small, large = n_train < SMALL_DATA, n_train >= LARGE_DATA
    set_default(cfg, "schedule.epochs", 30, "fine-tuning length (DeiT --finetune runs: 30)")
    if new_classes is False:
        set_default(
            cfg,
            "optim.base_lr",
            KNOWN_CLASSES_LR,
            "every class is one the model knows: a small lr that specialises without forgetting",
        )
    else:
        why = f"the transfer rate at batch 256 ({TRANSFER_LR:g} x 256 / 512), whatever the batch"
        if not (small and small_data_rate(cfg, f"{size}, new classes: {why}")):
            set_default(
                cfg,
                "optim.base_lr",
                TRANSFER_LR,
                "new classes: the transfer rate (the body must learn new features)",
            )
        set_default(
            cfg,
            "optim.head_lr_scale",
            HEAD_LR_SCALE,
            "new classes: the heads learn faster than the pretrained body (timm/transformers)",
        )
    set_default(cfg, "optim.weight_decay", 0.01, "fine-tuning: weaker decay (transfer runs)")
    set_default(
        cfg, "optim.layer_decay", 0.75, "fine-tuning: layer-wise lr decay (BEiT/timm, small ViTs)"
    )
    set_default(cfg, "schedule.min_lr", 1e-6, "fine-tuning: the cosine ends near zero")
    set_default(cfg, "augment.repeated_aug", 1, "fine-tuning: no repeated augmentation")
    set_default(
        cfg,
        "run.export",
        "best",
        "fine-tuning: the epoch with the best validation accuracy is exported (the initial "
        "model counts as epoch 0), so a late epoch that ends worse costs nothing",
    )
    if not large:
        set_default(
            cfg,
            "augment.mixup",
            0.0 if small else 0.2,
            f"{size}: little or no mixup for small data",
        )
        set_default(cfg, "augment.cutmix", 0.0, f"{size}: no cutmix for small data")
        set_default(
            cfg,
            "augment.random_erasing",
            0.0 if small else 0.1,
            f"{size}: little or no erasing for small data",
        )
        set_default(
            cfg,
            "augment.scale",
            [0.7, 1.0] if small else [0.35, 1.0],
            f"{size}: crops keep most of the image",
        )
    if small or img_size < LOW_RES:
        set_default(cfg, "augment.randaugment", "", f"{size}: no RandAugment")
    elif not large:
        set_default(cfg, "augment.randaugment", "rand-m6-mstd0.5-inc1", f"{size}: mild RandAugment")
    if not is_explicit(cfg, "data.batch_size"):
        small_data_schedule(cfg, n_train, size, FT_MIN_STEPS)


def scratch_recipe(cfg: TrainConfig, n_train: int, img_size: int) -> None:
    """The from-scratch defaults for a small image folder (fewer than ``SMALL_DATA`` images).

    DeiT's ImageNet recipe (each image 3 times an epoch, mixup and cutmix on every batch,
    RandAugment m9, random erasing, crops down to 8% of the image, lr 5e-4 x batch / 512)
    regularises a model seeing 1.2M images for 300 epochs; on 1,350 digit scans it leaves a
    small DeiT at chance for 20 epochs (docs/results/fine-tuning.md). Here: plain crops
    keeping at least a third of the image, flips (unless :func:`check_flips` finds they change
    the classes), label smoothing, and a rate of ``SMALL_DATA_LR`` (1e-3 at batch 64 against
    5e-4 there: 98.0% against 97.0% on those digits).
    """
    size = f"{n_train} training images of {img_size} px"
    set_default(cfg, "augment.repeated_aug", 1, f"{size}: each image once an epoch")
    set_default(cfg, "augment.mixup", 0.0, f"{size}: no mixup")
    set_default(cfg, "augment.cutmix", 0.0, f"{size}: no cutmix")
    set_default(cfg, "augment.random_erasing", 0.0, f"{size}: no erasing")
    set_default(cfg, "augment.randaugment", "", f"{size}: no RandAugment")
    set_default(cfg, "augment.scale", [0.35, 1.0], f"{size}: crops keep a third or more")
    small_data_rate(
        cfg, f"{size}: a rate that learns within a few thousand steps, whatever the batch"
    )
    set_default(cfg, "run.export", "best", f"{size}: the epoch with the best validation accuracy")
    small_data_schedule(cfg, n_train, size, SCRATCH_MIN_STEPS)


def small_data_rate(cfg: TrainConfig, why: str) -> bool:
    """``optim.lr`` = ``SMALL_DATA_LR`` (noted with ``why``) unless the user gave a base rate of
    their own (``optim.base_lr``, scaled by the batch as usual); False in that case only."""
    if is_explicit(cfg, "optim.base_lr"):
        return False
    set_default(cfg, "optim.lr", SMALL_DATA_LR, why)
    return True


def small_data_schedule(cfg: TrainConfig, n_train: int, size: str, min_steps: int) -> None:
    """Enough optimizer steps for a small data set (any run, fine-tuning or not).

    A batch that leaves an epoch at least ``MIN_EPOCH_STEPS`` steps, and, when the epochs
    would still give fewer than ``min_steps`` steps in all, a budget of ``min_steps`` steps
    (``schedule.steps``, turned into epochs by :func:`steps_to_epochs`).
    """
    if n_train < MIN_EPOCH_STEPS * 256:
        floor = 2 ** int(math.log2(max(min(n_train, 8), 1)))  # 8, or what a tiny set holds
        bs = max(floor, min(256, 2 ** int(math.log2(max(n_train // MIN_EPOCH_STEPS, 1)))))
        set_default(
            cfg,
            "data.batch_size",
            bs,
            f"{size}: the largest batch that leaves an epoch at least {MIN_EPOCH_STEPS} steps",
        )
    per_epoch = max(n_train // (cfg.data.batch_size * world_size()), 1)
    total = cfg.schedule.epochs * per_epoch
    if total < min_steps and "schedule.epochs" not in cfg.explicit:  # the recipe's 30 is not
        set_default(
            cfg,
            "schedule.steps",
            min_steps,
            f"{cfg.schedule.epochs} epochs of {per_epoch} steps would be only {total} optimizer "
            f"steps; a budget of {min_steps} steps",
        )


def world_size() -> int:
    """The processes the run will have (``torchrun`` sets ``WORLD_SIZE``)."""
    import os

    return max(int(os.environ.get("WORLD_SIZE", "1")), 1)


def steps_to_epochs(cfg: TrainConfig, n_train: int | None) -> None:
    """Turn a ``schedule.steps`` budget into whole epochs (rounded up), noted with the
    reason; a budget of 0 (no training) and unknown data sizes are left to the loop."""
    s = cfg.schedule
    if not s.steps or n_train is None:
        return
    per_epoch = max(n_train // (cfg.data.batch_size * world_size()), 1)
    epochs = math.ceil(s.steps / per_epoch)
    if epochs != s.epochs:
        note(
            cfg,
            f"schedule.epochs = {epochs} (was {s.epochs}): schedule.steps = {s.steps} at "
            f"{per_epoch} steps per epoch ({n_train} images, batch {cfg.data.batch_size})",
        )
        s.epochs = epochs


def adjust_warmup(cfg: TrainConfig) -> None:
    """No schedule that never reaches its learning rate: shorten a default warm-up to 10% of
    the run (at most 1 epoch when fine-tuning); refuse an explicit one longer than the run."""
    s = cfg.schedule
    if cfg.model.init and s.warmup_epochs > min(1.0, 0.1 * s.epochs):
        set_default(
            cfg,
            "schedule.warmup_epochs",
            round(min(1.0, 0.1 * s.epochs), 3),
            "fine-tuning: a short warm-up (10% of the run, at most 1 epoch)",
        )
    if s.warmup_epochs < s.epochs - s.head_warmup_epochs:
        return
    if is_explicit(cfg, "schedule.warmup_epochs"):
        if s.warmup_epochs > s.epochs - s.head_warmup_epochs:
            raise ConfigError(
                f"schedule.warmup_epochs={s.warmup_epochs:g} is longer than the run "
                f"({s.epochs} epochs{' after the head warm-up' if s.head_warmup_epochs else ''}): "
                "the learning rate would never reach its value; shorten the warm-up or train longer"
            )
        log.warning("schedule.warmup_epochs equals the run's length: lr peaks at the last step")
        return
    value = round(0.1 * (s.epochs - s.head_warmup_epochs), 3)
    set_default(
        cfg,
        "schedule.warmup_epochs",
        value,
        f"the default warm-up is not shorter than the run ({s.epochs} epochs): 10% of it",
    )
    log.warning("schedule.warmup_epochs shortened to %g epochs (%d-epoch run)", value, s.epochs)


def data_config_from_model(
    cfg: TrainConfig, model: LoadedModel | InputSpec, data_channels: int | None = None
) -> None:
    """Read the data the way ``model`` (the initial model) was trained: its channels,
    mean/std, resolution and eval crop become the defaults (as timm takes the data config
    from a pretrained model). The one place for this logic, whatever the data source.

    Args:
        cfg: the run config (changed in place, only where the user left defaults).
        model: the loaded initial model, or the input spec of a CNN run's export.
        data_channels: the channels the data's images really have (None = unknown); a
            conversion RGB⇄gray is logged only when they differ from what is used.
    """
    if isinstance(model, LoadedModel):
        spec, pre = InputSpec.of(model), model.preprocess
        resize = pre.resize_size
        crop = pre.crop_size[0] if pre.crop_size else spec.img_size
        side = crop
        if isinstance(resize, int):
            side = resize
        elif resize is not None:
            side = resize[0]
        crop_pct: float | None = min(1.0, crop / side)
    else:
        spec, crop_pct = model, None
    why = "as the initial model was trained"
    set_default(cfg, "data.in_chans", spec.in_chans, why)
    chans = cfg.data.in_chans or spec.in_chans
    mean, std = list(spec.mean), list(spec.std)
    if len(mean) != chans:  # the user chose other channels: the model's statistics adapted
        avg = [sum(mean) / len(mean)], [sum(std) / len(std)]
        mean, std = avg[0] * chans, avg[1] * chans
    set_default(cfg, "data.mean", mean, why)  # exact: the exported preprocessing is the model's
    set_default(cfg, "data.std", std, why)
    set_default(cfg, "model.img_size", spec.img_size, why)
    if crop_pct is not None:
        set_default(cfg, "data.crop_pct", round(crop_pct, 6), why)
    if isinstance(model, LoadedModel):  # training crops resized as inference will resize
        set_default(cfg, "augment.interpolation", model.preprocess.interpolation, why)
    if data_channels is not None and data_channels != chans:
        kind = {1: "grayscale", 3: "RGB"}
        note(
            cfg,
            f"the images are {kind.get(data_channels, data_channels)}: converted to "
            f"{kind.get(chans, chans)} ({chans} channel(s)) when read",
        )
    if cfg.data.in_chans != spec.in_chans:
        note(
            cfg,
            f"data.in_chans={cfg.data.in_chans} differs from the model's {spec.in_chans}: "
            "its patch embedding is converted",
        )


def inherited_preprocess(parent: PreprocessConfig, spec: InputSpec) -> PreprocessConfig:
    """The fine-tuned model's inference preprocessing: its parent's (resize mode, filter,
    light-background inversion, crop ratio, rounding), with what the data changed: the side
    (resize and crop scaled to ``spec.img_size``), the channels and the mean/std."""
    side = spec.img_size
    crop = parent.crop_size or parent.input_size
    scale = side / crop[0]
    resize = parent.resize_size
    if isinstance(resize, int):
        resize = round(resize * scale)
    else:
        resize = (round(resize[0] * scale), round(resize[1] * scale))
    return dataclasses.replace(
        parent,
        resize_size=resize,
        crop_size=(side, side),
        mean=tuple(spec.mean),
        std=tuple(spec.std),
        channels=spec.in_chans,
        source=f"{parent.source} (fine-tuned)" if parent.source else "deit train",
    )


def resolve(
    cfg: TrainConfig, train_data: Any = None, labels: Sequence[str] | None = None
) -> LoadedModel | None:
    """Resolve the run's defaults in place: with ``model.init`` the data config from the
    initial model and the fine-tuning recipe; from scratch on a small image folder its
    channels and a schedule with enough steps; always the warm-up check.

    Args:
        cfg: the run config (changed in place where the user left defaults).
        train_data: a user dataset replacing ``cfg.data`` (sized with ``len``).
        labels: its class names (image folders: the sub-folder names are read).

    Returns:
        The loaded initial DeiT (to build the student from), or None.
    """
    loaded = None
    channels = None
    if train_data is None and cfg.data.dataset == "imagefolder" and cfg.data.path:
        channels = folder_channels(cfg.data.path)
    n = count_train_images(cfg, train_data)
    if cfg.model.init:
        from deit.train.classifiers import is_classifier_dir, load_classifier

        init = cfg.model.init
        if Path(init).is_dir() and is_classifier_dir(init):
            _, config = load_classifier(init)
            source: LoadedModel | InputSpec = InputSpec.from_dict(config["spec"])
            old_labels = list(config.get("labels") or [])
        else:
            from deit.checkpoints import load_model

            loaded = source = load_model(init)
            old_labels = list(loaded.labels or [])
        data_config_from_model(cfg, source, channels)
        names = class_names(cfg, train_data, labels)
        new = None if names is None else len(label_map(names, old_labels)) < len(names)
        recipe(cfg, n, cfg.model.img_size or 224, new)
        if loaded is not None and train_data is None:
            check_flips(cfg, loaded)
    elif cfg.data.dataset == "imagefolder" and n is not None and n < SMALL_DATA:
        if channels == 1:
            set_default(cfg, "data.in_chans", 1, f"{n} training images, all grayscale: 1 channel")
        scratch_recipe(cfg, n, cfg.model.img_size or 224)
        check_flips(cfg, None)
    steps_to_epochs(cfg, n)
    adjust_warmup(cfg)
    cfg.validate()
    return loaded


def check_flips(cfg: TrainConfig, loaded: LoadedModel | None) -> None:
    """Turn the flip augmentation off (a noted default) when mirroring changes the classes
    of an image folder (digits, text, signs), judged by :func:`deit.train.probe.flip_check`
    on a sample of its training images: read with the initial model's preprocessing and
    probed on its features, or, from scratch (``loaded`` None), probed on their pixels at
    ``FLIP_PIXELS`` px."""
    from deit.images import load_image
    from deit.train.probe import FLIP_CHECK_IMAGES, flip_check
    from deit.transforms import preprocess_image

    root = Path(cfg.data.path)
    model = None if loaded is None else loaded.model
    if (
        cfg.data.dataset != "imagefolder"
        or not root.is_dir()
        or cfg.augment.hflip == 0
        or is_explicit(cfg, "augment.hflip")
        or (model is not None and not isinstance(model, DeiT))
    ):
        return
    if loaded is None:
        chans = cfg.data.in_chans or 3
        preprocess = PreprocessConfig(
            "squash", FLIP_PIXELS, None, "bilinear", (0.5,) * chans, (0.5,) * chans, chans
        )
    else:
        preprocess = loaded.preprocess
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    files = [
        sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) for d in folders
    ]
    sample: list[tuple[Path, int]] = []
    for rank in range(max((len(f) for f in files), default=0)):  # round-robin over classes
        sample += [(f[rank], c) for c, f in enumerate(files) if rank < len(f)]
        if len(sample) >= FLIP_CHECK_IMAGES:
            break
    pixels, labels = [], []
    for path, c in sample[:FLIP_CHECK_IMAGES]:
        try:
            pixels.append(preprocess_image(load_image(str(path)), preprocess))
        except Exception:  # unreadable files are the loader's business
            continue
        labels.append(c)
    if len(set(labels)) < 2 or len(labels) < 40:
        return
    check = flip_check(model, torch.stack(pixels), torch.tensor(labels))
    if check.changes_classes:
        set_default(
            cfg, "augment.hflip", 0.0, f"mirroring changes the classes here: {check.describe()}"
        )
    else:
        note(
            cfg,
            f"augment.hflip = {cfg.augment.hflip:g} kept: mirroring keeps the classes "
            f"({check.describe()})",
        )


def class_names(
    cfg: TrainConfig, train_data: Any = None, labels: Sequence[str] | None = None
) -> list[str] | None:
    """The run's class names before its data is built (None: not known yet)."""
    if train_data is not None:
        return list(labels) if labels is not None else None
    if cfg.data.dataset == "fashion-mnist":
        from deit.train.fashion_mnist import FASHION_MNIST_CLASSES

        return list(FASHION_MNIST_CLASSES)
    root = Path(cfg.data.path)
    if cfg.data.dataset == "imagefolder" and root.is_dir():
        return sorted(d.name for d in root.iterdir() if d.is_dir())
    return None


def describe(config: DeiTConfig, n_params: int, init: str = "", name: str = "") -> str:
    """The trained architecture in words, e.g. ``fine-tuned from fashion-mnist (DeiT 96-dim,
    6 blocks, 3 heads, patch 4, 32 px, 1 channel, distilled, 0.68M parameters)``."""
    shape = (
        f"DeiT {config.embed_dim}-dim, {config.depth} blocks, {config.num_heads} heads, "
        f"patch {config.patch_size}, {config.image_hw[0]} px, {config.in_chans} channel"
        f"{'s' if config.in_chans > 1 else ''}{', distilled' if config.distilled else ''}, "
        f"{config.num_classes} classes, {n_params / 1e6:.2f}M parameters"
    )
    if init:
        return f"fine-tuned from {init} ({shape})"
    return f"{name} ({shape})" if name and name != "deit" else shape


# --------------------------------------------------------------------------- the student


def is_head(name: str) -> bool:
    return name.startswith(("head.", "head_dist."))


def layer_id(name: str, depth: int) -> int:
    """BEiT/timm layer index: patch embedding and tokens 0, block i → i + 1, the rest (final
    norm, heads) depth + 1."""
    if name in ("cls_token", "dist_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def freeze(model: nn.Module, how: str, trainable_blocks: int | None) -> list[str]:
    """Freeze parameters (``requires_grad = False``); returns the names still trained.

    ``how``: ``none`` (a set ``trainable_blocks`` alone means ``blocks``), ``head_only`` (only
    ``head``/``head_dist`` train), ``blocks`` (the last ``trainable_blocks`` blocks, the final
    norm and the heads train).
    """
    if how == "none" and trainable_blocks is not None:
        how = "blocks"
    if how == "none":
        return [n for n, _ in model.named_parameters()]
    if not isinstance(model, DeiT):
        raise ConfigError(f"model.freeze={how} needs a DeiT student, not {type(model).__name__}")
    depth = model.config.depth
    keep_from = depth + 1 if how == "head_only" else depth + 1 - (trainable_blocks or 0)
    trained = []
    for name, p in model.named_parameters():
        lid = layer_id(name, depth)
        train = is_head(name) or (how == "blocks" and lid >= keep_from)
        p.requires_grad_(train)
        if train:
            trained.append(name)
    return trained
