"""``deit data pack``: WebDataset shards (``png`` + ``cls``) and ``classes.json`` from an image
folder or a Hugging Face ``datasets`` source.

A split is written whole or not at all. Its shards and the new ``classes.json`` go into a
fresh hidden sibling of the output folder, along with links to the folder's other files (the
other splits' shards); when everything is written, that folder takes the output folder's
place. So packing a split again replaces its shards instead of adding to them, other splits
stay, ``classes.json`` lists exactly the shards that are there, and a pack that fails or is
killed leaves the output folder as it was (a killed one also leaves its hidden
``.NAME.*.tmp`` sibling, which can be deleted).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deit.errors import ConfigError, UsageError
from deit.runtime import require
from deit.train.data import BadSample, ImageFolder
from deit.train.hf_data import HFImages, load_hf, pick_split
from deit.train.streams import CLASSES_FILE

log = logging.getLogger("deit.train.packing")


def _pack_items(source: Any, split: str, channels: int | None) -> tuple[Iterator[Any], list[str]]:
    """(iterator of (PIL image or BadSample, label), classes) of a folder or datasets source."""
    if (
        isinstance(source, str | Path)
        and Path(source).is_dir()
        and not any((Path(source) / f).is_file() for f in ("dataset_dict.json", "state.json"))
    ):
        folder = ImageFolder(source, channels=channels or 3)
        if channels is None:  # keep each image's own mode (gray stays gray)
            from deit.images import load_image

            def items() -> Iterator[Any]:
                for path, label in folder.samples:
                    try:
                        yield load_image(path), label
                    except Exception as e:
                        yield BadSample(path, f"{type(e).__name__}: {e}"), label

            return items(), folder.classes
        return ((folder[i], folder.samples[i][1]) for i in range(len(folder))), folder.classes
    if isinstance(source, str | Path):
        picked = pick_split(load_hf(str(source)), split)
        if picked is None:
            raise ConfigError(f"{source} has no split {split!r}")
        source = picked[0]
    ds = HFImages(source, channels=channels or 3)
    return ((ds[i], ds.ds[i][ds.label_column]) for i in range(len(ds))), ds.classes


def _check_split(split: str) -> None:
    if not split or split in (".", "..") or split.startswith(".") or re.search(r"[/\\\0]", split):
        raise UsageError(f"split name {split!r} must be a plain file name part (e.g. train)")


def _old_meta(out: Path) -> dict[str, Any]:
    f = out / CLASSES_FILE
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UsageError(f"{f}: unreadable ({e}); pack into a new folder") from e
    return meta if isinstance(meta, dict) else {"classes": meta}


def _keep_others(out: Path, tmp: Path, mine: re.Pattern[str]) -> None:
    """Link every file of ``out`` but this split's shards and ``classes.json`` into ``tmp``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    for entry in out.iterdir():
        if entry.name == CLASSES_FILE or mine.fullmatch(entry.name):
            continue
        if entry.is_symlink() or not entry.is_file():
            raise UsageError(
                f"{out} holds {entry.name!r}, which is no file deit data pack wrote: "
                "pack into a new or empty folder"
            )
        try:
            os.link(entry, tmp / entry.name)
        except OSError:  # a file system without hard links
            shutil.copy2(entry, tmp / entry.name)


def _write_shards(
    items: Iterator[Any], tmp: Path, split: str, shard_size: int
) -> tuple[dict[str, int], int]:
    """Write ``split-NNNNNN.tar`` files of ``shard_size`` samples; (sizes, bad count)."""
    wds = require("webdataset", "webdataset", "data")
    sizes: dict[str, int] = {}
    n = bad = 0
    sink: Any = None
    stream: Any = None
    try:
        for item, label in items:
            if isinstance(item, BadSample):
                bad += 1
                log.warning("skipping %s: %s", item.path, item.reason)
                continue
            if n % shard_size == 0:
                if sink is not None:
                    sink.close()
                    stream.close()
                name = f"{split}-{len(sizes):06d}.tar"
                stream = open(tmp / name, "wb")  # noqa: SIM115  (closed below)
                sink, sizes[name] = wds.TarWriter(stream), 0
            image = item[0] if isinstance(item, tuple) else item
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            sink.write({"__key__": f"{n:09d}", "png": buf.getvalue(), "cls": str(int(label))})
            sizes[name] += 1
            n += 1
    finally:
        if sink is not None:
            sink.close()
            stream.close()
    return sizes, bad


def _swap(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` in the place of ``out`` (two renames)."""
    if out.exists():
        old = out.with_name(f".{out.name}.{secrets.token_hex(4)}.old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def pack(
    source: Any,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    split: str = "train",
    channels: int | None = None,
) -> dict[str, Any]:
    """Write ``split``'s WebDataset shards (``out_dir/SPLIT-000000.tar`` ...) and
    ``classes.json`` (classes, every shard's sample count, each split's counts).

    Args:
        source: an image folder (class folders), a ``datasets`` path (``save_to_disk``
            folder, Parquet, ...) or a ``datasets.Dataset``.
        out_dir: the output folder (created); other splits' shards in it are kept.
        shard_size: samples per shard.
        split: the split of a ``datasets`` source, and the shards' name.
        channels: convert images to 1 or 3 channels (None: keep gray images gray).

    Returns:
        This split's ``classes``, ``split``, ``samples``, ``bad`` (unreadable images,
        skipped) and ``shards`` (name: samples).

    Raises:
        UsageError: a bad split name or shard size, an output folder holding other things,
            or other splits there with different classes.
    """
    if shard_size < 1:
        raise UsageError(f"shard size must be positive, not {shard_size}")
    _check_split(split)
    out = Path(out_dir).absolute()
    mine = re.compile(re.escape(split) + r"-[0-9]{6,}\.tar")
    old = _old_meta(out) if out.is_dir() else {}
    others = {k: v for k, v in (old.get("shards") or {}).items() if not mine.fullmatch(k)}
    items, classes = _pack_items(source, split, channels)
    if others and old.get("classes") != list(classes):
        raise UsageError(
            f"{out} holds shards of other splits with other classes ({len(old['classes'])} "
            f"against {len(classes)}): pack into a new folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        _keep_others(out, tmp, mine)
        sizes, bad = _write_shards(items, tmp, split, shard_size)
        splits = {k: v for k, v in (old.get("splits") or {}).items() if k != split and others}
        splits[split] = {"samples": sum(sizes.values()), "bad": bad}
        meta = {
            "classes": list(classes),
            "samples": sum(others.values()) + sum(sizes.values()),
            "bad": sum(int(v.get("bad", 0)) for v in splits.values()),
            "shards": {**others, **sizes},
            "splits": splits,
        }
        (tmp / CLASSES_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "classes": list(classes),
        "split": split,
        "samples": sum(sizes.values()),
        "bad": bad,
        "shards": sizes,
    }
