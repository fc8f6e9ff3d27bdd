"""Run configuration for ``deit train``: one dataclass per section, defaults from the DeiT recipe.

A run is resolved in three layers, each overriding the one before:

1. the dataclass defaults below (the DeiT recipe: facebookresearch/deit ``main.py``, paper
   Table 9);
2. a recipe file (TOML, or the JSON that every run writes into its run directory);
3. command-line overrides ``section.key=value`` (values parsed as TOML literals, so
   ``optim.lr=1e-3``, ``distill.kind=hard``, ``data.mean=[0.5]`` and ``run.ema=true`` all work;
   bare words are read as strings).

Every value is type-checked against the field's annotation and unknown sections or keys are
errors that name them. The resolved configuration is written to ``run_dir/config.json`` and
stored in every training checkpoint.

Example:
    >>> cfg = load_config(None, ["optim.lr=1e-3", "schedule.epochs=2"])
    >>> cfg.optim.lr, cfg.schedule.epochs
    (0.001, 2)
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from deit.errors import ConfigError, ConfigKeyError, ConfigTypeError


@dataclass
class ModelSection:
    """What to train.

    ``name`` is a DeiT preset from ``deit.config.VARIANTS``, ``"deit"`` (the default
    DeiTConfig, shaped by the fields below), ``"fmnist_cnn"`` (a small built-in CNN), or
    ``"timm:NAME"`` / ``"torchvision:NAME"``. ``init`` fine-tunes from anything
    ``deit.checkpoints.load_model`` loads (or a directory a CNN run exported); with it the
    fine-tuning recipe and the initial model's data config become the defaults
    (``deit.train.finetune``). Fields left at None take the preset's (or the data's) value.
    """

    name: str = "deit_tiny_distilled_patch16_224"
    init: str = ""  # checkpoint to start from (fine-tuning); "" = random init
    pretrained: bool = False  # timm:/torchvision: names only: ask the library for its weights
    img_size: int | None = None  # None: the data's image size (tensor data) or the preset's
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    distilled: bool | None = None
    drop_path_rate: float = 0.1  # stochastic depth of the last block (DeiT: 0.1)
    freeze: str = "none"  # none | head_only (train only head/head_dist) | blocks (see below)
    trainable_blocks: int | None = None  # freeze=blocks: train the last N blocks, norm, heads


@dataclass
class DataSection:
    """Where the images come from and how they are batched.

    ``dataset`` is ``"fashion-mnist"`` (IDX files under ``path``, default
    ``/usr/share/datasets/fashion-mnist``) or ``"imagefolder"`` (``path`` = train root with one
    folder per class, ``val_path`` = validation root). Tensor datasets (Fashion-MNIST) live on
    the training device and are augmented there in whole batches.
    """

    dataset: str = "fashion-mnist"
    path: str = ""
    val_path: str = ""
    train_subset: int = 0  # use only the first N training images (0 = all)
    val_subset: int = 0  # use only the first N validation images (0 = all)
    batch_size: int = 256  # per process
    eval_batch_size: int = 0  # 0 = 2 x batch_size
    num_workers: int = 2  # DataLoader workers (image-folder data only)
    mean: list[float] | None = None  # None: the data's own statistics (tensors) or ImageNet
    std: list[float] | None = None
    in_chans: int | None = None  # None: 1 for Fashion-MNIST, 3 for image folders
    crop_pct: float | None = None  # image-folder eval: resize to size / crop_pct, center crop
    # (None: 0.875, DeiT's; with model.init: the initial model's own)
    # dataset=hf (Hugging Face datasets: save_to_disk folder, Parquet/Arrow, imagefolder, Hub
    # name) or webdataset (tar shards, path = brace pattern); see deit.train.sources
    split: str = "train"  # hf: training split
    val_split: str = ""  # hf: validation split ("": validation, valid, val or test)
    image_column: str = ""  # hf: "" = the datasets.Image column
    label_column: str = ""  # hf: "" = the datasets.ClassLabel column
    streaming: bool = False  # hf: stream (IterableDataset) instead of the local Arrow cache
    revision: str = ""  # hf Hub datasets: branch, tag or commit
    epoch_samples: int = 0  # streamed sources: samples per epoch (0: all in the shards)
    shuffle_buffer: int = 1000  # streamed sources: sample-shuffle buffer per worker


@dataclass
class OptimSection:
    """AdamW with the DeiT parameter groups (no decay on 1-D params, biases, tokens)."""

    lr: float | None = None  # None: base_lr * global batch / 512 (DeiT's linear scaling)
    base_lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 0.0  # max global grad norm; 0 = off
    fused: bool = False  # torch's fused AdamW kernel (CUDA)
    layer_decay: float = 1.0  # layer-wise lr decay (BEiT/timm): lr x decay**(depth + 1 - layer)
    head_lr_scale: float = 1.0  # head/head_dist lr = this x the lr (fine-tuning: new rows learn
    # faster than the pretrained body)


@dataclass
class ScheduleSection:
    """Linear warmup then cosine decay, updated every step (see ``train.lr_at``)."""

    epochs: int = 300
    steps: int | None = None  # optimizer steps in all, rounded up to whole epochs (None: from
    # epochs; 0: no training, the initial model adapted to the data and exported as it is)
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    head_warmup_epochs: float = 0.0  # train only the heads (at the base lr) for this long,
    # then everything on the warmup + cosine schedule over the remaining epochs
    linear_probe: str = "auto"  # fit the heads on frozen features before training (LP-FT):
    # auto (when model.init is given and a class matches none of its labels) | on | off
    fit_to_time: bool = False  # with run.time_limit: shorten ``epochs`` (and the cosine with
    # it) after each epoch so that the run ends within the limit at the measured speed


@dataclass
class AugmentSection:
    """Train-time augmentation and targets."""

    randaugment: str = "rand-m9-mstd0.5-inc1"  # timm auto_augment string; "" = off (PIL data)
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area
    interpolation: str = "bicubic"
    crop_padding: int = 4  # tensor data: random crop after zero padding by this many pixels
    hflip: float = 0.5
    random_erasing: float = 0.25
    mixup: float = 0.8  # Beta alpha; 0 = off
    cutmix: float = 1.0  # Beta alpha; 0 = off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    repeated_aug: int = 3  # repeats per image per epoch (RASampler); 1 = off


@dataclass
class DistillSection:
    """Teacher and distillation loss.

    ``teacher`` is ``"timm:NAME"``, ``"torchvision:NAME"``, a TorchScript file (``.pt``/``.pth``
    from ``torch.jit.save``), a ``torch.export`` file (``.pt2``) or a directory written by
    ``deit train``. The teacher's own normalisation, input size and channels are used when it
    declares them; the ``teacher_*`` fields set them for files that don't. ``trust_code``
    allows a teacher file that runs code when loaded (TorchScript, a ``.pt2`` holding
    pickles); without it such files are refused (see ``deit.safety``).
    """

    kind: str = "none"  # none | soft | hard
    teacher: str = ""
    alpha: float = 0.5
    tau: float = 1.0
    teacher_mean: list[float] | None = None
    teacher_std: list[float] | None = None
    teacher_img_size: int | None = None
    teacher_in_chans: int | None = None
    trust_code: bool = False  # load a TorchScript (or pickle-holding .pt2) teacher: runs its code


@dataclass
class RunSection:
    """Devices, precision, checkpoints and logging."""

    out_dir: str = "runs"
    name: str = ""  # run directory name under out_dir; "" = derived from model and time
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    compile: bool = False  # torch.compile the student
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune
    ema: bool = False
    ema_decay: float = 0.99996
    eval_every: int = 1  # epochs between evaluations (0 = only at the end)
    log_every: int = 50  # steps between metrics.jsonl lines
    export: str = "final"  # which weights go to run_dir/model: final | ema | best
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower)
    progress: bool = True  # tqdm progress bars
    save_every: int = 1  # epochs between last.pt checkpoints (the final epoch is always saved)
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit; tests)
    time_limit: float = 0.0  # seconds of training; stop (then evaluate and export) before an
    # epoch would end past it (0 = none); see schedule.fit_to_time to shorten the schedule too


@dataclass
class TrainConfig:
    """A complete, resolved training run."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    distill: DistillSection = field(default_factory=DistillSection)
    run: RunSection = field(default_factory=RunSection)
    # Filled in by the run (``deit.train.finetune.resolve`` and the loop), saved in config.json:
    student: str = ""  # the architecture actually trained, in words
    notes: list[str] = field(default_factory=list)  # each default the run changed, and why
    # The ``section.key`` names set by a recipe file or an override (never changed by the
    # fine-tuning defaults); not saved.
    explicit: set[str] = field(default_factory=set, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (JSON- and TOML-safe apart from None values)."""
        d = dataclasses.asdict(self)
        d.pop("explicit")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a nested dict; missing keys keep their defaults."""
        cfg = cls()
        apply_dict(cfg, d)
        return cfg

    def validate(self) -> None:
        """Check cross-field constraints; raise ValueError naming every problem."""
        problems = []
        if self.distill.kind not in ("none", "soft", "hard"):
            problems.append(f"distill.kind must be none, soft or hard, not {self.distill.kind!r}")
        if self.distill.kind != "none" and not self.distill.teacher:
            problems.append(f"distill.kind={self.distill.kind} needs distill.teacher")
        if self.run.precision not in ("fp32", "bf16", "fp16"):
            problems.append(f"run.precision must be fp32, bf16 or fp16, not {self.run.precision!r}")
        if self.run.export not in ("final", "ema", "best"):
            problems.append(f"run.export must be final, ema or best, not {self.run.export!r}")
        if self.run.export == "ema" and not self.run.ema:
            problems.append("run.export=ema needs run.ema=true")
        if self.data.dataset not in ("fashion-mnist", "imagefolder", "hf", "webdataset"):
            problems.append(
                "data.dataset must be fashion-mnist, imagefolder, hf or webdataset, "
                f"not {self.data.dataset!r}"
            )
        if self.data.batch_size < 1 or self.schedule.epochs < 1:
            problems.append("data.batch_size and schedule.epochs must be positive")
        if self.augment.repeated_aug < 1:
            problems.append("augment.repeated_aug must be >= 1")
        if self.run.log_every < 1:
            problems.append(f"run.log_every must be >= 1, not {self.run.log_every}")
        # Counts where 0 means "all"/"off"/"default": a negative one would slice from the end
        # (data.train_subset=-5 trained on all but 5 images) or make no sense.
        counts = {
            "data.train_subset": self.data.train_subset,
            "data.val_subset": self.data.val_subset,
            "data.eval_batch_size": self.data.eval_batch_size,
            "data.num_workers": self.data.num_workers,
            "data.epoch_samples": self.data.epoch_samples,
            "augment.crop_padding": self.augment.crop_padding,
            "schedule.warmup_epochs": self.schedule.warmup_epochs,
            "run.eval_every": self.run.eval_every,
            "run.save_every": self.run.save_every,
            "run.max_steps": self.run.max_steps,
            "run.time_limit": self.run.time_limit,
        }
        problems += [f"{key} must be >= 0, not {v}" for key, v in counts.items() if v < 0]
        if self.model.freeze not in ("none", "head_only", "blocks"):
            problems.append(
                f"model.freeze must be none, head_only or blocks, not {self.model.freeze!r}"
            )
        if self.model.trainable_blocks is not None and self.model.trainable_blocks < 0:
            problems.append(
                f"model.trainable_blocks must be >= 0, not {self.model.trainable_blocks}"
            )
        if self.model.freeze == "blocks" and self.model.trainable_blocks is None:
            problems.append("model.freeze=blocks needs model.trainable_blocks")
        if not 0.0 < self.optim.layer_decay <= 1.0:
            problems.append(f"optim.layer_decay {self.optim.layer_decay} is not in (0, 1]")
        if not 0.0 <= self.schedule.head_warmup_epochs < self.schedule.epochs:
            problems.append(
                f"schedule.head_warmup_epochs {self.schedule.head_warmup_epochs} must be >= 0 "
                f"and shorter than schedule.epochs ({self.schedule.epochs})"
            )
        if self.schedule.linear_probe not in ("auto", "on", "off"):
            problems.append(
                f"schedule.linear_probe must be auto, on or off, not {self.schedule.linear_probe!r}"
            )
        if self.schedule.steps is not None and self.schedule.steps < 0:
            problems.append(f"schedule.steps must be >= 0, not {self.schedule.steps}")
        if not self.optim.head_lr_scale > 0.0:
            problems.append(f"optim.head_lr_scale {self.optim.head_lr_scale} must be > 0")
        if self.data.crop_pct is not None and not 0.0 < self.data.crop_pct <= 1.0:
            problems.append(f"data.crop_pct {self.data.crop_pct} is not in (0, 1]")
        if not 0.0 <= self.distill.alpha <= 1.0:
            problems.append(f"distill.alpha {self.distill.alpha} is not in [0, 1]")
        problems += _value_problems(self)
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))


