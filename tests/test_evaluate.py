"""Evaluation: top-k by hand, both heads, per class, teacher agreement, JSON and the CLI shell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit.cli import main
from deit.config import DeiTConfig
from deit.model import DeiT, DeiTOutput
from deit.train.evaluate import evaluate, evaluate_batches
from deit.transforms import PreprocessConfig

from .conftest import idx_bytes


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28))
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(idx_bytes(images, gz=True))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(idx_bytes(np.arange(40) % 10, gz=True))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deit.saving import save_model

    torch.manual_seed(0)
    config = DeiTConfig(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2
    )
    pre = PreprocessConfig(
        resize_mode="squash", resize_size=28, crop_size=None, mean=(0.3,), std=(0.35,), channels=1
    )
    return save_model(
        DeiT(config).eval(),
        tmp_path_factory.mktemp("m") / "model",
        labels=[f"c{i}" for i in range(10)],
        preprocess=pre,
    )


class _Fixed(torch.nn.Module):
    def __init__(self, cls: torch.Tensor, dist: torch.Tensor) -> None:
        super().__init__()
        self.cls, self.dist = cls, dist

    def forward(self, x: torch.Tensor) -> DeiTOutput:
        return DeiTOutput((self.cls + self.dist) / 2, self.cls, self.dist)


def test_topk_and_heads_by_hand() -> None:
    cls = torch.tensor([[9.0, 1, 2, 3, 4, 5], [0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]])
    dist = torch.tensor([[0.0, 9, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 9], [9.0, 0, 0, 0, 0, 0]])
    y = torch.tensor([0, 0, 5])
    r = evaluate_batches(
        _Fixed(cls, dist), [(torch.zeros(3, 1), y)], device=torch.device("cpu"), num_classes=6
    )
    # cls head: row 0 right; row 1 label 0 is its smallest logit (not top-5); row 2 label 5 last
    assert r["cls_top1"] == pytest.approx(1 / 3) and r["cls_top5"] == pytest.approx(1 / 3)
    assert r["dist_top1"] == pytest.approx(0.0)
    # average head: row 0 -> [4.5, 5, 1, 1.5, 2, 2.5]: top-1 class 1, label 0 in the top 5;
    # rows 1 and 2: the label has the smallest average logit
    assert r["top1"] == pytest.approx(0.0) and r["top5"] == pytest.approx(1 / 3)
    assert r["num_samples"] == 3 and sum(map(sum, r["confusion"])) == 3


def test_evaluate_fashion_mnist_with_teacher(
    fmnist_root: Path, model_dir: Path, tmp_path: Path
) -> None:
    png = tmp_path / "cm.png"
    report = evaluate(
        model_dir,
        "fashion-mnist:test",
        teacher=str(model_dir),
        batch_size=16,
        data_root=str(fmnist_root),
        confusion_matrix=png,
    )
    assert report.num_samples == 40 and report.data == "fashion-mnist:test"
    assert report.dist_top1 is not None and report.teacher_top1 == pytest.approx(report.top1)
    assert report.agreement == pytest.approx(1.0)  # the same model as its own teacher
    assert set(report.per_class) == {f"c{i}" for i in range(10)}
    assert png.stat().st_size > 1000
    json.dumps(report.to_dict())


def test_cli_json_is_one_object(
    fmnist_root: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--data",
            "fashion-mnist",
            "--data-root",
            str(fmnist_root),
            "--json",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    assert json.loads(out[0])["num_samples"] == 40


def test_image_folder_reports_bad_files(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("c1", "c3"):  # folders named like the model's labels map to their indices
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((40, 30), 200, np.uint8)).save(tmp_path / name / "x.png")
    (tmp_path / "c1" / "bad.jpg").write_bytes(b"")
    code = main(["eval", "--model", str(model_dir), "--data", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1 and "bad.jpg" in out and "(2 images)" in out


def test_bad_batch_size_and_empty_folder_are_errors(model_dir: Path, tmp_path: Path) -> None:
    from deit.train.evaluate import evaluate

    with pytest.raises(ValueError, match="batch size must be >= 1"):
        evaluate(str(model_dir), str(tmp_path), batch_size=0)
    with pytest.raises(FileNotFoundError, match=r"folder .*nodir does not exist"):
        evaluate(str(model_dir), str(tmp_path), confusion_matrix=tmp_path / "nodir" / "cm.png")
    with pytest.raises(ValueError, match=r"use a \.png"):
        evaluate(str(model_dir), str(tmp_path), confusion_matrix=tmp_path / "cm.txt")
    (tmp_path / "c1").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        evaluate(str(model_dir), str(tmp_path))


def test_module_entry_point_has_the_cli_error_handling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deit eval: error:") and "Traceback" not in err
