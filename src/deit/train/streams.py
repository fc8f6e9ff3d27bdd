"""Streamed sources: WebDataset tar shards and streamed Hugging Face datasets
(``pip install deit[data]``).

* :class:`WebDatasetShards`: ``train-{000000..000009}.tar`` (brace patterns or a list),
  samples ``jpg``/``png``/``webp`` + ``cls`` (or ``json`` with a ``label``). Shards are dealt
  to ranks (rank ``r`` of ``w`` reads the shards at positions ``i % w == r`` of the epoch's
  shard order), then to DataLoader workers the same way, so no sample is read twice or skipped;
  samples are shuffled in a buffer.
* :class:`HFStream`: a ``datasets.IterableDataset`` split by rank, shuffled the same way.

An epoch is a sample count (:class:`_EpochStream`), and ``set_epoch`` reseeds everything, so
a resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import abc
import glob
import json
import logging
import math
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from itertools import count
from pathlib import Path
from typing import Any

import torch

from deit.errors import ConfigError
from deit.runtime import require
from deit.train.data import BadSample
from deit.train.hf_data import check_label, class_names, decode_sample, find_columns
from deit.train.shards import iter_shard

log = logging.getLogger("deit.train.streams")

CLASSES_FILE = "classes.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
_SAMPLE_KEYS = frozenset((*IMAGE_KEYS, "cls", "json"))  # the members a sample reads


class _EpochStream(torch.utils.data.IterableDataset, abc.ABC):
    """Base of the streamed sources: an epoch is ``epoch_samples`` samples over all ranks.

    Each rank yields ``epoch_samples // world`` samples (rounded down to whole batches when
    ``batch_size`` is set, so that every rank takes the same number of steps), shared among
    the DataLoader workers. Subclasses give :meth:`_stream`, the samples of one worker for one
    pass over the data; passes repeat (reshuffled) until the worker's quota is met.
    """

    classes: list[str]

    def __init__(
        self,
        epoch_samples: int,
        *,
        rank: int = 0,
        world: int = 1,
        batch_size: int = 0,
        transform: Callable[[Any], Any] | None = None,
        channels: int = 3,
        seed: int = 0,
        train: bool = True,
    ) -> None:
        self.epoch_samples, self.rank, self.world = epoch_samples, rank, world
        self.batch_size, self.transform, self.channels = batch_size, transform, channels
        self.seed, self.train, self.epoch = seed, train, 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shard and sample shuffles for ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def _per_rank(self) -> int:
        n = self.epoch_samples // self.world
        return n - n % self.batch_size if self.batch_size else n

    def quota(self, worker: int, workers: int) -> int:
        """How many samples DataLoader worker ``worker`` of ``workers`` yields per epoch."""
        unit = self.batch_size or 1
        units = self._per_rank() // unit
        return (units // workers + (worker < units % workers)) * unit

    def __len__(self) -> int:
        return self._per_rank()

    @abc.abstractmethod
    def _stream(self, epoch_pass: int, worker: int, workers: int) -> Iterator[Any]:
        """One worker's samples for one pass over the data (``epoch_pass`` seeds the order)."""

    def samples(self, worker: int = 0, workers: int = 1) -> Iterator[Any]:
        """This rank's samples for worker ``worker`` of ``workers`` in the current epoch."""
        left = self.quota(worker, workers) if self.train else math.inf
        for p in count():
            got = 0
            for item in self._stream(p, worker, workers):
                if left <= 0:
                    return
                got += 1
                left -= 1
                yield self._finish(item)
            if left <= 0 or not self.train or not got:
                if self.train and left > 0:
                    raise RuntimeError(
                        f"rank {self.rank} worker {worker} got no samples: fewer shards than "
                        "ranks x workers (repack with smaller shards or use fewer workers)"
                    )
                return

    def _finish(self, item: Any) -> Any:
        if isinstance(item, BadSample) or self.transform is None:
            return item
        image, label = item
        try:
            return self.transform(image), label
        except Exception as e:
            return BadSample("sample", f"{type(e).__name__}: {e}")

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.samples(worker, workers)


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns (``train-{000000..000009}.tar``), globs or a list."""
    wds = require("webdataset", "webdataset", "data")
    out: list[str] = []
    for u in [urls] if isinstance(urls, str) else urls:
        for part in wds.shardlists.expand_urls(str(u)):
            matched = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
            out += matched
    if not out:
        raise ConfigError(f"no WebDataset shards match {urls!r}")
    return out


def read_classes(shards: Sequence[str], labels: Sequence[str] | None = None) -> list[str]:
    """Class names: ``classes.json`` beside the first shard, else ``labels``."""
    f = Path(shards[0]).parent / CLASSES_FILE
    if f.is_file():
        meta = json.loads(f.read_text())
        return list(meta["classes"] if isinstance(meta, dict) else meta)
    if labels:
        return list(labels)
    raise ConfigError(f"no {f} beside the shards and no class names given (data labels)")


def count_samples(shards: Sequence[str]) -> int:
    """Samples in local shards: ``classes.json``'s count when it has one, else the tar listing."""
    f = Path(shards[0]).parent / CLASSES_FILE
    if f.is_file():
        meta = json.loads(f.read_text())
        if isinstance(meta, dict) and meta.get("shards"):
            sizes = meta["shards"]
            if all(Path(s).name in sizes for s in shards):
                return sum(int(sizes[Path(s).name]) for s in shards)
    total = 0
    for s in shards:
        if not Path(s).is_file():
            raise ConfigError(f"{s}: not a local file; set data.epoch_samples for remote shards")
        with tarfile.open(s) as tar:
            total += len({Path(m.name).name.split(".")[0] for m in tar if m.isfile()})
    return total


