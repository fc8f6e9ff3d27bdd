"""Dataset sources beyond Fashion-MNIST and image folders: Hugging Face ``datasets`` and
WebDataset tar shards, read with those libraries (``pip install deit[data]``).

* :func:`open_hf` / :class:`HFImages`: a dataset saved with ``save_to_disk`` (a
  ``DatasetDict`` or ``Dataset`` folder), Parquet/Arrow files (paths or globs), a folder of
  class folders (the ``imagefolder`` builder) or a Hub name (through the local cache;
  ``revision``; offline with ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``). The image and
  label columns are found from the features (``datasets.Image``, ``datasets.ClassLabel`` with
  its names), or named. ``streaming=True`` gives an :class:`HFStream` (larger than the disk).
* :class:`WebDatasetShards`: ``train-{000000..000009}.tar`` (brace patterns or a list),
  samples ``jpg``/``png``/``webp`` + ``cls`` (or ``json`` with a ``label``). Shards are dealt
  to ranks (rank ``r`` of ``w`` reads the shards at positions ``i % w == r`` of the epoch's
  shard order), then to DataLoader workers the same way, so no sample is read twice or skipped;
  samples are shuffled in a buffer. An epoch is a sample count, and :meth:`set_epoch` reseeds
  everything, so a resumed run sees exactly what an uninterrupted one would.
* :func:`pack`: writes shards (``webdataset.ShardWriter``) and ``classes.json`` from an image
  folder or a ``datasets`` dataset (``deit data pack``).

Every reader yields ``(PIL image, int label)`` (or a transformed image) and turns an unreadable
sample into a :class:`~deit.train.data.BadSample`, which the training loop counts and reports.
"""

from __future__ import annotations

import abc
import glob
import json
import logging
import math
import numbers
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from itertools import count
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
from deit.train.shards import check_disk_dataset, check_parquet, iter_shard

log = logging.getLogger("deit.train.sources")

CLASSES_FILE = "classes.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
_SAMPLE_KEYS = frozenset((*IMAGE_KEYS, "cls", "json"))  # the members a sample reads
_TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed: pip install 'deit[data]'") from e


