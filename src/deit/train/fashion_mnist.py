"""Fashion-MNIST, the embedded model's data: the IDX files of the Debian package
``dataset-fashion-mnist`` (``FASHION_MNIST_DIR``) read as tensors, checked against what
they declare, and written out as small image folders for fine-tuning demonstrations."""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) of unsigned bytes.

    Raises:
        ValueError: bad magic number, unsupported element type or truncated data.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = raw[2], raw[3]
    if dtype not in _IDX_DTYPES or ndim < 1:
        raise ValueError(f"{path}: unsupported IDX element type 0x{dtype:02x} / {ndim} dims")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = offset + math.prod(shape)
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[dtype], offset=offset).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found under {root}. Install the Debian package "
        "(`apt-get install dataset-fashion-mnist`) or pass the folder holding the IDX files."
    )


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as tensors.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: folder with the IDX files (``.gz`` or raw); default ``FASHION_MNIST_DIR``.

    Returns:
        ``images`` uint8 (N, 1, 28, 28) and ``labels`` int64 (N,).
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST split must be train or test, not {split!r}")
    root = Path(root) if root else FASHION_MNIST_DIR
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} / labels {labels.shape}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def write_fashion_mnist_folder(
    out: str | Path,
    classes: Sequence[str],
    per_class: int,
    *,
    split: str = "train",
    size: int = 28,
    root: str | Path | None = None,
) -> Path:
    """Write Fashion-MNIST images of some classes as an image folder (``out/<class>/*.png``).

    The first ``per_class`` images of each class in ``split``, resized bilinearly to ``size``
    pixels, gray PNGs; folders are named after the labels (``T-shirt/top`` becomes
    ``t-shirt-top``). Used to demonstrate and test fine-tuning on "your own" small folder.
    """
    from PIL import Image

    out = Path(out)
    x, y = load_fashion_mnist(split, root)
    for name in classes:
        if name not in FASHION_MNIST_CLASSES:
            raise ValueError(f"{name!r} is not a Fashion-MNIST class ({FASHION_MNIST_CLASSES})")
        folder = out / re.sub(r"[^0-9a-z]+", "-", name.lower())
        folder.mkdir(parents=True, exist_ok=True)
        idx = (y == FASHION_MNIST_CLASSES.index(name)).nonzero().flatten()[:per_class]
        for i in idx.tolist():
            image = Image.fromarray(x[i, 0].numpy(), mode="L")
            if size != image.width:
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            image.save(folder / f"{split}_{i:05d}.png")
    return out
