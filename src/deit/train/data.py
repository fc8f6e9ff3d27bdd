"""Training and evaluation data: Fashion-MNIST tensors (read by
:mod:`deit.train.fashion_mnist`), image folders, repeated augmentation.

Two ways to feed a model:

* **Tensor data on the device** (Fashion-MNIST): the whole uint8 dataset sits on the training
  device as one tensor and :class:`DeviceBatches` cuts, augments (random crop with zero
  padding, horizontal flip, random erasing) and normalises whole batches there. No workers, no
  host-to-device copies; mixup/cutmix (timm) is applied by the training loop on top.
* **Image folders** (or any ``torch.utils.data.Dataset`` returning ``(image, label)``): a
  ``DataLoader`` with a per-image transform (timm's ``create_transform``, see
  ``docs/training.md`` for why) and :class:`RepeatAugSampler`. Unreadable files come back as a
  :class:`BadSample`; :func:`collate_skip_bad` drops them and the loop reports them by path.

Plugging in another dataset: pass ``train_data=`` / ``val_data=`` (any Dataset yielding a PIL
image or a float (C, H, W) tensor and an int label, PIL images are run through the train/eval
transform) and ``labels=`` to ``deit.train.loop.train``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deit.checkpoints import LoadedModel
from deit.errors import ConfigError
from deit.images import IMAGE_EXTENSIONS
from deit.labels import label_map
from deit.train.augment import (
    image_eval_transform,
    image_train_transform,
    random_crop_flip,
    random_erasing,
)
from deit.train.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from deit.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("deit.train.data")


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input: normalisation, square side and channel count."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int
    in_chans: int

    @classmethod
    def of(cls, loaded: LoadedModel) -> InputSpec:
        """What a loaded DeiT expects: its preprocessing's mean/std, input side and channels."""
        p, c = loaded.preprocess, loaded.config
        return cls(tuple(p.mean), tuple(p.std), c.image_hw[0], c.in_chans)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        """The spec stored in a classifier's ``config.json`` (lists become tuples)."""
        return cls(tuple(d["mean"]), tuple(d["std"]), int(d["img_size"]), int(d["in_chans"]))


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(dim=1).tolist(), x.std(dim=1).tolist()


def normalization(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int,
    default_mean: Sequence[float],
    default_std: Sequence[float],
) -> tuple[list[float], list[float]]:
    """The per-channel mean and std a run normalises with, and saves with its model.

    ``mean`` and ``std`` (``data.mean``/``data.std``) each replace their default on their own:
    a ``std`` given without a ``mean`` is used, not the default's. One value stands for every
    channel.

    Raises:
        ConfigError: a length that is neither 1 nor ``channels``.
    """
    out = []
    for name, given, default in (("mean", mean, default_mean), ("std", std, default_std)):
        values = [float(v) for v in (default if given is None else given)]
        if len(values) == 1:
            values *= channels
        if len(values) != channels:
            raise ConfigError(f"data.{name} has {len(values)} values for {channels} channels")
        out.append(values)
    return out[0], out[1]


def image_defaults(channels: int) -> tuple[list[float], list[float]]:
    """Mean and std for image data without statistics: ImageNet's (RGB), else 0.5."""
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [0.5] * channels, [0.5] * channels


def repeated_indices(
    n: int,
    repeats: int = 1,
    *,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    shuffle: bool = True,
) -> Tensor:
    """This rank's sample order for one epoch, with repeated augmentation.

    Shuffles with a generator seeded by ``seed + epoch`` (the same on every rank), repeats
    each index ``repeats`` times consecutively, pads to a multiple of ``world`` and deals the
    indices round-robin, so the copies of one image land on different ranks. Each rank keeps
    ``ceil(n / world)`` indices, so an epoch covers about ``n`` samples in total (about
    ``n / repeats`` distinct images). The official RASampler also rounds that down to a
    multiple of 256; we don't, so small datasets work.
    """
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    order = order.repeat_interleave(repeats)
    total = math.ceil(len(order) / world) * world
    order = torch.cat([order, order[: total - len(order)]])
    return order[rank:total:world][: math.ceil(n / world)]