def _label_of(sample: dict[str, Any], num_classes: int) -> int:
    if "cls" in sample:
        return check_label(bytes(sample["cls"]).decode("utf-8"), num_classes)
    if "json" in sample:
        meta = json.loads(bytes(sample["json"]))
        return check_label(meta["label"] if isinstance(meta, dict) else meta, num_classes)
    raise ValueError("no cls or json label")


class WebDatasetShards(_EpochStream):
    """Image/label samples streamed from WebDataset tar shards (see the module docstring).

    Args:
        urls: shard pattern(s) or list.
        epoch_samples: samples in one epoch over all ranks (0: all samples in the shards).
        shuffle_buffer: sample-shuffle buffer per worker (0 or ``train=False``: no shuffle).
        labels: class names when there is no ``classes.json`` beside the shards.
        rank, world, batch_size, transform, channels, seed, train: see :class:`_EpochStream`.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        epoch_samples: int = 0,
        *,
        shuffle_buffer: int = 1000,
        labels: Sequence[str] | None = None,
        **kw: Any,
    ) -> None:
        self.shards = expand_shards(urls)
        self.classes = read_classes(self.shards, labels)
        super().__init__(epoch_samples or count_samples(self.shards), **kw)
        self.shuffle_buffer = shuffle_buffer

    def check_workers(self, workers: int) -> None:
        """Raise unless every (rank, worker) gets at least one shard."""
        need = self.world * max(workers, 1)
        if len(self.shards) < need:
            raise ConfigError(
                f"{len(self.shards)} WebDataset shards for {self.world} ranks x "
                f"{max(workers, 1)} workers: each reader needs its own shards, so use "
                f"at least {need} shards (deit data pack --shard-size) or fewer workers"
            )
        if len(self.shards) % need:
            log.warning(
                "%d shards do not divide among %d readers: readers get unequal shares and an "
                "epoch reads some samples twice and some not at all",
                len(self.shards),
                need,
            )

    def shard_order(self, epoch_pass: int = 0) -> list[str]:
        """All shards in this epoch's (and pass's) order, the same on every rank."""
        order = list(self.shards)
        if self.train:
            random.Random(f"{self.seed}/{self.epoch}/{epoch_pass}").shuffle(order)
        return order

    def _stream(self, epoch_pass: int, worker: int, workers: int) -> Iterator[Any]:
        wds = require("webdataset", "webdataset", "data")
        mine = self.shard_order(epoch_pass)[self.rank :: self.world][worker::workers]
        samples: Iterator[Any] = (s for u in mine for s in iter_shard(u, _SAMPLE_KEYS))
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{epoch_pass}/{self.rank}/{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
                samples
            )
        for s in samples:
            if isinstance(s, BadSample):  # refused by the shard reader
                yield s
                continue
            key = f"{Path(str(s.get('__url__', ''))).name}:{s.get('__key__')}"
            try:
                raw = next((s[k] for k in IMAGE_KEYS if k in s), None)
                if raw is None:
                    raise ValueError(f"no image ({', '.join(IMAGE_KEYS)}) in the sample")
                label = _label_of(s, len(self.classes))
                yield decode_sample(bytes(raw), self.channels), label
            except Exception as e:
                yield BadSample(key, f"{type(e).__name__}: {e}")


class HFStream(_EpochStream):
    """A streamed ``datasets.IterableDataset`` split by rank (``split_dataset_by_node``),
    shuffled in a buffer reseeded by :meth:`set_epoch` (files are read in their order); the
    DataLoader workers share its shards (``datasets`` does that itself inside a worker)."""

    def __init__(
        self,
        ds: Any,
        epoch_samples: int,
        *,
        image_column: str = "",
        label_column: str = "",
        labels: Sequence[str] | None = None,
        shuffle_buffer: int = 1000,
        **kw: Any,
    ) -> None:
        datasets = require("datasets", "datasets", "data")
        from datasets.distributed import split_dataset_by_node

        if not epoch_samples:
            raise ConfigError("streaming datasets need data.epoch_samples (samples per epoch)")
        super().__init__(epoch_samples, **kw)
        self.image_column, self.label_column = find_columns(ds, image_column, label_column)
        self.classes = class_names(ds, self.label_column, labels)
        if isinstance(ds.features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        # The sample shuffle is webdataset's buffer (seeded per epoch, rank and worker), not
        # ``IterableDataset.shuffle``: that one reads ~400 rows/s against ~57,000 (datasets 5.2).
        self.ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        self.shuffle_buffer = shuffle_buffer

    def check_workers(self, workers: int) -> None:
        shards = int(getattr(self.ds, "num_shards", 1))
        if shards < max(workers, 1):
            raise ConfigError(
                f"the streamed dataset has {shards} shard(s) per rank for {workers} workers: "
                "use fewer data.num_workers or more data files"
            )

    def _stream(self, epoch_pass: int, worker: int, workers: int) -> Iterator[Any]:
        rows: Iterator[Any] = iter(self.ds)
        if self.train and self.shuffle_buffer > 1:
            wds = require("webdataset", "webdataset", "data")
            rng = random.Random(f"{self.seed}/{self.epoch}/{epoch_pass}/{self.rank}/{worker}")
            rows = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(rows)
        for i, row in enumerate(rows):
            try:
                label = check_label(row[self.label_column], len(self.classes))
                yield decode_sample(row[self.image_column], self.channels), label
            except Exception as e:
                yield BadSample(f"stream[{i}]", f"{type(e).__name__}: {e}")


class EpochLoader(torch.utils.data.DataLoader):
    """A DataLoader over an :class:`_EpochStream` with ``set_epoch`` (the loop calls it)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