def _decode(raw: Any, channels: int) -> Any:
    """PIL image (mode L/RGB) from bytes, a path, a ``datasets.Image`` dict or a PIL image."""
    from deit.images import load_image
    from deit.transforms import to_mode

    if isinstance(raw, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        raw = raw.get("bytes") or raw.get("path")
    if raw is None:
        raise ValueError("no image data")
    return to_mode(load_image(raw), channels)


# --------------------------------------------------------------------------- Hugging Face


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _load_hf(
    path: str, *, streaming: bool = False, revision: str | None = None, val_path: str = ""
) -> Any:
    """A ``DatasetDict``/``IterableDatasetDict`` (or a single dataset) for ``path``."""
    datasets = _need("datasets")
    p = Path(path)
    suffix = Path(path.split(",")[0]).suffix.lower()
    try:
        if p.is_dir() and any((p / f).is_file() for f in ("dataset_dict.json", "state.json")):
            check_disk_dataset(p)
            ds = datasets.load_from_disk(str(p))
            if streaming:
                if isinstance(ds, datasets.DatasetDict):
                    return datasets.IterableDatasetDict(
                        {
                            k: v.to_iterable_dataset(num_shards=_disk_shards(v))
                            for k, v in ds.items()
                        }
                    )
                return ds.to_iterable_dataset(num_shards=_disk_shards(ds))
            return ds
        if suffix in _TABLE_SUFFIXES:
            files: dict[str, Any] = {"train": _expand(path)}
            if val_path:
                files["validation"] = _expand(val_path)
            if suffix == ".parquet":
                for f in (f for group in files.values() for f in group):
                    check_parquet(f)
            return datasets.load_dataset(
                _TABLE_SUFFIXES[suffix], data_files=files, streaming=streaming
            )
        if p.is_dir():  # a folder of class folders (or of Parquet files, train/ + test/ ...)
            return datasets.load_dataset("imagefolder", data_dir=str(p), streaming=streaming)
        if p.exists() or "*" in path or path.startswith(("/", ".", "~")):
            if not p.exists() and "*" not in path:
                raise ConfigError(f"{path} does not exist")
            raise ConfigError(f"{path}: not a dataset folder, Parquet/Arrow file or glob")
        return datasets.load_dataset(path, revision=revision or None, streaming=streaming)
    except ConfigError:
        raise
    except FileNotFoundError as e:
        if _offline() and not p.exists():
            raise ConfigError(_offline_message(path)) from e
        raise ConfigError(f"{path}: {e}") from e
    except Exception as e:
        if _offline() and not p.exists():
            raise ConfigError(_offline_message(path)) from e
        if p.exists() or suffix in _TABLE_SUFFIXES:  # a local file that datasets can't read
            why = " ".join(str(e).split())[:300]  # datasets' messages span lines
            raise ConfigError(f"{path}: unreadable dataset ({type(e).__name__}: {why})") from e
        raise


def _offline_message(name: str) -> str:
    return (
        f"Hugging Face dataset {name!r} is not in the local cache and offline mode is on "
        "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): download it once online, or give a local path"
    )


def _expand(pattern: str) -> list[str]:
    out: list[str] = []
    for part in pattern.split(","):
        found = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not found or not all(Path(f).is_file() for f in found):
            raise ConfigError(f"no data file matches {part!r}")
        out += found
    return out


def _disk_shards(ds: Any) -> int:
    return max(1, min(len(ds), 64))


def _features(ds: Any, image_column: str = "", label_column: str = "") -> tuple[str, str]:
    """The image and label column names (given, else found from the features)."""
    datasets = _need("datasets")
    features = ds.features or {}
    if not image_column:
        found = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        if not found:
            found = [k for k in ("image", "img", "jpg", "png") if k in features]
        if not found:
            raise ConfigError(
                f"no image column (a datasets.Image feature) among {list(features)}: "
                "set data.image_column"
            )
        image_column = found[0]
    if not label_column:
        found = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if not found:
            found = [k for k in ("label", "labels", "cls", "class") if k in features]
        if not found:
            raise ConfigError(
                f"no label column (a datasets.ClassLabel feature) among {list(features)}: "
                "set data.label_column"
            )
        label_column = found[0]
    for name, what in ((image_column, "image_column"), (label_column, "label_column")):
        if name not in features:
            raise ConfigError(f"data.{what} {name!r} is not a column ({list(features)})")
    return image_column, label_column


def _class_names(ds: Any, label_column: str, labels: Sequence[str] | None) -> list[str]:
    datasets = _need("datasets")
    feature = (ds.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if labels:
        return list(labels)
    if hasattr(ds, "__len__"):  # map-style: the labels are 0..max
        n = int(max(ds[label_column])) + 1
        log.warning("%s is not a ClassLabel: naming the %d classes 0..%d", label_column, n, n - 1)
        return [str(i) for i in range(n)]
    raise ConfigError(f"{label_column} is not a ClassLabel and no class names were given")


def _pick_split(dd: Any, name: str, fallbacks: Sequence[str] = ()) -> tuple[Any, str] | None:
    if not hasattr(dd, "keys"):  # a single Dataset: it is the "train" split
        return (dd, "train") if name == "train" or "train" in fallbacks else None
    for n in (name, *fallbacks):
        if n in dd:
            return dd[n], n
    return None


class HFImages(torch.utils.data.Dataset):
    """A map-style ``datasets.Dataset`` as ``(PIL image, int label)`` pairs.

    The image column is read undecoded and opened with ``deit.images`` (EXIF, decompression
    bombs) and ``deit.transforms`` (odd modes); an unreadable row is a :class:`BadSample`.
    """

    def __init__(
        self,
        ds: Any,
        *,
        image_column: str = "",
        label_column: str = "",
        labels: Sequence[str] | None = None,
        channels: int = 3,
        transform: Callable[[Any], Any] | None = None,
        name: str = "hf",
    ) -> None:
        datasets = _need("datasets")
        self.image_column, self.label_column = _features(ds, image_column, label_column)
        self.classes = _class_names(ds, self.label_column, labels)
        if isinstance(ds.features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds, self.channels, self.transform, self.name = ds, channels, transform, name

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Any, int] | BadSample:
        try:
            row = self.ds[int(i)]
            label = check_label(row[self.label_column], len(self.classes))
            image = _decode(row[self.image_column], self.channels)
            return (self.transform(image) if self.transform else image), label
        except Exception as e:  # an unreadable row is reported, never fatal
            return BadSample(f"{self.name}[{i}]", f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------- streaming


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
    wds = _need("webdataset")
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


def check_label(value: Any, num_classes: int) -> int:
    """``value`` as a class index in ``[0, num_classes)``: an integer (not a bool, not a float
    such as 3.9, which would be truncated) or the decimal text of one.

    Raises:
        ValueError: anything else (the readers make that sample a :class:`BadSample`).
    """
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"label {value!r} is not an integer class index")
    if not 0 <= int(value) < num_classes:
        raise ValueError(f"label {int(value)} is out of range for {num_classes} classes")
    return int(value)


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
        wds = _need("webdataset")
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
                yield _decode(bytes(raw), self.channels), label
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
        datasets = _need("datasets")
        from datasets.distributed import split_dataset_by_node

        if not epoch_samples:
            raise ConfigError("streaming datasets need data.epoch_samples (samples per epoch)")
        super().__init__(epoch_samples, **kw)
        self.image_column, self.label_column = _features(ds, image_column, label_column)
        self.classes = _class_names(ds, self.label_column, labels)
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
            wds = _need("webdataset")
            rng = random.Random(f"{self.seed}/{self.epoch}/{epoch_pass}/{self.rank}/{worker}")
            rows = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(rows)
        for i, row in enumerate(rows):
            try:
                label = check_label(row[self.label_column], len(self.classes))
                yield _decode(row[self.image_column], self.channels), label
            except Exception as e:
                yield BadSample(f"stream[{i}]", f"{type(e).__name__}: {e}")


class EpochLoader(torch.utils.data.DataLoader):
    """A DataLoader over an :class:`_EpochStream` with ``set_epoch`` (the loop calls it)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- from a config


def _split_spec(spec: str) -> tuple[str, str]:
    """``PATH[:split]`` → (path, split or "")."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and not Path(spec).exists():
        return head, tail
    return spec, ""


def open_hf(
    path: str,
    split: str = "train",
    *,
    val_split: str = "",
    val_path: str = "",
    streaming: bool = False,
    revision: str | None = None,
) -> tuple[Any, Any, str]:
    """(train split, validation split or None, validation split name) of a ``datasets`` source.

    The validation split is ``val_split`` if given, else ``validation``, ``valid``, ``val`` or
    ``test``, whichever exists first; ``val_path`` names a separate source for it.
    """
    dd = _load_hf(path, streaming=streaming, revision=revision, val_path=val_path)
    picked = _pick_split(dd, split)
    if picked is None:
        raise ConfigError(f"{path} has no split {split!r} (splits: {list(dd.keys())})")
    val_name = val_split or ""
    if val_path and Path(val_path).suffix.lower() not in _TABLE_SUFFIXES:
        vd = _load_hf(val_path, streaming=streaming, revision=revision)
        vpicked = _pick_split(vd, val_split or "validation", ("valid", "val", "test", "train"))
    else:
        fallbacks = () if val_split else ("valid", "val", "test")
        vpicked = _pick_split(dd, val_split or "validation", fallbacks)
        if vpicked is not None and vpicked[1] == picked[1]:
            vpicked = None
    if val_split and vpicked is None:
        raise ConfigError(f"{path} has no split {val_split!r}")
    if vpicked is not None:
        val_name = vpicked[1]
    return picked[0], (vpicked[0] if vpicked else None), val_name


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
        picked = _pick_split(_load_hf(path), split or "test")
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
