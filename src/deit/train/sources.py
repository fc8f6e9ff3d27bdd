"""Dataset sources beyond Fashion-MNIST and image folders, chosen from a config: Hugging Face
``datasets`` (:mod:`deit.train.hf_data`) and WebDataset shards or streamed datasets
(:mod:`deit.train.streams`), read with those libraries (``pip install deit[data]``).

* :func:`build_source_data`: the training loop's :class:`~deit.train.data.Data` for
  ``data.dataset`` = ``hf`` or ``webdataset``;
* :func:`eval_dataset`: ``hf:PATH[:split]`` or ``webdataset:PATTERN`` for ``deit eval``, its
  classes matched to a model's labels by name;
* :func:`deit.train.packing.pack` writes shards (``deit data pack``).

Every reader yields ``(PIL image, int label)`` (or a transformed image) and turns an unreadable
sample into a :class:`~deit.train.data.BadSample`, which the training loop counts and reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from deit.errors import ConfigError, UsageError
from deit.labels import label_map
from deit.train.data import (
    BadSample,
    Data,
    InputSpec,
    _img_size,
    build_data,
    collate_skip_bad,
    image_defaults,
    normalization,
)
from deit.train.hf_data import HFImages, load_hf, open_hf, pick_split
from deit.train.streams import EpochLoader, HFStream, WebDatasetShards, _EpochStream

log = logging.getLogger("deit.train.sources")


def _split_spec(spec: str) -> tuple[str, str]:
    """``PATH[:split]`` → (path, split or "")."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and not Path(spec).exists():
        return head, tail
    return spec, ""


def source_datasets(cfg: Any, rank: int = 0, world: int = 1) -> tuple[Any, Any, list[str]]:
    """(train, val, class names) of ``cfg.data`` for ``dataset`` = ``hf`` (map-style) or
    ``webdataset`` / ``hf`` with ``streaming`` (iterable, see :func:`build_stream_data`)."""
    d = cfg.data
    chans = d.in_chans or 3
    if not d.path:
        raise ConfigError(f"data.dataset={d.dataset} needs data.path")
    if d.dataset == "webdataset":
        common = {"rank": rank, "world": world, "channels": chans, "seed": cfg.run.seed}
        train = WebDatasetShards(
            d.path,
            d.epoch_samples,
            shuffle_buffer=d.shuffle_buffer,
            batch_size=d.batch_size,
            **common,
        )
        train.check_workers(d.num_workers)
        if not d.val_path:
            log.warning("no data.val_path: validating on the training shards %s", d.path)
        val = WebDatasetShards(
            d.val_path or d.path, labels=train.classes, train=False, shuffle_buffer=0, **common
        )
        if len(val.shards) < world:
            raise ConfigError(f"{len(val.shards)} validation shards for {world} ranks")
        return train, val, train.classes
    tr, va, va_name = open_hf(
        d.path,
        d.split or "train",
        val_split=d.val_split,
        val_path=d.val_path,
        streaming=d.streaming,
        revision=d.revision or None,
    )
    if va is None:
        log.warning("%s has no validation split: validating on %s (optimistic)", d.path, d.split)
        va = tr
    cols = {"image_column": d.image_column, "label_column": d.label_column, "channels": chans}
    if d.streaming:
        common = {"rank": rank, "world": world, "seed": cfg.run.seed, **cols}
        strain = HFStream(
            tr, d.epoch_samples, shuffle_buffer=d.shuffle_buffer, batch_size=d.batch_size, **common
        )
        strain.check_workers(d.num_workers)
        sval = HFStream(va, d.epoch_samples, labels=strain.classes, train=False, **common)
        return strain, sval, strain.classes
    htrain = HFImages(tr, name=f"{d.path}:{d.split or 'train'}", **cols)
    hval = HFImages(va, labels=htrain.classes, name=f"{d.path}:{va_name or 'train'}", **cols)
    if hval.classes != htrain.classes:
        raise ConfigError(f"{d.path}: the validation split's classes differ from the training's")
    return htrain, hval, htrain.classes


