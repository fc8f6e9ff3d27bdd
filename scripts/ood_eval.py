"""Measure the out-of-distribution score (issue 26) on real images the model never saw.

For the embedded ``fashion-mnist`` model (in distribution: the Fashion-MNIST test images the
threshold was not set on, rows 5000-9999), against:

- photos: random crops of the sample photos in tests/fixtures/images (scikit-image's);
- whole photos: the same photos whole, as a user hands them over, and large crops of them
  (60-100% of each side: whole-photo framings the 28 px letterbox turns into frame-filling
  rectangles);
- faces: scikit-image's bundled LFW subset (the 100 face images);
- noise: uniform and Gaussian-blob noise images;
- digits: scikit-learn's bundled handwritten digits (8x8, upscaled);
- printed text: crops of scikit-image's scanned ``page`` and ``text`` images;
- held out (version 3): crops of scikit-image's textures and science images (brick, grass,
  gravel, moon, coins, Hubble deep field, clock, horse, cells, microaneurysms), kept out of
  every choice of the score before the patches' mean square (its layers, tokens and
  standardisation were chosen on the sets above);
- held out (version 4): every other whole image bundled with scikit-image, scikit-learn and
  matplotlib on this machine, whole and in large crops, kept out of the choice of the
  patches' mean square;

and, with ``--near MODEL``, the hard near case: a model trained on 8 Fashion-MNIST classes
(``deit train``, see docs/results/ood.md) scored on its held-out test images against the test
images of the 2 classes it never saw.

For each set: AUROC and FPR at 95% TPR (OOD = positive) of the fitted score and of the max
softmax, the share of in-distribution images flagged at the model's threshold, and the cost
of the score at batch 1. ``--variants`` also compares feature choices fitted on the training
split (the last layer alone, with and without the patch tokens' mean; each block alone), to
show why the shipped score is the one it is.

Usage:
    python scripts/ood_eval.py [--model fashion-mnist] [--near runs/fm8/model] [--variants]
        [--json docs/results/ood.json]

Needs scikit-learn, scikit-image and matplotlib for their bundled images (``pip install
scikit-learn scikit-image matplotlib``) and Fashion-MNIST at /usr/share/datasets/fashion-mnist
(Debian's ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from deit.inference import Classifier
from deit.ood import Taps, auroc, fit_features, fpr_at_tpr, l2_normalise
from deit.train.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from deit.transforms import preprocess_image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "fixtures" / "images"
HELD_OUT = "held out (v3): textures and science images (crops of 10)"
HELD_OUT_WHOLE = "held out (v4): other whole images (whole + large crops)"


def package_images() -> list[Path]:
    """Every whole image that scikit-image, scikit-learn and matplotlib bundle, except the
    sample photos (tests/fixtures/images), the right view of the sample motorcycle's stereo
    pair (the same photo, shifted) and the 8-pixel chessboards."""
    import matplotlib
    import skimage
    import sklearn

    folders = [
        Path(skimage.__file__).parent / "data",
        Path(sklearn.__file__).parent / "datasets" / "images",
        Path(matplotlib.__file__).parent / "mpl-data" / "sample_data",
    ]
    samples = {p.name for p in PHOTOS.iterdir()}
    return sorted(
        p
        for folder in folders
        for p in folder.iterdir()
        if p.suffix in (".png", ".jpg", ".gif")
        and p.name not in samples
        and p.name != "motorcycle_right.png"
        and not p.name.startswith("chessboard")
    )


def rgb(paths: list[Path]) -> list[np.ndarray]:
    """The images at ``paths`` as RGB arrays."""
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def crops(
    images: list[np.ndarray],
    count: int,
    seed: int,
    share: tuple[float, float] = (0.1, 0.6),
    square: bool = True,
) -> list[Image.Image]:
    """``count`` random crops spread over ``images``: square, with a side of ``share`` of the
    shorter side; or (``square=False``) each side ``share`` of the image's."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        if square:
            ch = cw = int(rng.uniform(*share) * min(h, w))
        else:
            ch, cw = int(rng.uniform(*share) * h), int(rng.uniform(*share) * w)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out.append(Image.fromarray(img[y : y + ch, x : x + cw]))
    return out


def whole_and_large_crops(images: list[np.ndarray], count: int, seed: int) -> list[Image.Image]:
    """Each image whole, then ``count`` crops spread over them, each side 60-100% of the
    image's (any aspect ratio)."""
    return [Image.fromarray(a) for a in images] + crops(images, count, seed, (0.6, 1), False)


