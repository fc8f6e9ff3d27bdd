"""Out-of-distribution scores: how unlike the training data an image is.

A classifier answers with one of its classes whatever it is shown; this module adds a second
number, ``score`` (higher = less like the training data), and a verdict, ``unusual``.

- **Fitted** (``mahalanobis-layers``): class-conditional Mahalanobis distances with one shared
  covariance per layer (OpenOOD v1.5 ranks Mahalanobis on L2-normalised features first among
  post-hoc scores on ViTs), read at several depths of the network as in Lee et al. (NeurIPS
  2018): early blocks see what the image is made of (strokes, textures, noise), the last one
  what it shows. At each tapped block (:func:`tapped_blocks`: one a quarter of the way in
  and the last, read through the final norm) the features are the mean of the class and
  distillation tokens (the class token alone in a model without one: the tokens the heads
  read, averaged as the model averages its heads), the mean of the patch tokens and their
  mean square (the second moment: with it, whole photos that the mean takes for a bag are
  caught), each L2-normalised, concatenated. Each layer's squared distance to its nearest
  class mean, per feature dimension, is standardised by its mean and spread on the training
  images; the score is their sum. The threshold accepts :data:`ACCEPT_RATE` (95%) of
  held-out in-distribution images. :func:`fit_ood` fits it from labelled batches;
  :meth:`OODStats.save` writes it beside the weights as ``ood.safetensors`` (tensors + a JSON
  header); :mod:`deit.ood_file` reads it back after checking every declared size.
- **Uncalibrated** (``msp-uncalibrated``): models without fitted statistics (published
  checkpoints) get ``1 - max softmax`` and are called unusual when no class reaches half the
  probability. Nothing was measured for them, and the method name says so.

:class:`LayeredScore` is a plain module (small matrix products, a min and a sum per layer), so
exporters put it in the graph as a second output (:class:`ScoredLogits`) and an ``.onnx`` or
OpenVINO file gives the same score as the eager model.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deit.errors import UsageError
from deit.model import DeiT, DeiTOutput, Head, HeadLogits, head_logits
from deit.runtime import atomic_path

OOD_FILE = "ood.safetensors"  # beside config.json and model.safetensors
FORMAT = "deit-ood"
VERSION = 4  # 1: one layer; 2: the tokens apart; 3: no second moment (refit: deit calibrate)
MAHALANOBIS = "mahalanobis-layers"
MSP_UNCALIBRATED = "msp-uncalibrated"
MSP_THRESHOLD = 0.5  # uncalibrated: unusual when the top class has under half the probability
ACCEPT_RATE = 0.95  # the threshold accepts this share of held-out in-distribution images
OUTPUT_NAME = "ood_score"  # the exported graphs' second output
METADATA_KEY = "deit.ood"  # exported files: the JSON of OODStats.describe()

PARTS = 3  # per tapped layer: the prefix tokens' mean, the patches' mean and mean square
LAYER_TENSORS = ("center", "whiten", "means")  # stored per layer as NAME.i


@dataclass(frozen=True)
class OODResult:
    """One image's out-of-distribution verdict (``to_dict()`` is what ``--json`` prints)."""

    score: float
    unusual: bool
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Calibration:
    """How scores become verdicts: the method's name and the threshold above which an
    image is unusual."""

    method: str
    threshold: float

    def verdicts(self, scores: Tensor) -> list[OODResult]:
        """One :class:`OODResult` per score."""
        return [OODResult(s, s > self.threshold, self.method) for s in scores.tolist()]


UNCALIBRATED = Calibration(MSP_UNCALIBRATED, MSP_THRESHOLD)