# Ranges of numeric fields: (low, high, low included, high included); None fields are skipped.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "model.mlp_ratio": (0.0, math.inf, False, False),
    "model.drop_path_rate": (0.0, 1.0, True, False),
    "data.in_chans": (1, 4096, True, True),
    "optim.lr": (0.0, math.inf, False, False),
    "optim.base_lr": (0.0, math.inf, False, False),
    "optim.weight_decay": (0.0, math.inf, True, False),
    "optim.eps": (0.0, math.inf, False, False),
    "optim.clip_grad": (0.0, math.inf, True, False),
    "schedule.warmup_lr": (0.0, math.inf, True, False),
    "schedule.min_lr": (0.0, math.inf, True, False),
    "augment.hflip": (0.0, 1.0, True, True),
    "augment.random_erasing": (0.0, 1.0, True, True),
    "augment.mixup": (0.0, math.inf, True, False),
    "augment.cutmix": (0.0, math.inf, True, False),
    "augment.mixup_prob": (0.0, 1.0, True, True),
    "augment.mixup_switch_prob": (0.0, 1.0, True, True),
    "augment.label_smoothing": (0.0, 1.0, True, False),
    "distill.tau": (0.0, math.inf, False, False),
    "run.ema_decay": (0.0, 1.0, True, True),
}
_POSITIVE_LISTS = ("data.std", "distill.teacher_std")  # divisors: every value > 0


