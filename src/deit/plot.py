"""Run metrics: writing ``metrics.jsonl`` (and TensorBoard) during training, plotting them after.

``metrics.jsonl`` holds one JSON object per line. ``kind`` is ``"train"`` (every
``run.log_every`` steps: ``epoch``, ``step``, ``lr``, ``loss``, ``img_per_s``) or ``"epoch"``
(end of each epoch: ``train_loss``, ``lr``, ``epoch_time``, ``img_per_s``, ``bad_samples`` and,
when evaluated, ``val_top1``, ``val_top5``, ``val_cls_top1``, ``val_dist_top1``, ``val_loss``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends records to ``run_dir/metrics.jsonl``; mirrors numbers to TensorBoard if installed.

    Args:
        run_dir: the run directory.
        enabled: False on non-zero ranks (nothing is written).
    """

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled, self.path, self.tb = enabled, Path(run_dir) / "metrics.jsonl", None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``kind``; ``step`` is the TensorBoard x axis)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (a truncated last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a `deit train` run directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _pyplot() -> Any:
    """pyplot on the file-only Agg backend, or an ImportError that says what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("deit plot needs matplotlib: pip install matplotlib") from e
    return plt


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss, accuracy and learning-rate curves of a run into a PNG.

    Args:
        run_dir: a run directory with ``metrics.jsonl``.
        out: PNG path (default ``run_dir/curves.png``).

    Returns:
        The PNG path.
    """
    plt = _pyplot()
    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
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
    plt.close(fig)
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
    plt = _pyplot()
    labels = labels or [Path(d).name for d in run_dirs]
    counts = {label: labels.count(label) for label in labels}
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
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
    plt.close(fig)
    return Path(out)


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``deit plot``."""
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a `deit train` run directory; several are overlaid in one comparison plot",
    )
    parser.add_argument(
        "--out", help="PNG path (default RUN_DIR/curves.png; required for several runs)"
    )
    parser.add_argument(
        "--label",
        action="append",
        help="legend entry of each run, in order (repeat; default the directories' names); "
        "runs with the same label are averaged, with a min-max band",
    )


def run_plot_command(args: argparse.Namespace) -> int:
    """``deit plot``: write the curves (or comparison) PNG and print its path."""
    try:
        if len(args.run_dirs) == 1 and not args.label:
            path = plot_run(args.run_dirs[0], args.out)
        elif not args.out:
            raise ValueError("--out is required with several runs or with --label")
        else:
            path = plot_compare(args.run_dirs, args.out, args.label)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"deit plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deit.plot``: ``deit plot``, with the CLI's error handling."""
    from deit.cli import main as cli_main

    return cli_main(["plot", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