def build_stream_data(cfg: Any, train: Any, val: Any, labels: list[str]) -> Any:
    """``deit.train.data.Data`` for streamed sources: transforms as for image folders."""
    from deit.train.augment import image_eval_transform, image_train_transform

    d = cfg.data
    chans = d.in_chans or 3
    mean, std = normalization(d.mean, d.std, chans, *image_defaults(chans))
    size = _img_size(cfg, 224)
    crop_pct = d.crop_pct or 0.875
    train.transform = image_train_transform(size, cfg.augment, mean, std)
    val.transform = image_eval_transform(size, mean, std, crop_pct)
    pin = torch.cuda.is_available()

    def loader(ds: Any, bs: int, drop_last: bool) -> EpochLoader:
        # Workers are not persistent: each epoch's workers get the dataset with its new epoch.
        return EpochLoader(
            ds,
            batch_size=bs,
            num_workers=d.num_workers,
            collate_fn=collate_skip_bad,
            drop_last=drop_last,
            pin_memory=pin,
        )

    return Data(
        loader(train, d.batch_size, True),
        loader(val, d.eval_batch_size or 2 * d.batch_size, False),
        list(labels),
        InputSpec(tuple(mean), tuple(std), size, chans),
        on_device=False,
        crop_pct=crop_pct,
    )


def build_source_data(cfg: Any, device: torch.device, rank: int, world: int) -> Any:
    """What ``deit.train.data.build_data`` returns, for ``hf`` and ``webdataset`` sources."""
    train, val, labels = source_datasets(cfg, rank, world)
    if isinstance(train, _EpochStream):
        return build_stream_data(cfg, train, val, labels)
    return build_data(cfg, device, rank, world, train, val, labels)


def eval_dataset(
    spec: str, transform: Callable[[Any], Any], labels: Sequence[str], channels: int = 3
) -> tuple[Any, str]:
    """``hf:PATH[:split]`` or ``webdataset:PATTERN`` as an eval Dataset with ``labels``'
    class indices (the source's class names are matched to them by name)."""
    kind, _, rest = spec.partition(":")
    if kind == "webdataset":
        ds: Any = WebDatasetShards(
            rest, labels=labels, train=False, shuffle_buffer=0, channels=channels
        )
        ds.transform = transform
    elif kind == "hf":
        path, split = _split_spec(rest)
        picked = pick_split(load_hf(path), split or "test")
        if picked is None:
            raise UsageError(f"{path} has no split {split or 'test'!r}")
        tr = picked[0]
        ds = HFImages(tr, labels=labels, channels=channels, transform=transform, name=spec)
    else:
        raise UsageError(f"unknown data source {kind!r} (hf:PATH[:split] or webdataset:PATTERN)")
    if list(ds.classes) != list(labels):
        matched = label_map(ds.classes, labels)
        missing = [n for i, n in enumerate(ds.classes) if i not in matched]
        if missing:
            raise UsageError(f"{spec}: class {missing[0]!r} is not one of the model's labels")
        ds = _Relabel(ds, [matched[i] for i in range(len(ds.classes))])
    return ds, spec


class _Relabel(torch.utils.data.IterableDataset):
    """Maps a source's class indices to a model's (map-style sources are iterated in order;
    every ``Dataset`` has a ``__getitem__``, so the kind is told by the class)."""

    def __init__(self, ds: Any, mapping: list[int]) -> None:
        self.ds, self.mapping = ds, mapping

    def __iter__(self) -> Iterator[Any]:
        iterable = isinstance(self.ds, torch.utils.data.IterableDataset)
        for item in self.ds if iterable else _each(self.ds):
            yield item if isinstance(item, BadSample) else (item[0], self.mapping[item[1]])


def _each(ds: Any) -> Iterator[Any]:
    for i in range(len(ds)):
        yield ds[i]
