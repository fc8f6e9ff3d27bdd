"""The out-of-distribution score's cost at batch 1, feature set against feature set.

Three ways to compute the score after the embedded model's forward pass, interleaved in
each round:

- ``two parts``: the score before the patches' mean square (version 3 of the statistics:
  per tapped layer the tokens' mean and the patches' mean, 192 features);
- ``three parts, broadcast``: the shipped features with the pooling as the broadcast
  ``pool @ tokens``;
- ``three parts, bmm``: ``deit.ood.layer_features`` as shipped (the explicit ``bmm``).

Timing does not depend on the matrices' values, so the two-part score uses matrices of its
shape filled at random. Two measures per round: the work alone (features and score right
after a fresh forward pass, median of ``--runs``), and its share of a whole prediction, as
``scripts/ood_eval.py`` measures it (``batch1_cost``).

    python benchmarks/bench_ood_features.py --rounds 6
    python benchmarks/bench_ood_features.py --per-op   # each operation of the shipped score

Results: docs/results/ood.md (Cost).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import deit.ood as ood
from deit.images import load_image
from deit.inference import Classifier
from deit.transforms import preprocess_image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from ood_eval import batch1_cost  # noqa: E402

Features = Callable[[Sequence[Tensor], int], Tensor]
SHIPPED = ood.layer_features


@functools.lru_cache(maxsize=4)
def _two_part_pooling(num_prefix: int, tokens: int, layers: int) -> Tensor:
    pool = torch.zeros(2, tokens)
    pool[0, :num_prefix], pool[1, num_prefix:] = 1 / num_prefix, 1 / (tokens - num_prefix)
    return torch.block_diag(*[pool] * layers)


def two_parts(blocks: Sequence[Tensor], num_prefix: int) -> Tensor:
    """Version 3's features: per layer the prefix tokens' mean and the patches' mean."""
    tokens = torch.cat(list(blocks), -2).float()
    pool = _two_part_pooling(num_prefix, blocks[0].shape[-2], len(blocks))
    return ood.l2_normalise(torch.bmm(pool.expand(tokens.shape[0], -1, -1), tokens)).flatten(-2)


def broadcast(blocks: Sequence[Tensor], num_prefix: int) -> Tensor:
    """The shipped features with the broadcast pooling product."""
    tokens = torch.cat(list(blocks), -2).float()
    tokens = torch.cat([tokens, tokens * tokens], -2)
    pool = ood._pooling(num_prefix, blocks[0].shape[-2], len(blocks))
    return ood.l2_normalise(pool @ tokens).flatten(-2)


def random_score(layers: int, dim: int, classes: int) -> nn.Module:
    """A :class:`deit.ood.LayeredScore` of the given shape with random matrices."""
    g = torch.Generator().manual_seed(0)
    each = [
        ood.MahalanobisScore(
            torch.randn(dim, generator=g),
            torch.randn(dim, dim, generator=g),
            torch.randn(classes, dim, generator=g),
        )
        for _ in range(layers)
    ]
    return ood.LayeredScore(each, torch.ones(layers), torch.ones(layers)).eval()


def work_us(
    clf: Classifier, x: Tensor, variants: dict[str, tuple[Features, nn.Module]], runs: int
) -> dict[str, float]:
    """Median µs of features + score right after a forward pass, per variant, interleaved."""
    assert clf.ood_stats is not None
    model, taps = clf.model, clf.ood_stats.taps
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for i in range(runs + 20):
            for name, (features, scorer) in variants.items():
                out = model(x, output_blocks=taps.blocks)
                t0 = time.perf_counter()
                scorer(features(out.block_outputs or (), taps.num_prefix))
                if i >= 20:
                    times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def per_op_us(clf: Classifier, x: Tensor, runs: int) -> dict[str, float]:
    """Median µs of each operation of the shipped features and score, each timed right
    after the one before it, after a fresh forward pass (as in a prediction)."""
    assert clf.ood_stats is not None
    model, taps, scorer = clf.model, clf.ood_stats.taps, clf.ood_stats.scorer()
    layers, dim = scorer.layers, scorer.dim
    times: dict[str, list[float]] = {}

    def step(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    with torch.inference_mode():
        for _ in range(runs + 20):
            blocks = list(model(x, output_blocks=taps.blocks).block_outputs or ())
            t = step("concatenate the tapped blocks", torch.cat, blocks, -2)
            sq = step("square", torch.mul, t, t)
            both = step("stack tokens and squares", torch.cat, [t, sq], -2)
            tokens = t.shape[1] // layers
            pool = step("pooling matrix", ood._pooling, taps.num_prefix, tokens, layers)
            parts = step("pooling product", torch.bmm, pool.expand(1, -1, -1), both)
            norm = step("norms", torch.linalg.vector_norm, parts, dim=-1, keepdim=True)
            norm = step("floor", torch.clamp_min, norm, 1e-12)
            f = step("divide", torch.div, parts, norm)
            f = step("reshape", lambda v: v.reshape(-1, layers, dim).permute(1, 2, 0), f)
            out = step("score product", torch.baddbmm, scorer.bias, scorer.matrix, f)
            near = step("nearest class", torch.amin, out[:, dim:], 1)
            sqn = step("squared norms", torch.linalg.vecdot, out[:, :dim], out[:, :dim], dim=1)
            score = step("sum", lambda a, b: (a + b).sum(0), near, sqn)
            step("verdicts", clf.calibration.verdicts, score)
    return {k: statistics.median(v[20:]) * 1e6 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument(
        "--per-op", action="store_true", help="time each operation of the shipped score instead"
    )
    args = parser.parse_args()
    clf = Classifier.from_pretrained("fashion-mnist", device="cpu")
    stats = clf.ood_stats
    assert stats is not None
    sample = sorted((REPO / "samples" / "fashion-mnist").glob("*.png"))[0]
    x = preprocess_image(load_image(str(sample)), clf.loaded.preprocess)[None]
    if args.per_op:
        print(json.dumps(per_op_us(clf, x, 2 * args.runs), indent=1))
        return
    width = clf.loaded.config.embed_dim
    variants: dict[str, tuple[Features, nn.Module]] = {
        "two parts": (two_parts, random_score(len(stats.layers), 2 * width, stats.classes)),
        "three parts, broadcast": (broadcast, stats.scorer()),
        "three parts, bmm": (SHIPPED, stats.scorer()),
    }
    shipped_scorer = clf._ood_scorer
    rounds = []
    try:
        for _ in range(args.rounds):
            row: dict[str, dict[str, float]] = {"work_us": work_us(clf, x, variants, args.runs)}
            for name, (features, scorer) in variants.items():
                ood.layer_features = features  # Taps.features reads the module's function
                clf._ood_scorer = scorer
                row[name] = batch1_cost(clf, sample, runs=args.runs)
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        ood.layer_features, clf._ood_scorer = SHIPPED, shipped_scorer
    summary = {
        name: {
            "work_us": statistics.median(r["work_us"][name] for r in rounds),
            "share_of_predict": statistics.median(r[name]["share_of_predict"] for r in rounds),
        }
        for name in variants
    }
    print(json.dumps({"median_over_rounds": summary}, indent=1))


if __name__ == "__main__":
    main()
