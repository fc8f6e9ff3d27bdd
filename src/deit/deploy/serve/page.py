"""What the server says about its model: the name shown on the page and used in the protocol
routes, and the sample images the page offers.

The page shows where the model came from without giving away local paths: a Hub id as is, a
file by its name, a folder with its parent (``student_final/model``, not ``model``), an
embedded model by its name. The protocol routes (``/v2/models/{name}``, ``/v1/models/{name}``)
need a URL-safe name: by default the shown name with ``/`` as ``-`` and a file's suffix
dropped.

Sample images must fit the model: first, images from the model's own training data when its
saved training config names an image folder that still exists (one per class); otherwise the
package's bundled photos whose true class is one of the model's labels; otherwise none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deit.checkpoints import LoadedModel
from deit.errors import UsageError
from deit.hub import EMBEDDED_DIR

SAMPLES_DIR = Path(__file__).parent / "web" / "samples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_SAMPLES = 6
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The bundled photos: file, button title, and the label it truly is.
BUNDLED = (
    ("chelsea.jpg", "Cat", "tabby, tabby cat"),
    ("coffee.jpg", "Coffee", "espresso"),
    ("fmnist-ankle-boot.png", "Ankle boot", "Ankle boot"),
    ("fmnist-pullover.png", "Pullover", "Pullover"),
)


def _local(path: Path) -> bool:
    try:
        return path.is_absolute() or path.exists()
    except OSError:
        return False


def display_name(source: str) -> str:
    """What the page and ``/v1/model`` show of a model's source (never an absolute path)."""
    path = Path(source)
    if not _local(path):
        return source  # a Hub id or a variant name
    if path.parent.resolve() == EMBEDDED_DIR.resolve():
        return path.name
    if path.is_dir() and path.resolve().parent.name:
        return f"{path.resolve().parent.name}/{path.name}"
    return path.name or source


def model_name(source: str) -> str:
    """The URL-safe default name of the model in the v2 and v1 protocol routes."""
    shown = display_name(source)
    path = Path(source)
    if _local(path) and path.is_file():
        shown = path.stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", shown.replace("/", "-")).strip("-.")
    return name or "model"


def check_model_name(name: str) -> str:
    """``name`` if it can stand in a URL path segment, else a :class:`UsageError`."""
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 128), "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Sample:
    """An image the page offers to classify."""

    title: str
    path: Path


def _label_of(folder: str, labels: list[str]) -> str | None:
    """The model's label a class folder holds (folder names can't hold ``/``)."""
    for label in labels:
        if folder in (label, label.replace("/", "_")):
            return label
    return None


def _own_samples(loaded: LoadedModel) -> list[Sample]:
    """One image per class from the image folder the model was trained on, if it exists."""
    data: Any = (loaded.metadata.get("train_config") or {}).get("data") or {}
    if not isinstance(data, dict):
        return []
    samples: list[Sample] = []
    for key in ("val_path", "path"):
        root = Path(str(data.get(key) or ""))
        if not str(data.get(key) or "") or not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            label = _label_of(folder.name, loaded.labels)
            image = next(
                (f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES), None
            )
            if label is not None and image is not None and image.is_file():
                samples.append(Sample(label, image))
            if len(samples) == MAX_SAMPLES:
                break
        if samples:
            return samples
    return []


def page_samples(loaded: LoadedModel) -> list[Sample]:
    """The sample images that fit ``loaded`` (see the module docstring); may be empty."""
    own = _own_samples(loaded)
    if own:
        return own
    labels = set(loaded.labels)
    return [Sample(title, SAMPLES_DIR / file) for file, title, true in BUNDLED if true in labels]
