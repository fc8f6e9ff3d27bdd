"""Which epoch a run keeps, and when its validation says it is not learning.

The best epoch (:func:`is_better`) is the highest validation top-1, ties going to the lower
validation loss; leaving the starting model of a fine-tuning run takes a gain larger than the
noise of its validation accuracy (:func:`start_margin`). :func:`at_chance` is the test behind
the loop's warning after two epochs at chance, :func:`chance_warning` its text.
"""

from __future__ import annotations

import math

__all__ = [
    "CHANCE_MARGIN",
    "START_MARGIN_SE",
    "at_chance",
    "chance_warning",
    "is_better",
    "start_margin",
]


def is_better(
    top1: float, loss: float, best_top1: float, best_loss: float, margin: float = 0.0
) -> bool:
    """Whether an evaluation beats the best so far: higher top-1 (by more than ``margin``),
    or, without a margin, the same top-1 with a lower validation loss (small validation sets
    saturate: 100% three epochs in a row says nothing about which of them to keep, their
    loss does)."""
    if margin > 0:
        return top1 > best_top1 + margin
    return top1 > best_top1 or (top1 == best_top1 and loss < best_loss)


START_MARGIN_SE = 2.0  # leaving the starting model takes this many standard errors of gain


def start_margin(start_top1: float, samples: float) -> float:
    """How much better than the starting model (epoch 0: the pretrained model, or its linear
    probe) a later epoch's validation accuracy must be to replace it in ``best.pt``:
    ``START_MARGIN_SE`` standard errors of the starting accuracy on that many images. On a
    few hundred validation images one or two more right answers is noise, and a fine-tuned
    model chosen on such noise can be worse than the model it started from on new images
    (docs/results/fine-tuning.md)."""
    if start_top1 < 0 or samples <= 0:
        return 0.0
    return START_MARGIN_SE * math.sqrt(start_top1 * (1.0 - start_top1) / samples)


CHANCE_MARGIN = 0.1  # "at chance": within this fraction of the way from chance to 100%


def at_chance(top1: float, chance: float) -> bool:
    """Whether a validation top-1 is within ``CHANCE_MARGIN`` of the way from ``chance``
    (one over the number of classes) to 100%."""
    return top1 <= chance + CHANCE_MARGIN * (1.0 - chance)


def chance_warning(
    top1: float,
    num_classes: int,
    lr: float,
    steps: int | None,
    batch_size: int,
    in_chans: int,
    img_size: object,
) -> str:
    """The warning after two epochs at chance: the accuracy, and the likely causes with the
    run's own values (rate, steps per epoch, batch, channels, size) and the settings to change."""
    chance = 1.0 / max(num_classes, 1)
    return (
        f"validation accuracy has stayed at chance for 2 epochs ({100 * top1:.1f}%; chance "
        f"with {num_classes} classes is {100 * chance:.1f}%). Likely causes: a learning rate "
        f"far too low or too high (it is {lr:.3g}; try optim.lr), too few optimizer steps "
        f"({'?' if steps is None else steps} per epoch, batch {batch_size}: lower "
        "data.batch_size or set schedule.steps), images read differently from what the model "
        f"expects (data.in_chans={in_chans}, data.mean/std, size {img_size} px), or labels "
        "that do not follow the images (class folders of training and validation data named "
        "differently)."
    )
