"""Fine-tuning scenarios on real images (docs/results/fine-tuning.md): build, run, tabulate.

Four tasks for the embedded ``fashion-mnist`` model, each about 1,500 training images, a
validation split (for the best-epoch choice) and a separate held-out test split (reported):

* ``a`` renamed subset: T-shirt/top, Shirt, Dress from Fashion-MNIST, in folders named
  ``t-shirt``, ``SHIRT``, ``dress`` (500 / 100 / 300 per class, 28 px, all from the test
  split: images the model never saw);
* ``b`` no class in common: scikit-learn's handwritten digits (real 8x8 scans, 16 gray
  levels, upscaled to 28 px), as the two-class task ``even`` / ``odd``;
* ``c`` resolution change: Pullover, Coat, Bag from Fashion-MNIST written at 32 px and
  fine-tuned at 32 px (``model.img_size=32``, interpolated position embeddings); the held-out
  scenario, kept out of every test and tuning decision;
* ``d`` same class count, other classes: the ten digits ``0``-``9`` (10 classes, as the model).

For each: zero-shot (the model restricted to the matched classes, where there are any), the
linear probe alone (``schedule.steps=0 schedule.linear_probe=on``), fine-tuned with the
defaults (the command line gives only the data), the same start distilled (hard) from that
fine-tuned model as teacher, from scratch (same shape, a step budget), a CNN teacher trained
on the folder (``fmnist_cnn``, 1,000 steps) and the same start distilled (hard) from it,
a classical baseline (RBF SVM and logistic regression on the pixels), and wall times.

Usage::

    python scripts/finetune_scenarios.py --work /tmp/ftsc [--only a b] [--skip scratch]
    python scripts/finetune_scenarios.py --work /tmp/ftsc --table   # the markdown table
    python scripts/finetune_scenarios.py --work /tmp/ftsc_s1 --only b d --split-seed 1

Everything is written under ``--work`` (data, runs, ``results.json``), nothing in the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from deit.checkpoints import load_model
from deit.images import load_image
from deit.train.classifiers import is_classifier_dir
from deit.train.evaluate import evaluate
from deit.train.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from deit.train.finetune import label_map
from deit.transforms import preprocess_image

DEIT = str(Path(sys.executable).with_name("deit"))
QUIET = ["run.progress=false", "data.num_workers=0"]
SCRATCH = [
    "model.name=deit",
    "model.patch_size=4",
    "model.embed_dim=96",
    "model.depth=6",
    "model.num_heads=3",
    "schedule.steps=1500",
]
SCENARIOS: dict[str, dict[str, Any]] = {
    "a": {
        "what": "renamed subset (t-shirt, SHIRT, dress), 28 px",
        "fashion": {"t-shirt": "T-shirt/top", "SHIRT": "Shirt", "dress": "Dress"},
        "size": 28,
    },
    "b": {"what": "no class in common (digits: even / odd), 28 px", "digits": "parity"},
    "c": {
        "what": "resolution change (pull-over, coat, bag at 32 px, trained at 32 px)",
        "fashion": {"pull-over": "Pullover", "coat": "Coat", "bag": "Bag"},
        "size": 32,
        "extra": ["model.img_size=32"],
    },
    "d": {"what": "same class count, other classes (digits 0-9), 28 px", "digits": "ten"},
}
CNN = ["model.name=fmnist_cnn", "data.in_chans=1", "schedule.steps=1000"]
PER_CLASS = (500, 100, 300)  # Fashion-MNIST (test split: 1,000 per class): train, val, test


def _save(pixels: np.ndarray, path: Path, size: int) -> None:
    image = Image.fromarray(pixels.astype(np.uint8), mode="L")
    if image.width != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def build_fashion(root: Path, folders: dict[str, str], size: int) -> None:
    """Train / val / test, disjoint, all from Fashion-MNIST's test split: the embedded model
    was trained on every image of the training split, and a user's own images are new to
    it (fine-tuning on images it was trained on brings nothing to learn)."""
    x, y = load_fashion_mnist("test")
    n_train, n_val, n_test = PER_CLASS
    for folder, label in folders.items():
        idx = (y == FASHION_MNIST_CLASSES.index(label)).nonzero().flatten().tolist()
        for split, ids in (
            ("train", idx[:n_train]),
            ("val", idx[n_train : n_train + n_val]),
            ("test", idx[n_train + n_val : n_train + n_val + n_test]),
        ):
            for i in ids:
                _save(x[i, 0].numpy(), root / split / folder / f"{i:05d}.png", size)


def build_digits(root: Path, task: str, size: int = 28, seed: int = 0) -> None:
    """scikit-learn's 1,797 digit scans (16 levels -> 0-255), shuffled with ``seed`` (the
    scenarios' split is seed 0; others measure how much the split matters): 1,350 train,
    150 val, 297 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    pixels = (digits.images * (255 / 16)).round()
    splits = {"train": order[:1350], "val": order[1350:1500], "test": order[1500:]}
    for split, ids in splits.items():
        for i in ids:
            d = int(digits.target[i])
            folder = str(d) if task == "ten" else ("even" if d % 2 == 0 else "odd")
            _save(pixels[i], root / split / folder / f"{i:04d}.png", size)


