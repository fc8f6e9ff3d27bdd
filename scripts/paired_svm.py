"""A fine-tuned model against the pixel SVM on the same test images, paired (McNemar).

Each argument is ``MODEL=SCENARIO``: a fine-tuned model folder and the scenario folder
(``train/``, ``val/``, ``test/``) it was fine-tuned on, as ``scripts/finetune_scenarios.py``
builds and runs them. The SVM is the one that script fits (RBF, C = 10, on the raw pixels
of train + val). Per pair and in total: images both get right, only the model, only the
SVM, neither; and McNemar's z on the total (the two discordant counts' difference over
the square root of their sum; |z| < 2: no measurable difference).

Usage::

    python scripts/paired_svm.py /tmp/ftsc_s1/runs/d/finetuned/model=/tmp/ftsc_s1/data/d ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.svm import SVC

from deit.checkpoints import load_model
from deit.images import load_image
from deit.train.finetune import label_map
from deit.transforms import preprocess_image


def _split(folder: Path) -> tuple[list[str], list[Path], np.ndarray]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files = [f for c in classes for f in sorted((folder / c).iterdir())]
    return classes, files, np.array([classes.index(f.parent.name) for f in files])


def _pixels(files: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f), np.float32).ravel() / 255 for f in files])


@torch.no_grad()
def counts(model_dir: Path, root: Path) -> np.ndarray:
    """(both right, only the model, only the SVM, neither) on ``root/test``."""
    _, train, y = _split(root / "train")
    _, val, vy = _split(root / "val")
    classes, test, ty = _split(root / "test")
    svm = SVC(kernel="rbf", C=10.0, gamma="scale")
    svm.fit(_pixels(train + val), np.concatenate([y, vy]))
    svm_right = svm.predict(_pixels(test)) == ty
    loaded = load_model(model_dir)
    mapping = label_map(classes, loaded.labels)  # folders matched to labels by name
    if len(mapping) < len(classes):
        raise SystemExit(f"{root}: classes {classes} are not all among {model_dir}'s labels")
    columns = [mapping[i] for i in range(len(classes))]
    x = torch.stack([preprocess_image(load_image(f), loaded.preprocess) for f in test])
    model_right = loaded.model.eval()(x).logits[:, columns].argmax(1).numpy() == ty
    return np.array(
        [
            (model_right & svm_right).sum(),
            (model_right & ~svm_right).sum(),
            (~model_right & svm_right).sum(),
            (~model_right & ~svm_right).sum(),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", metavar="MODEL=SCENARIO")
    args = parser.parse_args()
    total = np.zeros(4, dtype=int)
    print("both right, only the model, only the SVM, neither")
    for pair in args.pairs:
        model_dir, sep, root = pair.partition("=")
        if not sep:
            raise SystemExit(f"{pair!r}: expected MODEL=SCENARIO")
        c = counts(Path(model_dir), Path(root))
        total += c
        print(f"{pair}: {c.tolist()}")
    only_model, only_svm = int(total[1]), int(total[2])
    z = (only_model - only_svm) / max(1.0, (only_model + only_svm) ** 0.5)
    print(f"total: {total.tolist()}  McNemar z = {z:+.2f}")


if __name__ == "__main__":
    main()