def ood_sets(seed: int = 0) -> dict[str, list[Image.Image]]:
    """The far and glyph sets, as PIL images (each set built from real data on this machine,
    except noise)."""
    import skimage.data
    from sklearn.datasets import load_digits

    photos = rgb(sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg", ".gif")))
    rng = np.random.default_rng(seed)
    faces = skimage.data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    digits = load_digits().images  # 1797 images, 8x8, values 0..16
    noise = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(200)]
    blobs = []
    for _ in range(200):
        small = rng.normal(size=(7, 7))
        big = np.asarray(Image.fromarray(small.astype(np.float32)).resize((28, 28)))
        blobs.append(
            Image.fromarray(np.clip((big - big.min()) / np.ptp(big) * 255, 0, 255).astype(np.uint8))
        )
    text = [skimage.data.page(), skimage.data.text()]
    science = [
        getattr(skimage.data, name)()
        for name in (
            "brick",
            "grass",
            "gravel",
            "moon",
            "coins",
            "hubble_deep_field",
            "clock",
            "horse",
            "cell",
            "microaneurysms",
        )
    ]
    science = [
        (a.astype(np.uint8) * 255 if a.dtype == bool else a) for a in map(np.asarray, science)
    ]
    return {
        "photos (crops of 8 photos)": crops(photos, 400, seed),
        "whole photos (the 8 whole + 192 large crops)": whole_and_large_crops(
            photos, 192, seed + 3
        ),
        "faces (LFW subset)": [Image.fromarray((f * 255).astype(np.uint8)) for f in faces],
        "noise (uniform + smooth blobs)": noise + blobs,
        "handwritten digits (sklearn)": [
            Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((28, 28)) for d in digits
        ],
        "printed text (crops of page, text)": crops(text, 300, seed + 1),
        HELD_OUT: crops(science, 400, seed + 7),
        HELD_OUT_WHOLE: whole_and_large_crops(rgb(package_images()), 200, seed + 11),
    }


def fashion(
    split: str, rows: slice | np.ndarray, keep: list[int] | None = None
) -> tuple[list[Image.Image], np.ndarray]:
    """Fashion-MNIST images of ``split`` (rows, then only classes ``keep``) and their labels."""
    x, y = load_fashion_mnist(split)
    x, y = x[rows], y[rows]
    if keep is not None:
        mask = np.isin(y.numpy(), keep)
        x, y = x[torch.from_numpy(mask)], y[torch.from_numpy(mask)]
    return [Image.fromarray(a[0].numpy()) for a in x], y.numpy()


@torch.no_grad()
def token_parts(clf: Classifier, images: list[Image.Image], batch: int = 500) -> torch.Tensor:
    """Every block's class token, distillation token (the class token again in a model
    without one), and the patch tokens' mean, mean square, standard deviation and mean
    absolute value, as they are (N, depth, 6, D), the images preprocessed as
    ``Classifier.predict`` does: the variants are made of these."""
    model = clf.loaded.model.eval()
    k = Taps.of(model).num_prefix  # type: ignore[arg-type]
    blocks = tuple(range(model.config.depth))  # type: ignore[union-attr]
    out = []
    for s in range(0, len(images), batch):
        x = torch.stack(
            [preprocess_image(im, clf.loaded.preprocess) for im in images[s : s + batch]]
        )
        tokens = model(x, output_blocks=blocks).block_outputs
        rows = []
        for t in tokens:
            p = t[:, k:]
            moments = [p.mean(1), p.square().mean(1), p.std(1), p.abs().mean(1)]
            rows.append(torch.stack([t[:, 0], t[:, k - 1], *moments], 1))
        out.append(torch.stack(rows, 1))
    return torch.cat(out)


PARTS = {  # what a variant reads at a block, from token_parts' rows
    "tokens": lambda r: (r[..., 0, :] + r[..., 1, :]) / 2,  # shipped: the two tokens' mean
    "class": lambda r: r[..., 0, :],
    "distillation": lambda r: r[..., 1, :],
    "patches": lambda r: r[..., 2, :],  # shipped: the patches' mean
    "squares": lambda r: r[..., 3, :],  # shipped: the patches' mean square
    "spread": lambda r: r[..., 4, :],
    "absolute": lambda r: r[..., 5, :],
}
SHIPPED_PARTS = ("tokens", "patches", "squares")
Variant = tuple[Taps, Callable[[torch.Tensor], torch.Tensor]]


