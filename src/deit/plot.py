"""Run metrics: writing ``metrics.jsonl`` (and TensorBoard) during training, plotting them after.

``metrics.jsonl`` holds one JSON object per line. ``kind`` is ``"train"`` (every
``run.log_every`` steps: ``epoch``, ``step``, ``lr``, ``loss``, ``img_per_s``) or ``"epoch"``
(end of each epoch: ``train_loss``, ``lr``, ``epoch_time``, ``img_per_s``, ``bad_samples`` and,
when evaluated, ``val_top1``, ``val_top5``, ``val_cls_top1``, ``val_dist_top1``, ``val_loss``).
"""

from __future__ import annotations

import argparse
import json
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


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss, accuracy and learning-rate curves of a run into a PNG.

    Args:
        run_dir: a run directory with ``metrics.jsonl``.
        out: PNG path (default ``run_dir/curves.png``).

    Returns:
        The PNG path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("deit plot needs matplotlib: pip install matplotlib") from e
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


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``deit plot``."""
    parser.add_argument("run_dir", help="a `deit train` run directory")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


def run_plot_command(args: argparse.Namespace) -> int:
    """``deit plot``: write the curves PNG and print its path."""
    try:
        path = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ImportError) as e:
        print(f"error: {e}")
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deit.plot``: the same as ``deit plot``."""
    parser = argparse.ArgumentParser(prog="deit plot", description="plot a run's curves")
    add_plot_arguments(parser)
    return run_plot_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
