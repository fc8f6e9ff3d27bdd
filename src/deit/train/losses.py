"""Distillation losses (DeiT's hard and soft distillation through the distillation token).

The formulas follow facebookresearch/deit ``losses.py``:

* base loss on the **class head** against the true targets: soft-target cross-entropy when the
  targets are probability vectors (mixup/cutmix already folded label smoothing into them), else
  cross-entropy with label smoothing;
* **soft** distillation on the **distillation head**:
  ``T² · Σ_{b,c} p_t (log p_t − log p_s) / (B·C)`` with ``p = softmax(z / T)``. The sum is
  divided by the number of logits B·C, not by B, exactly as the official code does (its
  ``kl_div(..., reduction="sum") / numel``); ``batchmean`` would be C times larger;
* **hard** distillation on the distillation head: cross-entropy (batch mean, no smoothing) to
  the teacher's argmax;
* total ``(1 − α) · base + α · kd``.

A student without a distillation head (a plain DeiT or a CNN) gets the distillation term on
its only head, which is classic knowledge distillation. Without a teacher (``kind="none"``) a
student *with* a distillation head trains both heads on the true targets (mean of the two
losses), so that the averaged inference logits stay meaningful; the official code would
leave the distillation head untrained.

References:
    Touvron et al., "Training data-efficient image transformers & distillation through
    attention", ICML 2021, §4 (Eq. 2 and 3). facebookresearch/deit ``losses.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of ``Σ_c −t_c · log_softmax(z)_c`` (targets are distributions)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy for class indices (with smoothing) or soft targets (B, C).

    Soft targets already carry any smoothing (timm's mixup builds them that way), so
    ``label_smoothing`` only applies to index targets.
    """
    if targets.ndim == logits.ndim:
        return soft_target_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def soft_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0
) -> Tensor:
    """Official DeiT soft distillation: KL(teacher‖student) at temperature ``tau``.

    Reduction: summed over batch and classes, divided by ``B·C`` (the number of logits),
    times ``tau²``.

    Args:
        student_logits: (B, C) distillation-head logits.
        teacher_logits: (B, C) teacher logits (no gradient flows into them).
        tau: temperature.

    Returns:
        Scalar loss.
    """
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl * (tau * tau) / student_logits.numel()


def hard_distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Official DeiT hard distillation: mean cross-entropy to the teacher's argmax class."""
    return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(dim=-1))


def split_heads(outputs: Any) -> tuple[Tensor, Tensor | None]:
    """``(cls_logits, dist_logits)`` from a DeiTOutput, a ``(cls, dist)`` tuple or a tensor."""
    if isinstance(outputs, Tensor):
        return outputs, None
    if hasattr(outputs, "cls_logits"):
        return outputs.cls_logits, outputs.dist_logits
    if isinstance(outputs, tuple | list) and len(outputs) == 2:
        return outputs[0], outputs[1]
    raise TypeError(f"cannot read classifier logits from {type(outputs).__name__}")


class DistillationLoss(nn.Module):
    """Base loss on the class head plus a distillation loss on the distillation head.

    Args:
        teacher: maps the (already augmented and mixed) input batch to teacher logits; it is
            called under ``torch.no_grad()``. None only with ``kind="none"``.
        kind: ``"none"``, ``"soft"`` or ``"hard"``.
        alpha: weight of the distillation term; the base term gets ``1 − alpha``.
        tau: soft-distillation temperature.
        label_smoothing: smoothing for index targets (soft targets carry their own).
    """

    def __init__(
        self,
        teacher: Callable[[Tensor], Tensor] | None = None,
        kind: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in ("none", "soft", "hard"):
            raise ValueError(f"distillation kind must be none, soft or hard, not {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError(f"{kind} distillation needs a teacher")
        self.teacher = teacher
        self.kind, self.alpha, self.tau, self.label_smoothing = kind, alpha, tau, label_smoothing

    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """Teacher logits for ``inputs``, without gradient."""
        assert self.teacher is not None
        with torch.no_grad():
            out = self.teacher(inputs)
        logits, _ = split_heads(out) if not hasattr(out, "logits") else (out.logits, None)
        return logits.detach()

    def forward(self, inputs: Tensor, outputs: Any, targets: Tensor) -> Tensor:
        """Total loss for one batch.

        Args:
            inputs: the batch the student saw (the teacher sees the same one).
            outputs: student output: DeiTOutput, ``(cls, dist)`` tuple or a logits tensor.
            targets: class indices (B,) or target distributions (B, C).

        Returns:
            Scalar loss.
        """
        cls_logits, dist_logits = split_heads(outputs)
        base = classification_loss(cls_logits, targets, self.label_smoothing)
        if self.kind == "none":
            if dist_logits is None:
                return base
            dist = classification_loss(dist_logits, targets, self.label_smoothing)
            return 0.5 * (base + dist)
        kd_logits = dist_logits if dist_logits is not None else cls_logits
        t_logits = self.teacher_logits(inputs)
        if t_logits.shape != kd_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(t_logits.shape)} do not match the student's "
                f"{tuple(kd_logits.shape)}: teacher and student need the same classes"
            )
        if self.kind == "soft":
            kd = soft_distillation_loss(kd_logits, t_logits, self.tau)
        else:
            kd = hard_distillation_loss(kd_logits, t_logits)
        return (1.0 - self.alpha) * base + self.alpha * kd
