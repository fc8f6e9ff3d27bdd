"""How much can the heads alone gain on a task whose classes the model already knows?

For a scenario folder (``train/``, ``val/``, ``test/``, class folders named like the
embedded model's labels, as ``scripts/finetune_scenarios.py`` builds (a) and (c)): the
model's features are frozen (class and distillation tokens after the final norm), both
heads' rows for the folder's classes start from the model's own, and are refitted on the
training images by L-BFGS with an L2 pull towards those starting rows (``lam``; 0 = a free
refit from the old rows, large = the old rows) or with their biases alone. The zero-shot
accuracy (the model restricted to the folder's classes) is the reference; every variant's
validation and test top-1 is printed, so the best is visible with hindsight.

Usage::

    python scripts/head_refit_check.py /tmp/ftsc3/data/a [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from finetune_scenarios import matched_columns, read_folder  # this script's directory
from torch import Tensor

from deit.checkpoints import LoadedModel, load_model
from deit.images import load_image
from deit.transforms import preprocess_image

STRENGTHS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
Split = tuple[Tensor, Tensor, Tensor, Tensor]  # class token, distillation token, label, logits


def top1(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def read_split(folder: Path, loaded: LoadedModel, columns: Tensor) -> Split:
    """The frozen features of every image in ``folder``, its labels and the zero-shot logits
    (the model's ``columns``, one per folder class)."""
    model = loaded.model.eval()
    _, files, labels = read_folder(folder)
    images = [preprocess_image(load_image(f), loaded.preprocess) for f in files]
    out = model(torch.stack(images), output_blocks=(model.config.depth - 1,))
    assert out.block_outputs is not None and out.cls_logits is not None
    assert out.dist_logits is not None
    tokens = out.block_outputs[-1]  # after the final norm: what the heads read
    logits = (out.cls_logits + out.dist_logits)[:, columns] / 2
    return tokens[:, 0], tokens[:, 1], torch.from_numpy(labels), logits


def refit(train: Split, start: list[Tensor], lam: float, biases_only: bool = False) -> list[Tensor]:
    """Both heads' rows refitted on ``train`` from ``start`` (W, b, V, c), pulled towards it."""
    params = [p.clone().requires_grad_(True) for p in start]
    w, b, v, c = params
    cls, dist, labels, _ = train
    opt = torch.optim.LBFGS(
        [b, c] if biases_only else params, max_iter=300, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(cls @ w.T + b, labels) + F.cross_entropy(dist @ v.T + c, labels)
        pull = lam * ((w - start[0]).square().sum() + (v - start[2]).square().sum())
        total = loss / 2 + pull
        total.backward()
        return total

    opt.step(closure)
    return [p.detach() for p in params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="a folder with train/, val/ and test/")
    parser.add_argument("--model", default="fashion-mnist")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    loaded = load_model(args.model)
    classes, _, _ = read_folder(args.data / "train")
    try:
        columns = matched_columns(classes, loaded.labels, args.model)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    splits = {s: read_split(args.data / s, loaded, columns) for s in ("train", "val", "test")}
    model = loaded.model
    assert model.head_dist is not None, "the check reads both heads of a distilled DeiT"
    start = [
        model.head.weight[columns].detach(),
        model.head.bias[columns].detach(),
        model.head_dist.weight[columns].detach(),
        model.head_dist.bias[columns].detach(),
    ]

    def scored(rows: list[Tensor]) -> dict[str, float]:
        w, b, v, c = rows
        return {
            s: top1((cls @ w.T + b + dist @ v.T + c) / 2, y)
            for s, (cls, dist, y, _) in splits.items()
            if s != "train"
        }

    results = {"zero-shot": {s: top1(sp[3], sp[2]) for s, sp in splits.items() if s != "train"}}
    results["biases only"] = scored(refit(splits["train"], start, 0.0, biases_only=True))
    for lam in STRENGTHS:
        results[f"rows, pull {lam:g}"] = scored(refit(splits["train"], start, lam))
    for name, r in results.items():
        print(f"{name:>16}: val {r['val']:.2f}  test {r['test']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
