"""The linear probe of LP-FT: fit the new head rows on frozen features before fine-tuning.

Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution" (ICLR 2022): when a new head starts at random, the first steps of full
fine-tuning push large, noisy gradients through the pretrained body and distort its features.
Fitting the head first, on the body's frozen features, and only then fine-tuning everything
keeps the features better, in and out of distribution.

:func:`linear_probe` runs one pass of the training batches through the frozen student (eval
mode, no gradients), keeps the normalised class-token (and distillation-token) features, and
fits each head's *new* rows by multinomial logistic regression (full-batch L-BFGS with an L2
penalty) while the rows matched by name to the initial model's labels stay as they are, so the
classes the model knew keep their knowledge and the new ones get a head that already separates
them. The fit is on features only: a few seconds for thousands of images.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deit.labels import label_map
from deit.model import DeiT

MAX_PROBE_IMAGES = 20_000  # features of at most this many training images are fitted on
L2 = 1e-3  # weight of the penalty on the new rows (mean cross-entropy + L2 * ||W_new||^2)
ITERATIONS = 100  # L-BFGS iterations (one full-batch pass over the features each)


@dataclass
class ProbeResult:
    """What the probe did, for the log."""

    images: int  # training images whose features were fitted on
    new_rows: int  # rows fitted per head
    heads: int  # heads fitted (1, or 2 with a distillation head)
    accuracy_before: float  # training accuracy of the (averaged) heads before the fit
    accuracy_after: float  # ... and after
    seconds: float  # wall time of the fit

    def __str__(self) -> str:
        return (
            f"linear probe: {self.new_rows} new head rows (of {self.heads} "
            f"head{'s' if self.heads > 1 else ''}) fitted on the frozen features of "
            f"{self.images} training images in {self.seconds:.1f} s; training accuracy "
            f"{100 * self.accuracy_before:.1f}% -> {100 * self.accuracy_after:.1f}%"
        )


@torch.no_grad()
def token_features(
    model: DeiT, batches: Iterable[tuple[Tensor, Tensor]], limit: int = MAX_PROBE_IMAGES
) -> tuple[Tensor, Tensor]:
    """The final-norm features of the prefix tokens the heads read, and the labels.

    Returns:
        features (N, heads, D) in float32 (index 0: class token, 1: distillation token) and
        labels (N,).
    """
    was_training = model.training
    model.eval()
    heads = 2 if model.head_dist is not None else 1
    feats, labels, seen = [], [], 0
    for x, y in batches:
        tokens = model.forward_features(x)[0]  # (B, prefix + N, D)
        feats.append(tokens[:, :heads].float().cpu())
        labels.append(y.cpu())
        seen += len(y)
        if seen >= limit:
            break
    model.train(was_training)
    if not feats:
        raise ValueError("the linear probe found no training images")
    return torch.cat(feats)[:limit], torch.cat(labels)[:limit]


def fit_rows(
    layer: nn.Linear, feats: Tensor, labels: Tensor, new_rows: Sequence[int], l2: float = L2
) -> None:
    """Fit ``layer``'s ``new_rows`` (weight and bias) by logistic regression on ``feats``.

    The other rows are constants of the fit: the cross-entropy runs over all of the layer's
    logits, so the new classes are placed against the kept ones, not in isolation.
    """
    rows = torch.tensor(list(new_rows), dtype=torch.long)
    w0, b0 = layer.weight.detach().float().cpu(), layer.bias.detach().float().cpu()
    w = w0[rows].clone().zero_().requires_grad_(True)
    b = b0[rows].clone().zero_().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=ITERATIONS, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        weight = w0.index_put((rows,), w)
        bias = b0.index_put((rows,), b)
        loss = F.cross_entropy(feats @ weight.T + bias, labels) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        layer.weight[rows] = w.detach().to(layer.weight)
        layer.bias[rows] = b.detach().to(layer.bias)


def _accuracy(model: DeiT, feats: Tensor, labels: Tensor) -> float:
    layers = [model.head] + ([model.head_dist] if model.head_dist is not None else [])
    with torch.no_grad():
        logits = sum(
            feats[:, k] @ layer.weight.float().cpu().T + layer.bias.float().cpu()
            for k, layer in enumerate(layers)
        )
    assert isinstance(logits, Tensor)
    return (logits.argmax(1) == labels).float().mean().item()


def linear_probe(
    model: DeiT, batches: Iterable[tuple[Tensor, Tensor]], new_rows: Sequence[int]
) -> ProbeResult:
    """Fit the ``new_rows`` of ``model``'s heads on its frozen features (in place).

    Args:
        model: the student, heads already holding the rows matched by name.
        batches: ``(images, labels)`` training batches on the model's device.
        new_rows: the class indices whose rows are new (every row when nothing matched).
    """
    t0 = time.perf_counter()
    feats, labels = token_features(model, batches)
    before = _accuracy(model, feats, labels)
    layers = [model.head] + ([model.head_dist] if model.head_dist is not None else [])
    for k, layer in enumerate(layers):
        fit_rows(layer, feats[:, k], labels, new_rows)
    after = _accuracy(model, feats, labels)
    seconds = time.perf_counter() - t0
    return ProbeResult(len(labels), len(new_rows), len(layers), before, after, seconds)


def new_rows(labels: Sequence[str], old_labels: Sequence[str] | None) -> list[int]:
    """The classes whose head rows do not come from the initial model: those whose names match
    none of ``old_labels`` (:func:`deit.labels.label_map`); every class without an initial
    model (``old_labels`` None)."""
    if old_labels is None:
        return list(range(len(labels)))
    matched = label_map(labels, list(old_labels))
    return [i for i in range(len(labels)) if i not in matched]


# --------------------------------------------------------------------------- flips

FLIP_CHECK_IMAGES = 600  # training images the flip check reads (half fitted, half scored)
FLIP_Z = 2.0  # flips change the classes when the flipped images are this significantly worse


@dataclass
class FlipCheck:
    """Whether mirroring an image changes its class, judged by a linear probe on the initial
    model's frozen features (or, with no model to start from, on the pixels): fitted on half
    of a sample of the training images, scored on the other half as they are and mirrored
    left-right."""

    images: int  # scored images
    accuracy: float  # on them as they are
    flipped_accuracy: float  # on the same images mirrored
    z: float  # McNemar's statistic: (right only unflipped - right only flipped) / sqrt(sum)
    on: str  # what the probe read: "the initial model's features" or "the pixels"

    @property
    def changes_classes(self) -> bool:
        return self.z > FLIP_Z

    def describe(self) -> str:
        return (
            f"a linear probe on {self.on} gets {self.accuracy:.1%} of "
            f"{self.images} held-out training images right and {self.flipped_accuracy:.1%} of "
            f"the same images mirrored (McNemar z = {self.z:.1f})"
        )


@torch.no_grad()
def flip_check(model: DeiT | None, pixels: Tensor, labels: Tensor) -> FlipCheck:
    """:class:`FlipCheck` on preprocessed ``pixels`` (N, C, H, W) and their ``labels``: a
    seeded random half fits the probe (every row new), the other half is scored. The probe
    reads ``model``'s normalised token features, or the centred, normalised pixels when
    ``model`` is None (a run from scratch)."""

    def features(x: Tensor) -> Tensor:
        if model is None:
            return F.normalize(x.flatten(1) - x.flatten(1).mean(1, keepdim=True), dim=-1)
        tokens, _ = token_features(model, zip(x.split(256), labels.split(256)), len(labels))
        return F.normalize(tokens, dim=-1).flatten(1)

    plain, mirrored = features(pixels), features(pixels.flip(-1))
    classes = int(labels.max()) + 1
    probe = nn.Linear(plain.shape[1], classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    fit, scored = order[: len(order) // 2], order[len(order) // 2 :]
    with torch.enable_grad():
        fit_rows(probe, plain[fit], labels[fit], range(classes))
    truth = labels[scored]
    right = probe(plain[scored]).argmax(1) == truth
    right_flipped = probe(mirrored[scored]).argmax(1) == truth
    only_plain = int((right & ~right_flipped).sum())
    only_flipped = int((right_flipped & ~right).sum())
    z = (only_plain - only_flipped) / max(1.0, (only_plain + only_flipped) ** 0.5)
    on = "the pixels" if model is None else "the initial model's features"
    return FlipCheck(
        len(truth), right.float().mean().item(), right_flipped.float().mean().item(), z, on
    )
