"""Distillation losses against hand computations; which head gets which target; frozen teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deit.model import DeiTOutput
from deit.train.losses import (
    DistillationLoss,
    classification_loss,
    hard_distillation_loss,
    soft_distillation_loss,
)


def _softmax(row: list[float], tau: float) -> list[float]:
    exps = [math.exp(v / tau) for v in row]
    return [e / sum(exps) for e in exps]


def test_soft_distillation_matches_hand_computation() -> None:
    torch.manual_seed(0)
    s, t, tau = torch.randn(3, 4), torch.randn(3, 4), 2.0
    total = 0.0
    for b in range(3):
        ps, pt = _softmax(s[b].tolist(), tau), _softmax(t[b].tolist(), tau)
        total += sum(p * (math.log(p) - math.log(q)) for q, p in zip(ps, pt, strict=True))
    expected = total / (3 * 4) * tau**2  # summed KL over B*C logits, times T^2
    assert soft_distillation_loss(s, t, tau).item() == pytest.approx(expected, rel=1e-5)


def test_hard_distillation_is_cross_entropy_to_teacher_argmax() -> None:
    s = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    t = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])  # teacher says classes 1 and 0
    p0, p1 = _softmax([2.0, 0.0, 1.0], 1)[1], _softmax([0.0, 0.0, 3.0], 1)[0]
    expected = (-math.log(p0) - math.log(p1)) / 2
    assert hard_distillation_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_classification_loss_smoothing_and_soft_targets() -> None:
    z, eps = torch.tensor([[1.0, 2.0, 0.5]]), 0.1
    logp = [math.log(p) for p in _softmax(z[0].tolist(), 1)]
    smoothed = (1 - eps) * -logp[1] + eps * sum(-v for v in logp) / 3
    assert classification_loss(z, torch.tensor([1]), eps).item() == pytest.approx(
        smoothed, rel=1e-6
    )
    soft = torch.tensor([[0.2, 0.7, 0.1]])
    expected = -(0.2 * logp[0] + 0.7 * logp[1] + 0.1 * logp[2])
    assert classification_loss(z, soft, eps).item() == pytest.approx(expected, rel=1e-6)


class _Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.calls_with_grad = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls_with_grad += torch.is_grad_enabled()
        return self.lin(x)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_heads_get_their_targets_and_teacher_gets_no_grad(kind: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    teacher, alpha = _Teacher(), 0.3
    cls_logits = torch.randn(5, 3, requires_grad=True)
    dist_logits = torch.randn(5, 3, requires_grad=True)
    loss = DistillationLoss(teacher, kind, alpha=alpha, tau=2.0)(
        x, DeiTOutput((cls_logits + dist_logits) / 2, cls_logits, dist_logits), y
    )
    loss.backward()
    t_logits = teacher.lin(x).detach()
    kd = (
        soft_distillation_loss(dist_logits, t_logits, 2.0)
        if kind == "soft"
        else hard_distillation_loss(dist_logits, t_logits)
    )
    expected = (1 - alpha) * classification_loss(cls_logits, y) + alpha * kd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the class head only sees the labels, the distillation head only the teacher
    g_cls = torch.autograd.grad((1 - alpha) * classification_loss(cls_logits, y), cls_logits)[0]
    g_dist = torch.autograd.grad(alpha * kd, dist_logits)[0]
    torch.testing.assert_close(cls_logits.grad, g_cls)
    torch.testing.assert_close(dist_logits.grad, g_dist)
    assert teacher.calls_with_grad == 0
    assert teacher.lin.weight.grad is None


def test_none_trains_both_heads_on_labels_and_plain_outputs_work() -> None:
    z1, z2, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss = DistillationLoss(kind="none")(torch.zeros(4, 1), DeiTOutput(z1, z1, z2), y)
    expected = (classification_loss(z1, y) + classification_loss(z2, y)) / 2
    assert loss.item() == pytest.approx(expected.item())
    assert DistillationLoss(kind="none")(torch.zeros(4, 1), z1, y).item() == pytest.approx(
        classification_loss(z1, y).item()
    )
    # a CNN student (tensor output) gets the distillation term on its only head
    teacher = _Teacher()
    x = torch.randn(4, 4)
    kd = hard_distillation_loss(z1, teacher(x).detach())
    got = DistillationLoss(teacher, "hard", alpha=1.0)(x, z1, y)
    assert got.item() == pytest.approx(kd.item())


def test_errors() -> None:
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationLoss(None, "hard")
    with pytest.raises(ValueError, match="none, soft or hard"):
        DistillationLoss(None, "medium")
    wrong = DistillationLoss(lambda x: torch.zeros(len(x), 5), "soft")
    with pytest.raises(ValueError, match="same classes"):
        wrong(torch.zeros(2, 1), torch.zeros(2, 3), torch.tensor([0, 1]))