def build(name: str, work: Path, split_seed: int = 0) -> Path:
    root = work / "data" / name
    if (root / "test").is_dir():
        return root
    s = SCENARIOS[name]
    if "fashion" in s:
        build_fashion(root, s["fashion"], s["size"])
    else:
        build_digits(root, s["digits"], seed=split_seed)
    return root


def read_folder(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """An image folder's classes (sorted), its files and their labels."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [f for c in classes for f in sorted((root / c).iterdir())]
    labels = np.array([classes.index(f.parent.name) for f in files])
    return classes, files, labels


def matched_columns(classes: list[str], labels: list[str], model: str | Path) -> torch.Tensor:
    """The model's label column for each folder class, matched by name."""
    mapping = label_map(classes, labels)
    if len(mapping) < len(classes):
        raise ValueError(f"{model}: classes {classes} not all among {labels}")
    return torch.tensor([mapping[i] for i in range(len(classes))])


@torch.no_grad()
def predictions(model_path: str | Path, test: Path) -> tuple[np.ndarray, np.ndarray]:
    """The model's prediction for every image of ``test`` with its own inference
    preprocessing, restricted to the folders' classes matched by name (for a fine-tuned
    model: all of its classes; for the initial model: zero-shot), and the true labels."""
    loaded = load_model(model_path)
    classes, files, labels = read_folder(test)
    columns = matched_columns(classes, loaded.labels, model_path)
    model = loaded.model.eval()
    predicted = []
    for start in range(0, len(files), 256):
        chunk = files[start : start + 256]
        x = torch.stack([preprocess_image(load_image(f), loaded.preprocess) for f in chunk])
        predicted.append(model(x).logits[:, columns].argmax(1).numpy())
    return np.concatenate(predicted), labels


def accuracy(model_path: str | Path, test: Path) -> float:
    """Top-1 on ``test`` (:func:`predictions`). A CNN (``deit-classifier`` folder):
    ``deit.train.evaluate``, its classes matched to the folders by name."""
    if is_classifier_dir(model_path):
        return evaluate(model_path, str(test), device="cpu").top1
    predicted, labels = predictions(model_path, test)
    return float((predicted == labels).mean())


def pixels(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``folder`` as raw pixels in [0, 1], one row each, and the labels."""
    _, files, labels = read_folder(folder)
    rows = [np.asarray(Image.open(f), np.float32).ravel() / 255 for f in files]
    return np.stack(rows), labels


def train_val_pixels(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """What the classical baselines fit on: the pixels of train + val."""
    (x, y), (vx, vy) = pixels(root / "train"), pixels(root / "val")
    return np.concatenate([x, vx]), np.concatenate([y, vy])


def pixel_svm() -> Any:
    """The classical baseline: an RBF SVM (C = 10) for raw pixels."""
    from sklearn.svm import SVC

    return SVC(kernel="rbf", C=10.0, gamma="scale")


def classical(root: Path) -> dict[str, float]:
    """RBF SVM and logistic regression on the raw pixels (train + val to fit, test scored)."""
    from sklearn.linear_model import LogisticRegression

    x, y = train_val_pixels(root)
    tx, ty = pixels(root / "test")
    out = {}
    for name, clf in (("svm", pixel_svm()), ("logreg", LogisticRegression(C=1.0, max_iter=2000))):
        out[name] = float((clf.fit(x, y).predict(tx) == ty).mean())
    return out


def run(args: list[str], out: Path) -> dict[str, Any]:
    """``deit train ARGS --out OUT`` (skipped when OUT already holds a model)."""
    cmd = [DEIT, "train", *args, "--out", str(out)]
    log = out.with_suffix(".log")
    if not (out / "model").is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with log.open("w") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
        (out / "wall_s").write_text(f"{time.perf_counter() - t0:.1f}")
    meta = json.loads((out / "model" / "config.json").read_text()).get("metadata", {})
    return {
        "command": " ".join(["deit", *cmd[1:]]),
        "wall_s": float((out / "wall_s").read_text()),
        "epochs": meta.get("epochs"),
        "steps": meta.get("steps"),
        "best_epoch": meta.get("best_epoch"),
        "val_top1": meta.get("best_val_top1"),
    }


def scenario(name: str, work: Path, skip: set[str], split_seed: int = 0) -> dict[str, Any]:
    root = build(name, work, split_seed)
    s = SCENARIOS[name]
    data = [
        "data.dataset=imagefolder",
        f"data.path={root / 'train'}",
        f"data.val_path={root / 'val'}",
    ]
    extra = list(s.get("extra", []))
    runs = work / "runs" / name
    res: dict[str, Any] = {"what": s["what"]}
    if "fashion" in s:
        res["zero_shot"] = accuracy("fashion-mnist", root / "test")
    t0 = time.perf_counter()
    res["classical"] = classical(root)
    res["classical"]["wall_s"] = time.perf_counter() - t0
    plans = {
        "probe": [
            "model.init=fashion-mnist",
            *data,
            *extra,
            "schedule.steps=0",
            "schedule.linear_probe=on",
        ],
        "finetuned": ["model.init=fashion-mnist", *data, *extra],
        # the same start, distilled from the fine-tuned run (a teacher above that start)
        "distilled": [
            "model.init=fashion-mnist",
            *data,
            *extra,
            "distill.kind=hard",
            f"distill.teacher={runs / 'finetuned' / 'model'}",
        ],
        "scratch": [*SCRATCH, *data, f"model.img_size={s.get('size', 28)}"],
        # a teacher of another architecture, trained on the folder: a CNN (the paper's case)
        "cnn": [*CNN, *data, f"model.img_size={s.get('size', 28)}"],
        "distilled_cnn": [
            "model.init=fashion-mnist",
            *data,
            *extra,
            "distill.kind=hard",
            f"distill.teacher={runs / 'cnn' / 'model'}",
        ],
    }
    for key, args in plans.items():
        if key in skip:
            continue
        r = run([*args, *QUIET], runs / key)
        r["test_top1"] = accuracy(runs / key / "model", root / "test")
        res[key] = r
        print(name, key, json.dumps(r), flush=True)
    return res


def table(results: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return f"{100 * v:.2f}" if isinstance(v, float) else "–"

    lines = [
        "| scenario | zero-shot | linear probe | fine-tuned (defaults) | kept epoch / steps | "
        "distilled from it | CNN teacher | distilled from the CNN | from scratch | "
        "SVM (pixels) | logistic regression | fine-tune wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in sorted(results.items()):
        ft = r.get("finetuned", {})
        lines.append(
            f"| ({name}) {r['what']} | {pct(r.get('zero_shot'))} | "
            f"{pct(r.get('probe', {}).get('test_top1'))} | {pct(ft.get('test_top1'))} | "
            f"{ft.get('best_epoch', '–')} of {ft.get('epochs', '–')} / {ft.get('steps', '–')} | "
            f"{pct(r.get('distilled', {}).get('test_top1'))} | "
            f"{pct(r.get('cnn', {}).get('test_top1'))} | "
            f"{pct(r.get('distilled_cnn', {}).get('test_top1'))} | "
            f"{pct(r.get('scratch', {}).get('test_top1'))} | {pct(r['classical']['svm'])} | "
            f"{pct(r['classical']['logreg'])} | {ft.get('wall_s', 0):.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ftsc"
    )
    parser.add_argument("--only", nargs="*", default=sorted(SCENARIOS))
    parser.add_argument("--skip", nargs="*", default=[])
    parser.add_argument("--table", action="store_true", help="print the table and exit")
    parser.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="shuffle the digits (b, d) with this seed; use a --work of its own per seed",
    )
    args = parser.parse_args()
    path = args.work / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if not args.table:
        for name in args.only:
            # a skipped run keeps its earlier result
            results[name] = {
                **results.get(name, {}),
                **scenario(name, args.work, set(args.skip), args.split_seed),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
