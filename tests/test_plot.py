"""deit.train.plot: a run's curves and the comparison of several runs, from metrics.jsonl files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deit.cli import main
from deit.train.metrics import read_metrics
from deit.train.plot import group_curves, plot_compare, plot_run

pytest.importorskip("matplotlib")


def _run(tmp_path: Path, name: str, top1: list[float]) -> Path:
    run = tmp_path / name
    run.mkdir()
    lines = []
    for epoch, acc in enumerate(top1, start=1):
        lines.append(
            {
                "kind": "train",
                "epoch": epoch - 1,
                "step": 10 * epoch - 5,
                "lr": 1e-3,
                "loss": 2.0 / epoch,
                "img_per_s": 100.0,
            }
        )
        lines.append(
            {
                "kind": "epoch",
                "epoch": epoch,
                "step": 10 * epoch,
                "train_loss": 2.0 / epoch,
                "val_top1": acc,
                "val_cls_top1": acc,
                "val_dist_top1": acc,
                "val_loss": 1.0 / epoch,
            }
        )
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"kind": "epo'  # truncated last line
    (run / "metrics.jsonl").write_text(text)
    return run


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_read_metrics_skips_a_truncated_line(tmp_path: Path) -> None:
    assert len(read_metrics(_run(tmp_path, "a", [0.5, 0.6]))) == 4


def test_plot_run_and_compare(tmp_path: Path) -> None:
    a, b = _run(tmp_path, "none", [0.5, 0.6]), _run(tmp_path, "hard", [0.55, 0.7, 0.8])
    assert _is_png(plot_run(a))
    out = plot_compare([a, b], tmp_path / "cmp.png", ["no distillation", "hard"])
    assert _is_png(out)
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot_compare([a, b], tmp_path / "x.png", ["one"])


def test_runs_sharing_a_label_are_averaged_over_their_common_epochs(tmp_path: Path) -> None:
    s0, s1 = _run(tmp_path, "s0", [0.5, 0.7, 0.8]), _run(tmp_path, "s1", [0.6, 0.9])
    other = _run(tmp_path, "other", [0.1])
    curves = group_curves([s0, other, s1], ["hard", "none", "hard"], "val_top1")
    assert list(curves) == ["hard", "none"]
    epochs, mean, low, high = curves["hard"]
    assert epochs == [1, 2]
    assert mean == pytest.approx([0.55, 0.8])
    assert (low, high) == ([0.5, 0.7], [0.6, 0.9])
    assert curves["none"] == ([1], [0.1], [0.1], [0.1])
    assert _is_png(plot_compare([s0, other, s1], tmp_path / "seeds.png", ["hard", "none", "hard"]))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _run(tmp_path, "a", [0.5]), _run(tmp_path, "b", [0.6])
    assert (
        main(
            [
                "plot",
                str(a),
                str(b),
                "--out",
                str(tmp_path / "c.png"),
                "--label",
                "A",
                "--label",
                "B",
            ]
        )
        == 0
    )
    assert _is_png(tmp_path / "c.png")
    assert main(["plot", str(a), str(b)]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
