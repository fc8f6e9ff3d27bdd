"""Reading out-of-distribution statistics: ``ood.safetensors`` beside a model's weights and
the ``deit.ood`` metadata of exported files, checked before anything is allocated.

:func:`load_ood` reads the JSON block first (:func:`check_description`: format version, method,
finite threshold, tapped blocks, bounded sizes), derives every tensor's shape from it, and
checks the file's header against those shapes and the file's length before loading a byte of
data. :func:`find_stats` finds a model folder's statistics and :func:`check_fits` them to the
model; :func:`exported_calibration` reads what an exported graph declares.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from deit.checkpoints import LoadedModel
from deit.errors import CheckpointError
from deit.model import DeiT
from deit.ood import (
    FORMAT,
    LAYER_TENSORS,
    MAHALANOBIS,
    METADATA_KEY,
    OOD_FILE,
    VERSION,
    Calibration,
    LayerStats,
    OODStats,
    Taps,
)

EXPORTED_VERSIONS = (3, VERSION)  # statistics versions an exported graph may declare

# Bounds checked on the file's header before anything is allocated.
MAX_HEADER_BYTES = 1 << 20
MAX_DIM = 1 << 15  # features per layer (three parts of the widest DeiT's tokens: 3 x 768)
MAX_CLASSES = 1 << 17
MAX_BLOCK = 1 << 10
MAX_STORED_LAYERS = 64
MAX_ELEMENTS = 1 << 28  # per tensor (1 GiB of float32)


def check_description(
    meta: Any, where: str, versions: tuple[int, ...] = (VERSION,)
) -> dict[str, Any]:
    """``meta`` (the JSON block of an ``ood.safetensors`` or an exported file) checked:
    format and one of ``versions``, the method, a finite threshold, token count 1 or 2, the
    tapped blocks, bounded sizes."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not deit out-of-distribution statistics")
    if meta.get("version") not in versions:
        raise CheckpointError(
            f"{where}: statistics of format version {meta.get('version')!r}, this deit reads "
            f"version {VERSION}: refit them with deit calibrate (and export again)"
        )
    threshold, dim, classes = meta.get("threshold"), meta.get("dim"), meta.get("classes")
    if meta.get("method") != MAHALANOBIS:
        raise CheckpointError(f"{where}: unknown score method {meta.get('method')!r}")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise CheckpointError(f"{where}: the threshold must be a finite number, not {threshold!r}")
    if meta.get("num_prefix") not in (1, 2):
        raise CheckpointError(f"{where}: num_prefix must be 1 or 2, not {meta.get('num_prefix')!r}")
    blocks = meta.get("blocks")
    if (
        not isinstance(blocks, list)
        or not 1 <= len(blocks) <= MAX_STORED_LAYERS
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
        or blocks != sorted(set(blocks))
        or not 0 <= blocks[0] <= blocks[-1] < MAX_BLOCK
    ):
        raise CheckpointError(
            f"{where}: blocks must be 1 to {MAX_STORED_LAYERS} increasing block indices, "
            f"not {blocks!r}"
        )
    for name, value, top in (("dim", dim, MAX_DIM), ("classes", classes, MAX_CLASSES)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise CheckpointError(
                f"{where}: {name} must be an integer in [1, {top}], not {value!r}"
            )
    if not isinstance(meta.get("info", {}), dict):
        raise CheckpointError(f"{where}: info must be an object")
    return meta


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``path`` (length checked against the file and the bound)
    and the number of data bytes after it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: header of {length} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: malformed header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed header: a {type(header).__name__}")
    return header, size - 8 - length


def _check_tensors(
    path: Path, header: dict[str, Any], want: dict[str, list[int]], data_bytes: int
) -> None:
    """Every tensor the JSON block implies, and only those, with the implied shape, float32,
    and a byte range inside the file: nothing is allocated for a lying file."""
    found = set(header) - {"__metadata__"}
    if found != set(want):
        raise CheckpointError(f"{path}: expected tensors {sorted(want)}, found {sorted(found)}")
    for name, shape in want.items():
        entry = header[name]
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or entry.get("dtype") != "F32"
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or math.prod(shape) > MAX_ELEMENTS
        ):
            raise CheckpointError(f"{path}: tensor {name!r} is malformed or too large: {entry}")
        if entry.get("shape") != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {entry.get('shape')}, its header says {shape}"
            )
        if not 0 <= offsets[0] <= offsets[1] <= data_bytes or (
            offsets[1] - offsets[0] != 4 * math.prod(shape)
        ):
            raise CheckpointError(f"{path}: tensor {name!r} does not fit the file ({offsets})")


