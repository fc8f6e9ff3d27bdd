"""Class names: the ImageNet-1k list shipped with the package, and user label files."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

IMAGENET_LABELS_FILE = Path(__file__).parent / "data" / "imagenet-1k-labels.tsv"


@lru_cache(maxsize=1)
def _imagenet() -> tuple[str, ...]:
    rows = IMAGENET_LABELS_FILE.read_text(encoding="utf-8").splitlines()[1:]  # skip header
    labels = tuple(row.split("\t")[2] for row in rows if row)
    assert len(labels) == 1000, f"{IMAGENET_LABELS_FILE} has {len(labels)} labels"
    return labels


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (the strings transformers configs use)."""
    return list(_imagenet())


def imagenet_wnids() -> list[str]:
    """WordNet ids (``n01440764`` …) in index order: the ImageNet folder names."""
    rows = IMAGENET_LABELS_FILE.read_text(encoding="utf-8").splitlines()[1:]
    return [row.split("\t")[1] for row in rows if row]


def read_label_file(path: str | Path, num_classes: int | None = None) -> list[str]:
    """Read class names: plain text with one name per line, a JSON list, or a JSON object
    from index to name (``{"0": "tench", ...}``, as in a transformers ``id2label``) or to
    ``[wnid, name]`` (as in Keras' ``imagenet_class_index.json``).

    Raises:
        ValueError: the file is missing, unreadable or empty, or its count differs from
            ``num_classes``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"label file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        labels = _parse_labels(text) if text.lstrip()[:1] in ("[", "{") else None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"label file {path} is not text, a JSON list or an index map: {e}") from e
    if labels is None:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"label file {path} is empty")
    if num_classes is not None and len(labels) != num_classes:
        raise ValueError(
            f"label file {path} has {len(labels)} names; the model has {num_classes} "
            "classes: give one name per class"
        )
    return labels


def _parse_labels(text: str) -> list[str]:
    data = json.loads(text)
    if isinstance(data, list):
        return [str(x) for x in data]
    if not isinstance(data, dict):
        raise TypeError(f"a JSON {type(data).__name__}")
    by_index = {int(k): v for k, v in data.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise KeyError("the keys are not the indices 0..n-1")
    return [
        str(v[-1]) if isinstance(v, list) and v else str(v) for _, v in sorted(by_index.items())
    ]