def tapped_blocks(depth: int) -> tuple[int, ...]:
    """The blocks whose outputs the score reads: one a quarter of the way in and the last
    (depth 6: 1, 5; depth 12: 3, 11; depth 2: 0, 1). On the embedded model these two score
    within 0.3 AUROC points of every block and of three (1, 3, 5) on each set, near case
    included (docs/results/ood.md), at a third less than three: at batch 1 the score's time
    is per-operation overhead and reading its whitening matrices, one per layer."""
    return tuple(sorted({depth // 4, depth - 1}))


@dataclass(frozen=True)
class Taps:
    """Where the score reads a model: ``blocks`` (the last through the final norm), and at
    each the mean of the first ``num_prefix`` tokens (class, distillation), the mean of the
    patch tokens and their mean square."""

    num_prefix: int
    blocks: tuple[int, ...]

    @classmethod
    def of(cls, model: DeiT) -> Taps:
        """The taps for ``model``: both tokens, averaged, when the distillation token has a
        head."""
        return cls(2 if model.head_dist is not None else 1, tapped_blocks(model.config.depth))

    def layer_dim(self, embed_dim: int) -> int:
        """Features per tapped layer: the tokens' mean, the patches' mean and mean square."""
        return PARTS * embed_dim

    def features(self, out: DeiTOutput) -> Tensor:
        """The score's features (B, layers x 3 x D) of a forward pass run with
        ``output_blocks=self.blocks``."""
        if out.block_outputs is None or len(out.block_outputs) != len(self.blocks):
            raise RuntimeError(f"the forward pass was not run with output_blocks={self.blocks}")
        return layer_features(out.block_outputs, self.num_prefix)


@functools.lru_cache(maxsize=16)
def _pooling(num_prefix: int, tokens: int, layers: int) -> Tensor:
    """(layers x 3, 2 x layers x tokens): read against the layers' tokens stacked above
    their squares, per layer the mean of the prefix tokens, of the patch tokens and of the
    patch tokens' squares."""
    pool = torch.zeros(layers * PARTS, 2, layers, tokens)
    for i in range(layers):
        pool[PARTS * i, 0, i, :num_prefix] = 1.0 / num_prefix
        pool[PARTS * i + 1, 0, i, num_prefix:] = 1.0 / (tokens - num_prefix)
        pool[PARTS * i + 2, 1, i, num_prefix:] = 1.0 / (tokens - num_prefix)
    return pool.flatten(1)


def layer_features(blocks: Sequence[Tensor], num_prefix: int) -> Tensor:
    """The features (B, layers x 3 x D) of blocks' tokens (B, T, D): in each, the mean of
    the ``num_prefix`` prefix tokens, the mean of the patch tokens and their mean square
    (per channel), each L2-normalised, concatenated, in float32.

    At batch 1 the time is per operation, so all the layers share each step: the tokens
    and their squares are stacked, and one pooling product takes every mean. The product is
    an explicit ``bmm``: the broadcast ``pool @ tokens`` gives the same features 4-15 µs
    later at batch 1 on CPU (``benchmarks/bench_ood_features.py``)."""
    tokens = torch.cat(list(blocks), -2).float()  # (B, layers x T, D)
    tokens = torch.cat([tokens, tokens * tokens], -2)  # (B, 2 x layers x T, D)
    pool = _pooling(num_prefix, blocks[0].shape[-2], len(blocks))
    pool = pool if tokens.is_cpu else pool.to(tokens.device)
    parts = torch.bmm(pool.expand(tokens.shape[0], -1, -1), tokens)
    return l2_normalise(parts).flatten(-2)


def l2_normalise(v: Tensor) -> Tensor:
    """``v`` divided by its L2 norm over the last axis (a zero vector stays zero)."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)


class MahalanobisScore(nn.Module):
    """``min_c ||W (f - center) - W (mu_c - center)||^2 / D`` for features ``f`` (B, D).

    ``W`` whitens with the shared covariance (``W^T W`` is its inverse), so the result is the
    squared Mahalanobis distance to the nearest class mean per feature dimension. Centering
    on the mean of all features keeps the float32 expansion ``|y|^2 - 2 y.m + |m|^2`` exact
    enough for export.
    """

    center: Tensor
    whiten_t: Tensor
    means_w_t: Tensor
    means_sq: Tensor

    def __init__(self, center: Tensor, whiten: Tensor, means: Tensor) -> None:
        super().__init__()
        centered = (means.double() - center.double()) @ whiten.double().T
        self.register_buffer("center", center.float())
        self.register_buffer("whiten_t", whiten.float().T.contiguous())
        self.register_buffer("means_w_t", centered.float().T.contiguous())
        self.register_buffer("means_sq", centered.pow(2).sum(-1).float())
        self.dim = int(whiten.shape[1])

    def forward(self, features: Tensor) -> Tensor:
        y = (features.float() - self.center) @ self.whiten_t  # (B, D)
        d2 = y.pow(2).sum(-1, keepdim=True) - 2 * (y @ self.means_w_t) + self.means_sq
        return d2.min(dim=-1).values.clamp_min(0) / self.dim


class LayeredScore(nn.Module):
    """``sum_l (s_l(f_l) - offset_l) / scale_l`` for features (B, layers x D): each layer's
    :class:`MahalanobisScore` on its slice, standardised, summed.

    The layers are stacked and scored in five operations whatever the depth, because at
    batch 1 the score's time is per-operation overhead and reading the matrices, which the
    forward pass has just evicted from the cache:

    - one batched matrix-vector product gives both the whitened features ``y = W f + s`` and
      each class's ``|m_c|^2 - 2 y.m_c``, its matrix ``[W; -2 M W]`` stored row-major (twice
      as fast as a vector-matrix product here);
    - the nearest class's squared distance is ``|y|^2 + min_c (|m_c|^2 - 2 y.m_c)``;
    - a layer's standardisation is folded into its matrix: its weight ``1 / (D scale_l)``
      scales the whitened space by ``sqrt(weight)``, and ``offset_l / scale_l`` comes off
      the squared means.
    """

    matrix: Tensor
    bias: Tensor

    def __init__(self, layers: Sequence[MahalanobisScore], offset: Tensor, scale: Tensor) -> None:
        super().__init__()
        root = (1.0 / (layers[0].dim * scale.double())).sqrt()[:, None, None]  # (L, 1, 1)
        whiten = root * torch.stack([m.whiten_t.T for m in layers]).double()  # (L, D, D)
        center = torch.stack([m.center for m in layers]).double()[..., None]  # (L, D, 1)
        means = root * torch.stack([m.means_w_t.T for m in layers]).double()  # (L, C, D)
        shift = -(whiten @ center)  # y = W f + shift
        means_sq = means.square().sum(-1, keepdim=True) - (offset / scale)[:, None, None]
        matrix = torch.cat([whiten, -2 * means @ whiten], 1)  # (L, D + C, D)
        bias = torch.cat([shift, means_sq - 2 * means @ shift], 1)  # (L, D + C, 1)
        self.register_buffer("matrix", matrix.float().contiguous())
        self.register_buffer("bias", bias.float())
        self.layers, self.dim = len(layers), layers[0].dim

    def forward(self, features: Tensor) -> Tensor:
        f = features.float().reshape(-1, self.layers, self.dim).permute(1, 2, 0)  # (L, D, B)
        out = torch.baddbmm(self.bias, self.matrix, f)  # (L, D + C, B)
        y, cross = out[:, : self.dim], out[:, self.dim :]
        return (cross.amin(1) + torch.linalg.vecdot(y, y, dim=1)).sum(0)  # (B,)


class ScoredLogits(nn.Module):
    """A DeiT returning ``(logits, ood_score)``: the chosen head's logits (as
    :class:`~deit.model.HeadLogits`) and the fitted score of the same forward pass."""

    def __init__(self, model: DeiT, stats: OODStats, head: Head = "avg") -> None:
        super().__init__()
        self.logits = HeadLogits(model, head)
        self.score = stats.scorer()
        self.taps = stats.taps

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        out = self.logits.model(pixel_values, output_blocks=self.taps.blocks)
        return head_logits(out, self.logits.head), self.score(self.taps.features(out))


def msp_score(logits: Tensor) -> Tensor:
    """The uncalibrated score: ``1 - max softmax`` per row of ``logits`` (B, classes)."""
    return 1.0 - logits.float().softmax(-1).max(-1).values


# --------------------------------------------------------------------------- fitting


def fit_mahalanobis(
    features: Tensor, labels: Tensor, num_classes: int, shrinkage: float = 1e-4
) -> tuple[Tensor, Tensor, Tensor]:
    """``(center, whiten, means)`` of the class-conditional Gaussian with shared covariance.

    Args:
        features: (N, D) features of labelled in-distribution images.
        labels: (N,) their classes in ``[0, num_classes)``.
        shrinkage: ridge added to the covariance, as a fraction of its mean eigenvalue (the
            final LayerNorm leaves it close to singular).

    Returns:
        ``center`` (D,): the mean of all features; ``whiten`` (D, D) with ``whiten^T whiten``
        the inverse of the regularised covariance; ``means`` (C', D): the means of the C'
        classes present (absent classes have no mean and are never the nearest).
    """
    if features.ndim != 2 or len(features) != len(labels) or not len(labels):
        raise UsageError(f"need (N, D) features and N labels, got {tuple(features.shape)}")
    f, y = features.double(), labels.long()
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise UsageError(f"labels must lie in [0, {num_classes}), got {int(y.min())}..")
    counts = torch.bincount(y, minlength=num_classes).double()
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, y, f)
    present = counts > 0
    means = sums[present] / counts[present, None]
    centered = f - (sums / counts.clamp_min(1)[:, None])[y]
    cov = centered.T @ centered / len(f)
    cov += torch.eye(len(cov), dtype=cov.dtype) * (shrinkage * cov.trace() / len(cov))
    eigvals, eigvecs = torch.linalg.eigh(cov)
    whiten = eigvecs.T / eigvals.clamp_min(torch.finfo(torch.float64).tiny).sqrt()[:, None]
    return f.mean(0), whiten, means


def threshold_at(scores: Tensor, accept: float = ACCEPT_RATE) -> float:
    """The smallest score at or below which at least ``accept`` of ``scores`` lie."""
    if not len(scores):
        raise UsageError("no held-out images to set the threshold on")
    ordered = scores.double().sort().values
    return float(ordered[min(len(ordered) - 1, math.ceil(accept * len(ordered)) - 1)])


@torch.no_grad()
def collect(
    model: nn.Module,
    batches: Iterable[Any],
    taps: Taps,
    *,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Features, labels and logits of ``(x, y)`` / ``(x, y, bad)`` batches (normalised
    pixels), up to ``limit`` images, on the CPU in float32."""
    device = torch.device(device)
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    logits: list[Tensor] = []
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x, y = batch[0], batch[1]
            if not len(y):
                continue
            out = model(x.to(device), output_blocks=taps.blocks)
            feats.append(taps.features(out).cpu())
            labels.append(torch.as_tensor(y).cpu())
            logits.append(out.logits.float().cpu())
            seen += len(y)
            if limit is not None and seen >= limit:
                break
    finally:
        model.train(was_training)
    if not feats:
        raise UsageError("the data gave no images")
    n = limit if limit is not None else seen
    return torch.cat(feats)[:n], torch.cat(labels)[:n], torch.cat(logits)[:n]


def fit_ood(
    model: DeiT,
    train_batches: Iterable[Any],
    val_batches: Iterable[Any],
    *,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    shrinkage: float = 1e-4,
    data: str = "",
) -> OODStats:
    """Fit the score on labelled training batches; threshold it on held-out ones.

    Args:
        model: the DeiT (eval mode is set for the passes and restored after).
        train_batches: ``(normalised pixels, labels)`` batches of the training data, without
            augmentation (or ``(x, y, bad)`` as :func:`deit.train.data.collate_skip_bad`).
        val_batches: held-out in-distribution batches; the threshold accepts 95% of them.
        limit: fit on at most this many training images.
        data: a description of the data, stored with the statistics.

    Returns:
        The statistics; :meth:`OODStats.save` writes them beside the model.
    """
    taps = Taps.of(model)
    feats, labels, _ = collect(model, train_batches, taps, device=device, limit=limit)
    val_feats, _, _ = collect(model, val_batches, taps, device=device)
    return fit_features(
        feats, labels, val_feats, model.config.num_classes, taps, shrinkage=shrinkage, data=data
    )


def fit_features(
    features: Tensor,
    labels: Tensor,
    val_features: Tensor,
    num_classes: int,
    taps: Taps,
    *,
    shrinkage: float = 1e-4,
    data: str = "",
) -> OODStats:
    """:func:`fit_ood` on features already collected (:func:`collect`): fit each layer on
    ``features``/``labels`` and standardise it by its training scores; threshold the sum at
    95% of ``val_features``."""
    n_layers = len(taps.blocks)
    if features.ndim != 2 or features.shape[1] % n_layers:
        raise UsageError(f"features {tuple(features.shape)} do not split into {n_layers} layers")
    width = features.shape[1] // n_layers
    layers, offsets, scales = [], [], []
    for part in features.split(width, dim=1):
        layer = LayerStats(*fit_mahalanobis(part, labels, num_classes, shrinkage))
        train_scores = layer.scorer()(part).double()
        layers.append(layer)
        offsets.append(train_scores.mean())
        spread = train_scores.std() if len(part) > 1 else train_scores.new_ones(())
        scales.append(spread.clamp_min(1e-12))
    stats = OODStats(layers, torch.stack(offsets), torch.stack(scales), threshold=0.0, taps=taps)
    stats.threshold = threshold_at(stats.scorer()(val_features))
    stats.info = {
        "data": data,
        "train_samples": len(features),
        "val_samples": len(val_features),
        "classes_fitted": len(layers[0].means),
        "accept_rate": ACCEPT_RATE,
        "shrinkage": shrinkage,
    }
    return stats


# --------------------------------------------------------------------------- storing


@dataclass
class LayerStats:
    """One layer's class-conditional Gaussian (see :func:`fit_mahalanobis`)."""

    center: Tensor
    whiten: Tensor
    means: Tensor

    def scorer(self) -> MahalanobisScore:
        return MahalanobisScore(self.center, self.whiten, self.means).eval()


@dataclass
class OODStats:
    """Fitted statistics of the ``mahalanobis-layers`` score: one :class:`LayerStats` per
    tapped block, each layer's training-score mean (``offset``) and spread (``scale``)."""

    layers: list[LayerStats]
    offset: Tensor
    scale: Tensor
    threshold: float
    taps: Taps
    method: str = MAHALANOBIS
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_dim(self) -> int:
        return int(self.layers[0].whiten.shape[1])

    @property
    def dim(self) -> int:
        """All features the score reads (layers x features per layer)."""
        return self.layer_dim * len(self.layers)

    @property
    def classes(self) -> int:
        return int(self.layers[0].means.shape[0])

    def scorer(self) -> LayeredScore:
        """The score as a module (float32), for eager inference and exported graphs."""
        layers = [layer.scorer() for layer in self.layers]
        return LayeredScore(layers, self.offset, self.scale).eval()

    @property
    def calibration(self) -> Calibration:
        return Calibration(self.method, self.threshold)

    def describe(self) -> dict[str, Any]:
        """The JSON part: method, threshold, shape and provenance (no tensors)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "threshold": self.threshold,
            "num_prefix": self.taps.num_prefix,
            "blocks": list(self.taps.blocks),
            "dim": self.layer_dim,
            "classes": self.classes,
            "info": self.info,
        }

    def tensors(self) -> dict[str, Tensor]:
        """The tensors as stored: ``center.i``, ``whiten.i``, ``means.i`` per layer,
        ``offset``, ``scale``."""
        out = {"offset": self.offset, "scale": self.scale}
        for i, layer in enumerate(self.layers):
            for name in LAYER_TENSORS:
                out[f"{name}.{i}"] = getattr(layer, name)
        return {k: v.float().contiguous() for k, v in out.items()}

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/ood.safetensors`` atomically (the folder of a saved model)."""
        from safetensors.torch import save_file

        out = Path(folder) / OOD_FILE
        with atomic_path(out, suffix=".safetensors") as tmp:
            meta = {METADATA_KEY: json.dumps(self.describe())}
            save_file(self.tensors(), str(tmp), metadata=meta)
        return out


# --------------------------------------------------------------------------- measuring


Scores = Tensor | np.ndarray | Sequence[float]


def auroc(in_scores: Scores, out_scores: Scores) -> float:
    """Area under the ROC curve with out-of-distribution images as positives (higher score =
    more unusual): the probability that an OOD image outscores an ID one, ties counting half."""
    a = np.asarray(in_scores, dtype=np.float64)
    b = np.asarray(out_scores, dtype=np.float64)
    if not len(a) or not len(b):
        raise UsageError("AUROC needs in- and out-of-distribution scores")
    both = np.concatenate([a, b])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    rank_sum = ranks[len(a) :].sum()
    return float((rank_sum - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def fpr_at_tpr(in_scores: Scores, out_scores: Scores, tpr: float = 0.95) -> float:
    """The share of in-distribution images flagged when the threshold catches ``tpr`` of the
    out-of-distribution ones (OpenOOD's FPR@95, OOD = positive)."""
    a = np.asarray(in_scores, dtype=np.float64)
    b = np.sort(np.asarray(out_scores, dtype=np.float64))
    cut = b[max(0, math.floor((1 - tpr) * len(b)))]  # at least tpr of b are >= cut
    return float((a >= cut).mean())