def _value_problems(cfg: TrainConfig) -> list[str]:
    """Every float finite (NaN passes ``<`` checks), numbers in their ranges, and the
    normalisation lists consistent with the channels."""
    problems = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values) or isinstance(values, type):
            continue
        for key, value in dataclasses.asdict(values).items():
            name = f"{section.name}.{key}"
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                problems.append(f"{name} must be finite, not {value}")
                continue
            if name in _RANGES and value is not None:
                low, high, low_in, high_in = _RANGES[name]
                above = value >= low if low_in else value > low
                below = value <= high if high_in else value < high
                if not (above and below):
                    where = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                    problems.append(f"{name} {value} is not in {where}")
            if name in _POSITIVE_LISTS and value is not None and not all(v > 0 for v in value):
                problems.append(f"{name} values must be > 0, not {value}")
    scale = cfg.augment.scale
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        problems.append(f"augment.scale must be [min, max] with 0 < min <= max <= 1, not {scale}")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        problems.append(f"optim.betas must be two values in [0, 1), not {betas}")
    d, t = cfg.data, cfg.distill
    chans = d.in_chans or (1 if d.dataset == "fashion-mnist" else 3)
    for name, value, n in (
        ("data.mean", d.mean, chans),
        ("data.std", d.std, chans),
        ("distill.teacher_mean", t.teacher_mean, t.teacher_in_chans or 3),
        ("distill.teacher_std", t.teacher_std, t.teacher_in_chans or 3),
    ):
        if value is not None and len(value) not in (1, n):
            problems.append(f"{name} has {len(value)} values for {n} channels (give 1 or {n})")
    return problems


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` converted to ``annotation`` (int→float, list→tuple-free) or raise."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, key)
            except TypeError as e:
                errors.append(str(e))
        raise ConfigTypeError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigTypeError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and type(value) is annotation:
        return value
    raise ConfigTypeError(
        f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}"
    )


def _section_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def set_value(cfg: TrainConfig, dotted: str, value: Any) -> None:
    """Set ``section.key`` on ``cfg`` after checking the section, the key and the type."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigKeyError(f"config key {dotted!r} must look like section.key")
    section_name, key = parts
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section_name not in sections:
        raise ConfigKeyError(
            f"unknown config section {section_name!r} (known: {', '.join(sorted(sections))})"
        )
    section = getattr(cfg, section_name)
    hints = _section_types(section)
    if key not in hints:
        raise ConfigKeyError(
            f"unknown config key {dotted!r} (known in [{section_name}]: {', '.join(hints)})"
        )
    setattr(section, key, _check_value(value, hints[key], dotted))
    cfg.explicit.add(dotted)


def apply_dict(cfg: TrainConfig, d: dict[str, Any]) -> None:
    """Apply a nested ``{section: {key: value}}`` dict onto ``cfg`` with full checking."""
    for section_name, values in d.items():
        if section_name == "student":  # written by a run (config.json): kept as it was
            cfg.student = _check_value(values, str, "student")
            continue
        if section_name == "notes":
            cfg.notes = _check_value(values, list[str], "notes")
            continue
        if not isinstance(values, dict):
            raise ConfigKeyError(f"config entry {section_name!r} must be a [section] table")
        for key, value in values.items():
            set_value(cfg, f"{section_name}.{key}", value)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is a TOML literal, else a plain string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    raw = raw.strip()
    if raw.lower() in ("none", "null"):
        return key.strip(), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Resolve defaults → recipe file (TOML or JSON) → ``section.key=value`` overrides.

    Args:
        path: a ``.toml`` recipe or a ``config.json`` written by an earlier run; None = defaults.
        overrides: dotted assignments applied last, in order.

    Returns:
        The validated config.

    Raises:
        KeyError: an unknown section or key (named in the message).
        TypeError: a value of the wrong type.
        ValueError: inconsistent settings (see ``TrainConfig.validate``).
    """
    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        text = p.read_text()
        try:
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except ValueError as e:  # JSONDecodeError and TOMLDecodeError
            raise ConfigError(f"cannot parse {p}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold [section] tables, not a {type(data).__name__}")
        try:
            apply_dict(cfg, data)
        except (KeyError, TypeError) as e:
            raise type(e)(f"{p}: {e.args[0]}") from None
    for item in overrides:
        key, value = parse_override(item)
        try:
            set_value(cfg, key, value)
        except TypeError as first:  # e.g. distill.kind=none or run.name=123: the text itself
            raw = item.split("=", 1)[1].strip()
            if isinstance(value, str) and value == raw:
                raise
            try:
                set_value(cfg, key, raw)
            except TypeError:
                raise first from None
    cfg.validate()
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as JSON (reloadable with :func:`load_config`)."""
    path = Path(path)
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path
