"""Hugging Face ``datasets`` as training and evaluation sources (``pip install deit[data]``).

:func:`open_hf` opens a dataset saved with ``save_to_disk`` (a ``DatasetDict`` or ``Dataset``
folder), Parquet/Arrow files (paths or globs), a folder of class folders (the ``imagefolder``
builder) or a Hub name (through the local cache; ``revision``; offline with
``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``). The image and label columns are found from
the features (``datasets.Image``, ``datasets.ClassLabel`` with its names), or named.
:class:`HFImages` reads a map-style split as ``(PIL image, int label)`` pairs; streamed splits
are :class:`deit.train.streams.HFStream`.

Also the sample helpers every source shares: :func:`decode_sample` and :func:`check_label`.
"""

from __future__ import annotations

import glob
import logging
import numbers
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from deit.errors import ConfigError
from deit.runtime import require
from deit.train.data import BadSample
from deit.train.shards import check_disk_dataset, check_parquet

log = logging.getLogger("deit.train.hf_data")

TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


def decode_sample(raw: Any, channels: int) -> Any:
    """PIL image (mode L/RGB) from bytes, a path, a ``datasets.Image`` dict or a PIL image."""
    from deit.images import load_image
    from deit.transforms import to_mode

    if isinstance(raw, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        raw = raw.get("bytes") or raw.get("path")
    if raw is None:
        raise ValueError("no image data")
    return to_mode(load_image(raw), channels)


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


# --------------------------------------------------------------------------- opening


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def load_hf(
    path: str, *, streaming: bool = False, revision: str | None = None, val_path: str = ""
) -> Any:
    """A ``DatasetDict``/``IterableDatasetDict`` (or a single dataset) for ``path``."""
    datasets = require("datasets", "datasets", "data")
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
        if suffix in TABLE_SUFFIXES:
            files: dict[str, Any] = {"train": _expand(path)}
            if val_path:
                files["validation"] = _expand(val_path)
            if suffix == ".parquet":
                for f in (f for group in files.values() for f in group):
                    check_parquet(f)
            return datasets.load_dataset(
                TABLE_SUFFIXES[suffix], data_files=files, streaming=streaming
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
        if p.exists() or suffix in TABLE_SUFFIXES:  # a local file that datasets can't read
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


def find_columns(ds: Any, image_column: str = "", label_column: str = "") -> tuple[str, str]:
    """The image and label column names (given, else found from the features)."""
    datasets = require("datasets", "datasets", "data")
    features = ds.features or {}
    image_column = image_column or _column(
        features, datasets.Image, ("image", "img", "jpg", "png"), "image_column"
    )
    label_column = label_column or _column(
        features, datasets.ClassLabel, ("label", "labels", "cls", "class"), "label_column"
    )
    for name, what in ((image_column, "image_column"), (label_column, "label_column")):
        if name not in features:
            raise ConfigError(f"data.{what} {name!r} is not a column ({list(features)})")
    return image_column, label_column


def _column(features: Any, kind: type, names: Sequence[str], key: str) -> str:
    """The first column whose feature is a ``kind``, else the first of the usual ``names``."""
    found = [k for k, f in features.items() if isinstance(f, kind)]
    found = found or [k for k in names if k in features]
    if not found:
        raise ConfigError(
            f"no {key.split('_')[0]} column (a datasets.{kind.__name__} feature) among "
            f"{list(features)}: set data.{key}"
        )
    return found[0]


def class_names(ds: Any, label_column: str, labels: Sequence[str] | None) -> list[str]:
    datasets = require("datasets", "datasets", "data")
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


def pick_split(dd: Any, name: str, fallbacks: Sequence[str] = ()) -> tuple[Any, str] | None:
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
        datasets = require("datasets", "datasets", "data")
        self.image_column, self.label_column = find_columns(ds, image_column, label_column)
        self.classes = class_names(ds, self.label_column, labels)
        if isinstance(ds.features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.ds, self.channels, self.transform, self.name = ds, channels, transform, name

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Any, int] | BadSample:
        try:
            row = self.ds[int(i)]
            label = check_label(row[self.label_column], len(self.classes))
            image = decode_sample(row[self.image_column], self.channels)
            return (self.transform(image) if self.transform else image), label
        except Exception as e:  # an unreadable row is reported, never fatal
            return BadSample(f"{self.name}[{i}]", f"{type(e).__name__}: {e}")


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
    dd = load_hf(path, streaming=streaming, revision=revision, val_path=val_path)
    picked = pick_split(dd, split)
    if picked is None:
        raise ConfigError(f"{path} has no split {split!r} (splits: {list(dd.keys())})")
    val_name = val_split or ""
    if val_path and Path(val_path).suffix.lower() not in TABLE_SUFFIXES:
        vd = load_hf(val_path, streaming=streaming, revision=revision)
        vpicked = pick_split(vd, val_split or "validation", ("valid", "val", "test", "train"))
    else:
        fallbacks = () if val_split else ("valid", "val", "test")
        vpicked = pick_split(dd, val_split or "validation", fallbacks)
        if vpicked is not None and vpicked[1] == picked[1]:
            vpicked = None
    if val_split and vpicked is None:
        raise ConfigError(f"{path} has no split {val_split!r}")
    if vpicked is not None:
        val_name = vpicked[1]
    return picked[0], (vpicked[0] if vpicked else None), val_name