def feature_variants(clf: Classifier) -> dict[str, Variant]:
    """The alternatives compared, each the taps it stands for and how its features come
    from :func:`token_parts`: all blocks, the shipped taps, the shipped blocks without the
    patches' mean square (the score before this one) or with another moment in its place,
    the last layer alone (the first score read its two tokens), each block alone, three
    blocks spread evenly and the middle and last (earlier scores), the tokens read otherwise
    (both apart, as two scores ago; either alone), and the shipped features without their
    L2 normalisation. Each is fitted like the shipped score (per-layer standardised sum)."""
    model = clf.loaded.model
    k = Taps.of(model).num_prefix  # type: ignore[arg-type]
    depth = model.config.depth  # type: ignore[union-attr]
    last, shipped = depth - 1, Taps.of(model).blocks  # type: ignore[arg-type]

    def variant(
        blocks: tuple[int, ...],
        parts: tuple[str, ...] = SHIPPED_PARTS,
        normalise: bool = True,
    ) -> Variant:
        def read(raw: torch.Tensor) -> torch.Tensor:
            picked = raw[:, list(blocks)]
            each = [PARTS[p](picked) for p in parts]
            return torch.stack([l2_normalise(v) if normalise else v for v in each], 2).flatten(1)

        return Taps(k, blocks), read

    out = {
        f"every block {tuple(range(depth))}": variant(tuple(range(depth))),
        f"shipped: blocks {shipped}": variant(shipped),
        f"blocks {shipped} without the patches' mean square (the score before this one)": variant(
            shipped, ("tokens", "patches")
        ),
        f"blocks {shipped}, the patches' spread (std) in place of their mean square": variant(
            shipped, ("tokens", "patches", "spread")
        ),
        f"blocks {shipped}, the patches' mean |x| in place of their mean square": variant(
            shipped, ("tokens", "patches", "absolute")
        ),
        f"blocks {shipped}, the patches' mean square in place of their mean": variant(
            shipped, ("tokens", "squares")
        ),
        "last layer, class + distillation tokens apart (the first score)": variant(
            (last,), ("class", "distillation")
        ),
        "last layer alone": variant((last,)),
    }
    for b in range(depth - 1):
        out[f"block {b} alone"] = variant((b,))
    three = tuple(round((i + 1) * depth / 3) - 1 for i in range(3))
    out[f"three blocks {three}"] = variant(three)
    middle = (depth // 2 - 1, last)
    out[f"blocks {middle}"] = variant(middle)
    if k == 2:
        for name, parts in (
            ("both tokens apart", ("class", "distillation")),
            ("the class token alone", ("class",)),
            ("the distillation token alone", ("distillation",)),
        ):
            out[f"blocks {shipped}, {name}"] = variant(shipped, (*parts, "patches", "squares"))
    out[f"shipped blocks {shipped}, not L2-normalised"] = variant(shipped, normalise=False)
    return out


def batch1_cost(clf: Classifier, path: Path, runs: int = 300) -> dict[str, float]:
    """Median ms at batch 1, interleaved: the model's logits alone, logits + score, and the
    whole prediction of the image file at ``path`` (decode, preprocess, model, score)."""
    from deit.images import load_image

    x = preprocess_image(load_image(str(path)), clf.loaded.preprocess)[None]
    steps = {
        "logits": lambda: clf.logits(x),
        "with_score": lambda: clf.logits_and_ood(x),
        "predict": lambda: clf.predict(str(path), batch_size=1),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(runs + 20):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= 20:
                times[name].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    score = ms["with_score"] - ms["logits"]
    return {
        "logits_ms": ms["logits"],
        "with_score_ms": ms["with_score"],
        "predict_ms": ms["predict"],
        "overhead_of_logits": score / ms["logits"],
        "share_of_predict": score / ms["predict"],
    }


def cost_breakdown(clf: Classifier, path: Path, runs: int = 500) -> dict[str, float]:
    """Where the score's time goes at batch 1 (median µs, each step timed right after the
    forward pass it follows, as in a prediction): the forward pass asked for the tapped
    blocks against a plain one, the features, the score, the verdicts."""
    assert clf.ood_stats is not None
    model, taps, scorer = clf.model, clf.ood_stats.taps, clf.ood_stats.scorer()
    from deit.images import load_image

    x = preprocess_image(load_image(str(path)), clf.loaded.preprocess)[None]
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for _ in range(runs):
        timed("forward", model, x)
        out = timed("forward_with_taps", model, x, output_blocks=taps.blocks)
        features = timed("features", taps.features, out)
        scores = timed("score", scorer, features)
        timed("verdicts", clf.calibration.verdicts, scores)
    return {k: statistics.median(v[20:]) * 1e6 for k, v in times.items()}


def tiny224_cost(runs: int = 100) -> dict[str, float]:
    """The model card's shape (DeiT-tiny distilled, 224 px, 12 blocks, random weights, the
    score fitted on 32 random images): median ms at batch 1 of the plain forward pass, and
    of the score's own work (features and score) timed right after a forward pass asked for
    the tapped blocks (the difference of two 30 ms medians is noisier than the score)."""
    from deit.config import VARIANTS
    from deit.model import DeiT
    from deit.ood import fit_ood

    model = DeiT(VARIANTS["deit_tiny_distilled_patch16_224"]).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 224, 224, generator=g), torch.arange(16) % 4)] * 2
    stats = fit_ood(model, batches, batches[:1])
    scorer, taps = stats.scorer(), stats.taps
    x = torch.randn(1, 3, 224, 224, generator=g)
    forward, score = [], []
    for i in range(runs + 5):
        t0 = time.perf_counter()
        model(x)
        t1 = time.perf_counter()
        out = model(x, output_blocks=taps.blocks)
        t2 = time.perf_counter()
        scorer(taps.features(out))
        t3 = time.perf_counter()
        if i >= 5:
            forward.append(t1 - t0)
            score.append(t3 - t2)
    ms = statistics.median(forward) * 1e3, statistics.median(score) * 1e3
    return {"logits_ms": ms[0], "score_ms": ms[1], "overhead_of_logits": ms[1] / ms[0]}