def load_ood(path: str | Path) -> OODStats:
    """Read ``ood.safetensors`` (or the folder holding it), checked before allocating.

    Raises:
        CheckpointError: a file that is not ours, claims sizes beyond the bounds or the file's
            length, or whose tensors disagree with its JSON block.
    """
    path = Path(path)
    if path.is_dir():
        path = path / OOD_FILE
    header, data_bytes = _read_header(path)
    try:
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: no readable {METADATA_KEY} block ({e})") from None
    meta = check_description(meta, str(path))
    dim, classes, n_layers = meta["dim"], meta["classes"], len(meta["blocks"])
    want = {"offset": [n_layers], "scale": [n_layers]}
    for i in range(n_layers):
        want |= {f"center.{i}": [dim], f"whiten.{i}": [dim, dim], f"means.{i}": [classes, dim]}
    _check_tensors(path, header, want, data_bytes)
    from safetensors.torch import load_file

    t = load_file(str(path))
    if not all(bool(torch.isfinite(v).all()) for v in t.values()):
        raise CheckpointError(f"{path}: the statistics hold non-finite values")
    if not bool((t["scale"] > 0).all()):
        raise CheckpointError(f"{path}: the layers' scales must be positive")
    layers = [LayerStats(*(t[f"{name}.{i}"] for name in LAYER_TENSORS)) for i in range(n_layers)]
    taps = Taps(int(meta["num_prefix"]), tuple(meta["blocks"]))
    return OODStats(
        layers,
        t["offset"],
        t["scale"],
        float(meta["threshold"]),
        taps,
        info=dict(meta.get("info", {})),
    )


def check_fits(stats: OODStats, model: DeiT, where: str) -> OODStats:
    """``stats`` if they were fitted for ``model``: taps it has (the same prefix tokens;
    blocks, increasing as the reader checked, ending with its last: files fitted with other
    tapped blocks keep working), its features per layer and no more classes than it has."""
    taps, c = Taps.of(model), model.config
    blocks = stats.taps.blocks
    if (
        stats.taps.num_prefix != taps.num_prefix
        or blocks[-1] != c.depth - 1
        or stats.layer_dim != taps.layer_dim(c.embed_dim)
        or stats.classes > c.num_classes
    ):
        raise CheckpointError(
            f"{where}: statistics for blocks {list(blocks)}, {stats.layer_dim} "
            f"features per layer and {stats.classes} classes do not fit this model "
            f"({c.depth} blocks, {taps.layer_dim(c.embed_dim)} features, {c.num_classes} "
            "classes): refit them with deit calibrate"
        )
    return stats


def find_stats(loaded: LoadedModel) -> OODStats | None:
    """The fitted statistics saved beside a model folder's weights (``ood.safetensors``),
    checked against the model; None when there are none (exported files carry theirs in
    the graph: see :func:`exported_calibration`)."""
    if loaded.format in ("onnx", "openvino"):
        return None
    folder = Path(loaded.source)
    if not (folder / OOD_FILE).is_file():
        return None
    return check_fits(load_ood(folder), loaded.model, str(folder))


def exported_calibration(loaded: LoadedModel) -> Calibration | None:
    """The calibration an exported file declares in its ``deit.ood`` metadata (its graph
    then computes the score as a second output), or None. Files exported with earlier
    statistics keep working: their graphs compute the score they were fitted for, and what
    is read here (method, threshold) has not changed since version 3."""
    raw = loaded.metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        meta = check_description(
            json.loads(raw), f"{loaded.source} ({METADATA_KEY})", EXPORTED_VERSIONS
        )
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{loaded.source}: malformed {METADATA_KEY} metadata: {e}") from None
    return Calibration(str(meta["method"]), float(meta["threshold"]))
