"""The optimizer's parameter groups (weight decay, layer-wise lr decay, the heads' own rate),
the learning-rate schedule (linear warm-up, then cosine), as the DeiT recipe and timm define
them, and the run's length in epochs (from a step budget, and fitted to ``run.time_limit``);
:mod:`deit.train.loop` applies them."""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

from torch import nn

from deit.errors import ConfigError
from deit.model import DeiT
from deit.train.data import Data
from deit.train.finetune import is_head, layer_id
from deit.train.runconfig import TrainConfig
from deit.train.state import State
from deit.train.student import output_layer

__all__ = ["fit_to_time", "lr_at", "param_groups", "total_epochs"]

log = logging.getLogger("deit.train.schedule")


def lr_at(epoch: float, cfg: TrainConfig, base_lr: float, epochs: float | None = None) -> float:
    """Learning rate at a fractional epoch: linear warmup, then cosine to ``min_lr``.

    Warmup goes from ``warmup_lr`` to ``base_lr`` over ``warmup_epochs``; the cosine then runs
    over the remaining epochs (timm's ``warmup_prefix=True``). Updated every step, unlike the
    official per-epoch schedule (whose first two epochs both run at ``warmup_lr``).
    ``epochs`` overrides ``cfg.schedule.epochs`` (a schedule fitted to a time limit).
    """
    s = cfg.schedule
    if epoch < s.warmup_epochs:
        return s.warmup_lr + (base_lr - s.warmup_lr) * epoch / s.warmup_epochs
    span = max((epochs or s.epochs) - s.warmup_epochs, 1e-8)
    t = min((epoch - s.warmup_epochs) / span, 1.0)
    return s.min_lr + 0.5 * (base_lr - s.min_lr) * (1.0 + math.cos(math.pi * t))


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    split_heads: bool = False,
    head_lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """DeiT's groups: no decay for 1-D params, biases and ``no_weight_decay()`` names.

    With ``layer_decay`` < 1 (BEiT/timm layer-wise lr decay, DeiT students only) each group
    also has one layer: its ``lr_scale`` is ``layer_decay ** (depth + 1 - layer)``, the patch
    embedding and tokens at layer 0, block i at i + 1, final norm and heads at depth + 1
    (scale 1). ``split_heads`` puts ``head``/``head_dist`` in groups of their own
    (``"head": True``), for ``schedule.head_warmup_epochs``; ``head_lr_scale`` multiplies
    their ``lr_scale`` (the output layer of a CNN counts as its head). Frozen parameters are
    left out. Without any of these, exactly two groups: ``[no_decay, decay]``.
    """
    skip = set(getattr(model, "no_weight_decay", set)())
    depth = model.config.depth if isinstance(model, DeiT) else 0
    if (layer_decay < 1.0 or split_heads) and not isinstance(model, DeiT):  # head lr: any
        raise ConfigError(
            "optim.layer_decay and schedule.head_warmup_epochs need a DeiT student, "
            f"not {type(model).__name__}"
        )
    split_heads = split_heads or head_lr_scale != 1.0
    out = "" if isinstance(model, DeiT) else output_layer(model) + "."
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = layer_id(name, depth) if layer_decay < 1.0 else 0
        head = split_heads and (name.startswith(out) if out else is_head(name))
        key = (layer, head, decays)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer) if layer_decay < 1.0 else 1.0
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": scale * (head_lr_scale if head else 1.0),
                "head": head,
            }
        groups[key]["params"].append(p)
    if layer_decay >= 1.0 and not split_heads:  # the two DeiT groups, even when one is empty
        for decays in (False, True):
            groups.setdefault(
                (0, False, decays),
                {
                    "params": [],
                    "weight_decay": weight_decay if decays else 0.0,
                    "lr_scale": 1.0,
                    "head": False,
                },
            )
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------- length


def total_epochs(cfg: TrainConfig, data: Data) -> int:
    """The schedule's length in epochs: ``schedule.epochs``, or ``schedule.steps`` rounded up
    to whole epochs of this data (0 steps: no training at all)."""
    steps = cfg.schedule.steps
    if steps is None:
        return cfg.schedule.epochs
    if steps == 0:
        return 0
    try:
        per_epoch = len(data.train)
    except TypeError:  # a stream without a length: the epochs resolve() derived
        return cfg.schedule.epochs
    return math.ceil(steps / max(per_epoch, 1))


def fit_to_time(cfg: TrainConfig, st: State, elapsed: float, durations: list[float]) -> bool:
    """Apply ``run.time_limit`` after an epoch; return True when the run must stop now.

    One more epoch is expected to take the median of the last three ``durations``, so an
    epoch slowed by another job on the machine does not move the schedule. Without
    ``schedule.fit_to_time`` the run stops when one more epoch would pass the limit. With
    it, the schedule's length is set to the epochs that fit (at most ``schedule.epochs``),
    so the cosine still ends at ``min_lr``.
    """
    if not cfg.run.time_limit:
        return False
    epoch_time = statistics.median(durations[-3:])
    fits = int((cfg.run.time_limit - elapsed) // max(epoch_time, 1e-6))
    if cfg.schedule.fit_to_time:
        total = max(st.epoch, min(cfg.schedule.epochs, st.epoch + fits))
        if total != st.total_epochs:
            log.info(
                "schedule fitted to run.time_limit: %d epochs (was %d)", total, st.total_epochs
            )
            st.total_epochs = total
        return st.epoch >= st.total_epochs
    if fits < 1 and st.epoch < st.total_epochs:
        log.warning(
            "stopping after epoch %d of %d: run.time_limit %.0f s would be exceeded",
            st.epoch,
            st.total_epochs,
            cfg.run.time_limit,
        )
        return True
    return False
