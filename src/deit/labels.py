"""Class names: the ImageNet-1k list shipped with the package, user label files, and matching
one list of names to another (folders, dataset classes and fine-tuned heads to a model's
labels: :func:`label_map`)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
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


# --------------------------------------------------------------------------- matching names


def label_key(name: str) -> str:
    """A name with case, spaces and punctuation ignored (``T-shirt/top`` -> ``tshirttop``)."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def label_keys(name: str) -> set[str]:
    """The keys a class name matches by: the whole name and each ``/`` alternative, with case,
    spaces and punctuation ignored (``T-shirt/top`` -> ``tshirttop``, ``tshirt``, ``top``)."""
    parts = [name, *name.split("/")] if "/" in name else [name]
    return {k for k in (label_key(p) for p in parts) if k}


def label_map(new: Sequence[str], old: Sequence[str]) -> dict[int, int]:
    """New name index -> old name index, for the new names that match an old one.

    Names match when they share a key (:func:`label_keys`: case, spaces and punctuation
    ignored, ``/`` separates alternatives, so ``t-shirt`` is ``T-shirt/top``). A whole-name
    match wins over an alternative; each old name is given to one new name at most (the
    first), so two classes never share one. Nothing is ever matched by position.
    """
    whole: dict[str, int] = {}
    part: dict[str, int] = {}
    for j, label in enumerate(old):
        whole.setdefault(label_key(label), j)
        for key in label_keys(label):
            part.setdefault(key, j)
    mapping: dict[int, int] = {}
    taken: set[int] = set()
    for exact in (True, False):
        for i, name in enumerate(new):
            if i in mapping:
                continue
            keys = [label_key(name)] if exact else sorted(label_keys(name))
            found = [(whole if exact else part).get(k) for k in keys]
            free = [j for j in found if j is not None and j not in taken]
            if free:
                mapping[i] = free[0]
                taken.add(free[0])
    return dict(sorted(mapping.items()))
