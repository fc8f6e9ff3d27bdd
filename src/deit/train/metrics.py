"""Run metrics: ``metrics.jsonl`` (and TensorBoard) written during training, read back after.

``metrics.jsonl`` holds one JSON object per line. ``kind`` is ``"train"`` (every
``run.log_every`` steps: ``epoch``, ``step``, ``lr``, ``loss``, ``img_per_s``) or ``"epoch"``
(end of each epoch: ``train_loss``, ``lr``, ``epoch_time``, ``img_per_s``, ``bad_samples`` and,
when evaluated, ``val_top1``, ``val_top5``, ``val_cls_top1``, ``val_dist_top1``, ``val_loss``,
``val_samples``).
"""

from __future__ import annotations

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
