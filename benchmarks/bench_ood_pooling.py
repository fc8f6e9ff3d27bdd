"""The out-of-distribution score's pooling product at batch 1: broadcast ``pool @ tokens``
against the explicit ``bmm`` that ``deit.ood.layer_features`` uses.

Both give the same features; the time is the score's whole work (features and score) after
a fresh forward pass of the embedded model, which is how a prediction runs it. Two ways,
interleaved in each round: the work alone (median of ``--runs``), and the whole prediction's
share, as ``scripts/ood_eval.py`` measures it (``batch1_cost``).

    python benchmarks/bench_ood_pooling.py --rounds 6

Results: docs/results/ood.md (Cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

import deit.ood as ood
from deit.images import load_image
from deit.inference import Classifier
from deit.transforms import preprocess_image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from ood_eval import batch1_cost  # noqa: E402

Features = Callable[[Sequence[Tensor], int], Tensor]


def broadcast(blocks: Sequence[Tensor], num_prefix: int) -> Tensor:
    """``layer_features`` with the broadcast product (the code before 2026-12-07, evening)."""
    tokens = torch.cat(list(blocks), -2).float()
    parts = ood._pooling(num_prefix, blocks[0].shape[-2], len(blocks)) @ tokens
    norms = torch.linalg.vector_norm(parts, dim=-1, keepdim=True).clamp_min(1e-12)
    return (parts / norms).flatten(-2)


def work_us(clf: Classifier, x: Tensor, variants: dict[str, Features], runs: int) -> dict:
    """Median µs of features + score right after a forward pass, per variant, interleaved."""
    assert clf.ood_stats is not None
    model, taps, scorer = clf.model, clf.ood_stats.taps, clf.ood_stats.scorer()
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for i in range(runs + 20):
            for name, features in variants.items():
                out = model(x, output_blocks=taps.blocks)
                t0 = time.perf_counter()
                scorer(features(out.block_outputs or (), taps.num_prefix))
                if i >= 20:
                    times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--runs", type=int, default=400)
    args = parser.parse_args()
    clf = Classifier.from_pretrained("fashion-mnist", device="cpu")
    sample = sorted((REPO / "samples" / "fashion-mnist").glob("*.png"))[0]
    x = preprocess_image(load_image(str(sample)), clf.loaded.preprocess)[None]
    variants: dict[str, Features] = {"broadcast": broadcast, "bmm": ood.layer_features}
    rounds = []
    for _ in range(args.rounds):
        row: dict[str, dict[str, float]] = {"work_us": work_us(clf, x, variants, args.runs)}
        for name, features in variants.items():
            ood.layer_features = features  # Taps.features reads the module's function
            row[name] = batch1_cost(clf, sample, runs=args.runs)
        ood.layer_features = variants["bmm"]
        rounds.append(row)
        print(json.dumps(row), flush=True)
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