class RepeatAugSampler(torch.utils.data.Sampler[int]):
    """Repeated-augmentation sampler (DeiT's RASampler), single-process or distributed.

    Call :meth:`set_epoch` before each epoch. ``world``/``rank`` default to the initialised
    process group, else one process.
    """

    def __init__(
        self,
        num_samples: int,
        repeats: int = 3,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world: int | None = None,
    ) -> None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        self.world = world if world is not None else (dist.get_world_size() if initialised else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        self.n, self.repeats, self.seed, self.shuffle, self.epoch = (
            num_samples,
            repeats,
            seed,
            shuffle,
            0,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        idx = repeated_indices(
            self.n,
            self.repeats,
            epoch=self.epoch,
            seed=self.seed,
            rank=self.rank,
            world=self.world,
            shuffle=self.shuffle,
        )
        return iter(idx.tolist())

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)


@dataclass(frozen=True)
class BadSample:
    """An image that could not be read: what the dataset returns instead of crashing."""

    path: str
    reason: str


def _open_image(path: Path, channels: int) -> Any:
    """PIL image in mode L or RGB (``deit.images``: EXIF, bombs; ``deit.transforms``: modes)."""
    from deit.images import load_image
    from deit.transforms import to_mode

    return to_mode(load_image(path), channels)


def match_class_folders(root: str | Path, labels: Sequence[str]) -> list[str]:
    """The class folders of ``root`` in a model's class order (``ImageFolder``'s ``classes``).

    A folder matches a label by name (:func:`deit.labels.label_map`: case, spaces and
    punctuation ignored, ``/`` separating alternatives, so ``t-shirt`` and ``t-shirt-top`` are
    ``T-shirt/top``); when every folder matches one, labels without a folder are simply
    absent from the data. Otherwise there must be exactly one folder per class, and their
    sorted order is taken as the class order (with a warning: the names say nothing).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    matched = label_map(folders, labels)  # folder index -> label index
    if folders and len(matched) == len(folders):
        classes = [f"/{i}" for i in range(len(labels))]  # "/" is never in a folder name
        for f, i in matched.items():
            classes[i] = folders[f]
        return classes
    for f, folder in enumerate(folders):
        alone = label_map([folder], labels)
        if f not in matched and alone:  # its label went to another folder
            other = next(folders[g] for g, i in matched.items() if i == alone[0])
            raise ValueError(
                f"{root}: folders {other!r} and {folder!r} both match the label "
                f"{labels[alone[0]]!r}"
            )
    if len(folders) != len(labels):
        unmatched = [f for i, f in enumerate(folders) if i not in matched]
        raise ValueError(
            f"{root} has {len(folders)} class folders, {len(unmatched)} of them not named "
            f"after the model's labels (e.g. {unmatched[:1] or folders[:1]}), and the model "
            f"has {len(labels)} classes: name the folders after the labels, or give exactly "
            "one folder per class (sorted = class order)"
        )
    log.warning(
        "%s: the folder names are not the model's labels; taking their sorted order as the "
        "class order (%s = %s, ...)",
        root,
        folders[0],
        labels[0],
    )
    return folders


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<image>`` with classes in sorted folder-name order.

    Args:
        root: dataset root.
        transform: applied to each PIL image.
        classes: class order to use (e.g. the training set's) instead of the folders found.
        channels: 1 (grayscale) or 3 (RGB).

    Raises:
        ValueError: no class folder holds an image; or, with the classes taken from the
            folders, one of them holds none (it would become a class without examples).
            With ``classes`` given, empty folders are only logged: those classes are absent.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Any], Any] | None = None,
        classes: Sequence[str] | None = None,
        channels: int = 3,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.classes = list(classes) if classes is not None else found
        if not self.classes:
            raise ValueError(f"{self.root} has no class sub-folders")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [
            (str(f), index[c])
            for c in found
            if c in index
            for f in sorted((self.root / c).rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            names = found or self.classes
            where = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ValueError(
                f"{self.root} has no image files (.jpg, .png, ...) in class folders named {where}"
            )
        counts = Counter(label for _, label in self.samples)
        empty = [c for c in found if c in index and not counts[index[c]]]
        if empty and classes is None:  # a class made of an empty folder could never be learnt
            raise ValueError(
                f"class folder {self.root / empty[0]} has no image files (.jpg, .png, ...)"
                + (f", nor do {len(empty) - 1} more ({', '.join(empty[1:4])})" if empty[1:] else "")
                + ": it would be a class without examples; add images or remove the folder"
            )
        if empty:  # given classes (a model's, a training set's): absent from this data
            log.warning(
                "%s: the class folder(s) %s hold no image files; those classes are absent",
                self.root,
                ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""),
            )
        self.transform, self.channels = transform, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int] | BadSample:
        path, label = self.samples[i]
        try:
            image = _open_image(Path(path), self.channels)
            return (self.transform(image) if self.transform else image), label
        except Exception as e:  # any unreadable file is reported, never fatal
            return BadSample(path, f"{type(e).__name__}: {e}")


def collate_skip_bad(batch: list[Any]) -> tuple[Tensor, Tensor, list[BadSample]]:
    """Stack the good samples; return the bad ones alongside (never raises on bad input)."""
    bad = [b for b in batch if isinstance(b, BadSample)]
    good = [b for b in batch if not isinstance(b, BadSample)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([int(g[1]) for g in good], dtype=torch.long)
    return images, labels, bad


class DeviceBatches:
    """Batches of an in-memory uint8 dataset, augmented and normalised on its device.

    Args:
        images: uint8 (N, C, H, W), ideally already on the training device.
        labels: int64 (N,), same device.
        batch_size: per process.
        mean, std: normalisation per output channel, [0, 1] units.
        train: shuffle with repeated augmentation and augment; else fixed order, no aug.
        crop_padding, hflip, erasing: augmentation strengths (train only).
        repeats: repeated-augmentation count.
        img_size: resize batches to this side when it differs from the data's.
        channels: repeat a 1-channel dataset to this many channels.
        seed, rank, world: sampler seeding and sharding (see :func:`repeated_indices`).
        drop_last: drop the last partial batch (train) so every batch is full and even.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool = False,
        crop_padding: int = 0,
        hflip: float = 0.0,
        erasing: float = 0.0,
        repeats: int = 1,
        img_size: int | None = None,
        channels: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool | None = None,
    ) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.mean = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
        self.train, self.crop_padding, self.hflip, self.erasing = (
            train,
            crop_padding,
            hflip,
            erasing,
        )
        self.repeats, self.img_size, self.channels = repeats, img_size, channels
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        self.drop_last = train if drop_last is None else drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> Tensor:
        n = len(self.labels)
        if not self.train:
            return torch.arange(n)[self.rank :: self.world]
        return repeated_indices(
            n, self.repeats, epoch=self.epoch, seed=self.seed, rank=self.rank, world=self.world
        )

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self._indices().to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = idx[start : start + self.batch_size]
            yield self._prepare(self.images[batch]), self.labels[batch]

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.float().div_(255)
        if self.train:
            x = random_crop_flip(x, self.crop_padding, self.hflip)
        if self.img_size and x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size,) * 2, mode="bilinear", antialias=True)
        if self.channels and self.channels != x.shape[1]:
            x = x.expand(-1, self.channels, -1, -1)
        x = (x - self.mean) / self.std
        if self.train:
            x = random_erasing(x, self.erasing)
        return x


