"""Plots of training runs: one run's curves, or several runs compared (mean and min-max band).

Reads the ``metrics.jsonl`` files that :class:`deit.train.metrics.MetricsWriter` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deit.errors import MissingDependencyError
from deit.train.metrics import read_metrics


def _figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` drawn without pyplot: no backend is chosen for the process."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError("plots need matplotlib: pip install matplotlib") from e
    return Figure(figsize=(width, height))


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss, accuracy and learning-rate curves of a run into a PNG.

    Args:
        run_dir: a run directory with ``metrics.jsonl``.
        out: PNG path (default ``run_dir/curves.png``).

    Returns:
        The PNG path.
    """
    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig = _figure(15, 4)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="step loss")
    ax_loss.plot(
        [r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="epoch mean"
    )
    if any("val_loss" in r for r in epochs):
        ev = [r for r in epochs if "val_loss" in r]
        ax_loss.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "s-", label="val loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    for key in ("val_top1", "val_cls_top1", "val_dist_top1", "val_ema_top1"):
        ev = [r for r in epochs if key in r]
        if ev:
            ax_acc.plot([r["epoch"] for r in ev], [100 * r[key] for r in ev], "o-", label=key[4:])
    ax_acc.set(xlabel="epoch", ylabel="top-1 %", title="validation accuracy")
    ax_acc.legend()
    ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    ax_lr.set(xlabel="step", ylabel="lr", title="learning rate")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    return out


def group_curves(
    run_dirs: list[str | Path], labels: list[str], key: str
) -> dict[str, tuple[list[int], list[float], list[float], list[float]]]:
    """One curve per label: runs that share a label (seeds of one recipe) are averaged.

    Args:
        run_dirs: run directories with ``metrics.jsonl``.
        labels: one label per run; repeated labels form a group.
        key: an ``"epoch"`` record's field, e.g. ``"val_top1"`` or ``"train_loss"``.

    Returns:
        ``{label: (epochs, mean, low, high)}`` in first-seen order, over the epochs every run
        of the group recorded; ``low``/``high`` are the group's minimum and maximum.
    """
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    series: dict[str, list[dict[int, float]]] = {}
    for run_dir, label in zip(run_dirs, labels, strict=True):
        records = read_metrics(run_dir)
        values = {
            r["epoch"]: float(r[key]) for r in records if r.get("kind") == "epoch" and key in r
        }
        series.setdefault(label, []).append(values)
    curves = {}
    for label, runs in series.items():
        epochs = sorted(set.intersection(*(set(v) for v in runs)))
        rows = [[v[e] for v in runs] for e in epochs]
        curves[label] = (
            epochs,
            [sum(r) / len(r) for r in rows],
            [min(r) for r in rows],
            [max(r) for r in rows],
        )
    return curves


def plot_compare(
    run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None
) -> Path:
    """Overlay several runs: evaluated top-1 (both heads averaged) and mean training loss per epoch.

    Runs given the same label are drawn as one line, their mean, with a band from the lowest
    to the highest run (e.g. three seeds of one recipe).

    Args:
        run_dirs: run directories with ``metrics.jsonl``.
        out: PNG path.
        labels: one legend entry per run (default: the directories' names).

    Returns:
        The PNG path.
    """
    labels = labels or [Path(d).name for d in run_dirs]
    counts = {label: labels.count(label) for label in labels}
    fig = _figure(11, 4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, key, scale in ((ax_acc, "val_top1", 100.0), (ax_loss, "train_loss", 1.0)):
        for label, (epochs, mean, low, high) in group_curves(run_dirs, labels, key).items():
            n = counts[label]
            name = f"{label} (mean of {n}, band min-max)" if n > 1 else label
            (line,) = ax.plot(epochs, [scale * v for v in mean], "o-", label=name)
            if n > 1:
                ax.fill_between(
                    epochs,
                    [scale * v for v in low],
                    [scale * v for v in high],
                    color=line.get_color(),
                    alpha=0.2,
                )
    ax_acc.set(xlabel="epoch", ylabel="top-1 %", title="evaluated top-1 (heads averaged)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss (epoch mean)")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return Path(out)


def save_confusion_matrix(matrix: list[list[int]], labels: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix as a PNG (rows: true class, columns: prediction)."""
    m = torch.tensor(matrix, dtype=torch.float64)
    m = m / m.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(labels)
    fig = _figure(max(6, 0.5 * n), max(5, 0.45 * n))
    ax = fig.subplots()
    im = ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 50:
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
        for i in range(n):
            for j in range(n):
                if m[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{100 * m[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if m[i, j] > 0.5 else "black",
                    )
    ax.set(xlabel="predicted", ylabel="true")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