def rows_for(
    clf: Classifier,
    in_images: list[Image.Image],
    sets: dict[str, list[Image.Image]],
    fit: tuple[torch.Tensor, np.ndarray] | None,
) -> list[dict[str, Any]]:
    """One row per OOD set: the shipped score through ``Classifier``, the max softmax, and
    (with ``fit`` = every-block training features and labels) the feature variants."""
    in_results = clf.predict(in_images, top_k=1, batch_size=500)
    in_scores = [r.ood.score for r in in_results]
    in_msp = [1 - r[0].score for r in in_results]
    flagged = float(np.mean([r.ood.unusual for r in in_results]))
    scorers: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Any]] = {}
    if fit is not None:
        fit_x, fit_y = fit
        in_x = token_parts(clf, in_images)
        for name, (taps, read) in feature_variants(clf).items():
            stats = fit_features(
                read(fit_x),
                torch.from_numpy(fit_y),
                read(in_x[:1]),  # the threshold is not used here
                clf.loaded.config.num_classes,
                taps,
            )
            scorers[name] = (read, stats.scorer())
    rows = []
    for name, images in sets.items():
        t0 = time.perf_counter()
        results = clf.predict(images, top_k=1, batch_size=500)
        seconds = time.perf_counter() - t0
        scores, msp = [r.ood.score for r in results], [1 - r[0].score for r in results]
        row: dict[str, Any] = {
            "set": name,
            "n_in": len(in_scores),
            "n_out": len(scores),
            "auroc": auroc(in_scores, scores),
            "fpr95": fpr_at_tpr(in_scores, scores),
            "msp_auroc": auroc(in_msp, msp),
            "msp_fpr95": fpr_at_tpr(in_msp, msp),
            "in_flagged": flagged,
            "out_flagged": float(np.mean([r.ood.unusual for r in results])),
            "predict_s_per_image": seconds / len(images),
        }
        if scorers:
            out_x = token_parts(clf, images)
            for variant, (read, scorer) in scorers.items():
                a, b = scorer(read(in_x)), scorer(read(out_x))
                row[f"auroc[{variant}]"] = auroc(a, b)
        rows.append(row)
    return rows


def near_case(model: str) -> tuple[Classifier, list[Image.Image], dict[str, list[Image.Image]]]:
    """The 8-class model: in distribution its 8 classes' test images 500-999 of each class
    (images 0-499 set its threshold); out, all 2,000 test images of the 2 held-out classes."""
    clf = Classifier.from_pretrained(model, device="cpu")
    names = {n.lower().replace("/", "-") for n in clf.labels}
    keep = [i for i, n in enumerate(FASHION_MNIST_CLASSES) if n.lower().replace("/", "-") in names]
    held = [i for i in range(10) if i not in keep]
    _, y = load_fashion_mnist("test")
    later = np.concatenate([np.nonzero(y.numpy() == c)[0][500:] for c in keep])
    in_images, _ = fashion("test", np.sort(later))
    out_images, _ = fashion("test", slice(None), held)
    held_names = ", ".join(FASHION_MNIST_CLASSES[i] for i in held)
    return clf, in_images, {f"near: held-out classes ({held_names})": out_images}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| OOD set | n in / out | AUROC (score) | AUROC (MSP) | FPR@95 (score) | FPR@95 (MSP) "
        "| ID flagged | OOD flagged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {r['n_in']} / {r['n_out']} | {100 * r['auroc']:.1f} | "
            f"{100 * r['msp_auroc']:.1f} | {100 * r['fpr95']:.1f} | {100 * r['msp_fpr95']:.1f} | "
            f"{100 * r['in_flagged']:.1f}% | {100 * r['out_flagged']:.1f}% |"
        )
    return "\n".join(lines)