@dataclass
class Data:
    """What ``deit.train.loop`` needs to know about its data.

    Attributes:
        train, val: a :class:`DeviceBatches` or a DataLoader yielding ``(x, y, bad_samples)``.
        labels: class names, in class-index order.
        spec: the student's input (normalisation, size, channels).
        on_device: tensor data kept on the training device.
    """

    train: Any
    val: Any
    labels: list[str]
    spec: InputSpec
    on_device: bool
    crop_pct: float = 0.875  # image folders: the eval resize is img_size / crop_pct

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class _Transformed(torch.utils.data.Dataset):
    """Applies a transform to PIL images of a user dataset; tensors pass through."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, BadSample) or isinstance(item[0], Tensor):
            return item
        try:
            return self.transform(item[0]), item[1]
        except Exception as e:
            return BadSample(f"item {i}", f"{type(e).__name__}: {e}")


def _img_size(cfg: Any, native: int) -> int:
    from deit.config import VARIANTS

    if cfg.model.img_size:
        return cfg.model.img_size
    if cfg.model.name in VARIANTS:
        return VARIANTS[cfg.model.name].image_hw[0]
    return native


def _loader(ds: Any, cfg: Any, train: bool, rank: int, world: int) -> Any:
    bs = cfg.data.batch_size if train else (cfg.data.eval_batch_size or 2 * cfg.data.batch_size)
    if train:
        sampler = RepeatAugSampler(
            len(ds), cfg.augment.repeated_aug, seed=cfg.run.seed, rank=rank, world=world
        )
    else:
        sampler = list(range(rank, len(ds), world))  # type: ignore[assignment]  # any iterable
    return torch.utils.data.DataLoader(
        ds,
        batch_size=bs,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_skip_bad,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.data.num_workers > 0,
    )


def _tensor_data(cfg: Any, device: torch.device, rank: int, world: int) -> Data:
    d, a = cfg.data, cfg.augment
    root = d.path or None
    x, y = load_fashion_mnist("train", root)
    vx, vy = load_fashion_mnist("test", d.val_path or root)
    if d.train_subset:
        x, y = x[: d.train_subset], y[: d.train_subset]
    if d.val_subset:
        vx, vy = vx[: d.val_subset], vy[: d.val_subset]
    chans = d.in_chans or x.shape[1]
    # The data's own statistics where not given (gray ones repeat for replicated channels).
    stats = channel_stats(x) if d.mean is None or d.std is None else ([0.0], [1.0])
    mean, std = normalization(d.mean, d.std, chans, *stats)
    size = _img_size(cfg, x.shape[-1])
    common = {
        "mean": mean,
        "std": std,
        "img_size": size,
        "channels": chans,
        "rank": rank,
        "world": world,
        "seed": cfg.run.seed,
    }
    train = DeviceBatches(
        x.to(device),
        y.to(device),
        d.batch_size,
        train=True,
        crop_padding=a.crop_padding,
        hflip=a.hflip,
        erasing=a.random_erasing,
        repeats=a.repeated_aug,
        **common,
    )
    val = DeviceBatches(
        vx.to(device), vy.to(device), d.eval_batch_size or 2 * d.batch_size, **common
    )
    spec = InputSpec(tuple(mean), tuple(std), size, chans)
    return Data(train, val, list(FASHION_MNIST_CLASSES), spec, on_device=True)


def build_data(
    cfg: Any,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    train_data: Any = None,
    val_data: Any = None,
    labels: Sequence[str] | None = None,
) -> Data:
    """Training and validation batches as the run config says (or for the given datasets).

    Args:
        cfg: a ``deit.train.runconfig.TrainConfig``.
        device: the training device (tensor data is moved there).
        rank, world: this process and the number of processes.
        train_data, val_data, labels: user datasets replacing ``cfg.data`` (both needed).
    """
    if train_data is None and cfg.data.dataset == "fashion-mnist":
        return _tensor_data(cfg, device, rank, world)
    if train_data is None and cfg.data.dataset in ("hf", "webdataset"):
        raise ConfigError(
            f"data.dataset={cfg.data.dataset} is read by deit.train.sources.build_source_data"
        )
    chans = cfg.data.in_chans or 3
    mean, std = normalization(cfg.data.mean, cfg.data.std, chans, *image_defaults(chans))
    size = _img_size(cfg, 224)
    train_tf = image_train_transform(size, cfg.augment, mean, std)
    crop_pct = cfg.data.crop_pct or 0.875
    eval_tf = image_eval_transform(size, mean, std, crop_pct)
    if train_data is None:
        if not cfg.data.path:
            raise ValueError("data.dataset=imagefolder needs data.path (a folder of class folders)")
        if not cfg.data.val_path:
            log.warning(
                "no data.val_path: validating on the training images %s (optimistic accuracy)",
                cfg.data.path,
            )
        train_data = ImageFolder(cfg.data.path, channels=chans)
        classes = train_data.classes
        val_data = ImageFolder(cfg.data.val_path or cfg.data.path, classes=classes, channels=chans)
    else:
        if val_data is None or labels is None:
            raise ValueError("train_data needs val_data and labels too")
        classes = list(labels)
    train_ds, val_ds = _Transformed(train_data, train_tf), _Transformed(val_data, eval_tf)
    for ds, n in ((train_ds, cfg.data.train_subset), (val_ds, cfg.data.val_subset)):
        if n:
            ds.dataset = torch.utils.data.Subset(ds.dataset, range(min(n, len(ds.dataset))))
    spec = InputSpec(tuple(mean), tuple(std), size, chans)
    return Data(
        _loader(train_ds, cfg, True, rank, world),
        _loader(val_ds, cfg, False, rank, world),
        classes,
        spec,
        on_device=False,
        crop_pct=crop_pct,
    )
