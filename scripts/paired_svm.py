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
from finetune_scenarios import pixel_svm, pixels, predictions, train_val_pixels  # same dir


def counts(model_dir: Path, root: Path) -> np.ndarray:
    """(both right, only the model, only the SVM, neither) on ``root/test``."""
    tx, ty = pixels(root / "test")
    svm_right = pixel_svm().fit(*train_val_pixels(root)).predict(tx) == ty
    predicted, labels = predictions(model_dir, root / "test")
    model_right = predicted == labels
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
        try:
            c = counts(Path(model_dir), Path(root))
        except (OSError, ValueError) as e:
            raise SystemExit(f"{pair}: {e}") from None
        total += c
        print(f"{pair}: {c.tolist()}")
    only_model, only_svm = int(total[1]), int(total[2])
    z = (only_model - only_svm) / max(1.0, (only_model + only_svm) ** 0.5)
    print(f"total: {total.tolist()}  McNemar z = {z:+.2f}")


if __name__ == "__main__":
    main()