def rounds_of(clf: Classifier, path: Path, rounds: int = 5) -> dict[str, Any]:
    """:func:`batch1_cost` in ``rounds`` separate rounds of 500 runs (a shared machine's speed
    drifts between rounds more than within one): each entry's median over the rounds, and
    every round's share of the prediction."""
    each = [batch1_cost(clf, path, runs=500) for _ in range(rounds)]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in each) for k in each[0]}
    out["share_of_predict_rounds"] = [r["share_of_predict"] for r in each]
    return out


def measure_costs(clf: Classifier, near: str | None, json_path: str | None) -> None:
    """The cost entries alone, merged into ``json_path``: each model on one of its own 28 px
    samples (the smallest, cheapest prediction: the score's largest share), and the embedded
    model on a photo (the sample cat, 451 x 300 PNG)."""
    sample = sorted((REPO / "samples" / "fashion-mnist").glob("*.png"))[0]
    result = json.loads(Path(json_path).read_text()) if json_path else {}
    result["cost"] = rounds_of(clf, sample)
    result["cost_photo"] = rounds_of(clf, PHOTOS / "chelsea.png")  # a photo as users send one
    if near:
        result["near_cost"] = rounds_of(Classifier.from_pretrained(near, device="cpu"), sample)
    result["cost_breakdown_embedded_us"] = cost_breakdown(clf, sample)
    result["cost_deit_tiny_distilled_224"] = [tiny224_cost() for _ in range(2)]
    print(json.dumps({k: v for k, v in result.items() if "cost" in k}, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fashion-mnist", help="the model with fitted statistics")
    p.add_argument("--near", help="the model trained on 8 Fashion-MNIST classes (calibrated)")
    p.add_argument(
        "--variants",
        type=int,
        default=0,
        metavar="N",
        help="also compare feature choices, fitted on N training images",
    )
    p.add_argument("--json", help="write every number here")
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="only measure the costs (on a quiet machine), updating the --json file's entries",
    )
    args = p.parse_args()
    torch.set_grad_enabled(False)
    clf = Classifier.from_pretrained(args.model, device="cpu")
    if args.cost_only:
        measure_costs(clf, args.near, args.json)
        return
    in_images, _ = fashion("test", slice(5000, None))
    fit = None
    if args.variants:
        train_images, train_labels = fashion("train", slice(0, args.variants))
        fit = (token_parts(clf, train_images), train_labels)
    result: dict[str, Any] = {
        "model": args.model,
        "method": clf.calibration.method,
        "threshold": clf.calibration.threshold,
    }
    result["far"] = rows_for(clf, in_images, ood_sets(), fit)
    sample = sorted((REPO / "samples" / "fashion-mnist").glob("*.png"))[0]
    result["cost"] = batch1_cost(clf, sample)
    print(table(result["far"]))
    if args.near:
        near_clf, near_in, near_out = near_case(args.near)
        near_fit = None
        if args.variants:
            names = [n.lower().replace("/", "-") for n in near_clf.labels]
            index = {
                i: names.index(n.lower().replace("/", "-"))
                for i, n in enumerate(FASHION_MNIST_CLASSES)
                if n.lower().replace("/", "-") in names
            }
            images, labels = fashion("train", slice(0, args.variants), sorted(index))
            near_fit = (token_parts(near_clf, images), np.array([index[c] for c in labels]))
        result["near"] = rows_for(near_clf, near_in, near_out, near_fit)
        result["near_cost"] = batch1_cost(near_clf, sample)
        print(table(result["near"]))
    print(json.dumps({k: v for k, v in result.items() if "cost" in k}, indent=1))
    for row in result["far"] + result.get("near", []):
        print(row["set"], {k: round(v, 4) for k, v in row.items() if k.startswith("auroc[")})
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
