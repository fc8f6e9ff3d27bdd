"""ONNX / torch.export export, verification against eager PyTorch, int8 quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deit.checkpoints import load_model
from deit.cli import main
from deit.deploy.export import (
    ExportError,
    HeadLogits,
    export_onnx,
    export_torch,
    read_metadata,
    sample_images,
    verify_export,
)
from deit.model import DeiT

from .deploy_helpers import LABELS, save_tiny_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("rgb"), channels=3)


@pytest.fixture(scope="module")
def gray_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("gray"), channels=1)


def _eager(model: DeiT, head: str, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return HeadLogits(model, head)(x).numpy()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("head", "dynamic", "channels"),
    [("avg", True, 3), ("cls", False, 3), ("dist", True, 1)],
)
def test_onnx_matches_eager_on_real_images(
    head: str,
    dynamic: bool,
    channels: int,
    rgb_dir: Path,
    gray_dir: Path,
    tmp_path: Path,
    sample_images: list[Path],
) -> None:
    loaded = load_model(rgb_dir if channels == 3 else gray_dir)
    path = export_onnx(loaded, tmp_path / "m.onnx", head=head, dynamic_batch=dynamic)  # type: ignore[arg-type]
    report = verify_export(path, loaded, sample_images)
    assert report.passed and report.max_abs_diff <= 1e-4
    assert report.top1_agreement == 1.0
    assert report.num_images == len(sample_images)
    assert report.batch_size == (len(sample_images) if dynamic else 1)
    meta = read_metadata(path)
    assert meta["deit.head"] == head and json.loads(meta["deit.labels"]) == LABELS
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch_sizes = (1, 3) if dynamic else (1,)
    for b in batch_sizes:
        x = torch.randn(b, channels, 32, 32)
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        np.testing.assert_allclose(got, _eager(loaded.model, head, x), atol=1e-4, rtol=0)


def test_torch_export_matches_eager(rgb_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(rgb_dir)
    path = export_torch(loaded, tmp_path / "m.pt2", head="cls", dynamic_batch=True)
    report = verify_export(path, loaded)  # the package's own sample images
    assert report.backend == "torch.export"
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0
    assert report.num_images == len(sample_images())
    module = torch.export.load(str(path)).module()
    x = torch.randn(2, 3, 32, 32)
    np.testing.assert_allclose(
        module(x).detach().numpy(), _eager(loaded.model, "cls", x), atol=1e-5
    )


def test_verify_export_raises_on_mismatch(rgb_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(rgb_dir)
    path = export_torch(loaded, tmp_path / "m.pt2")  # the check is the same for both formats
    with torch.no_grad():
        loaded.model.head.bias.add_(0.1)  # eager no longer matches the file
    with pytest.raises(ExportError, match="exceeds tolerance"):
        verify_export(path, loaded)
    report = verify_export(path, loaded, raise_on_failure=False)
    assert not report.passed
    assert report.max_abs_diff == pytest.approx(0.05, abs=1e-4)  # avg = mean of the heads


def test_dist_head_needs_a_distilled_model(tmp_path: Path) -> None:
    plain = load_model(save_tiny_model(tmp_path, distilled=False))
    with pytest.raises(ValueError, match="distillation head"):
        HeadLogits(plain.model, "dist")
    with pytest.raises(ValueError, match="head must be"):
        HeadLogits(plain.model, "mean")  # type: ignore[arg-type]


def test_export_cli_prints_report(
    rgb_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.pt2"
    argv = ["export", "--model", str(rgb_dir), str(out), "--format", "torch-export", "--json"]
    code = main(argv)
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and out.is_file()
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["head"] == "avg"


def test_export_checks_images_and_preprocessing_before_writing(
    gray_dir: Path, tmp_path: Path, sample_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:

    out = tmp_path / "m.onnx"
    (tmp_path / "notes.png").write_text("not an image")
    argv = ["export", "--model", str(gray_dir), str(out), "--images", str(sample_images[0])]
    assert main([*argv, str(tmp_path / "notes.png")]) == 2
    assert "notes.png: " in capsys.readouterr().err
    assert main([*argv, "--preprocess", "official"]) == 2  # RGB ImageNet transform, gray model
    assert not out.exists()


def _fashion_mnist_available() -> bool:
    try:
        from deit.train.fashion_mnist import FASHION_MNIST_DIR
    except ImportError:
        return False
    return (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


def test_quantize_reports_agreement_and_accuracy(
    gray_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.int8.onnx"
    data = ["--data", "fashion-mnist:test", "--limit", "300"] if _fashion_mnist_available() else []
    argv = ["quantize", "--model", str(gray_dir), str(out), *data, "--bench-runs", "3", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["int8_mb"] < report["fp32_mb"]
    assert report["agreement"] >= 0.9, report
    assert report["int8_ms"] > 0 and report["fp32_ms"] > 0
    assert report["torch_int8_agreement"] >= 0.9 and report["torch_int8_ms"] > 0, report
    if data:
        assert report["num_samples"] == 300
        assert 0.0 <= report["int8_top1"] <= 1.0 and 0.0 <= report["fp32_top1"] <= 1.0
        assert 0.0 <= report["torch_int8_top1"] <= 1.0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in __import__("onnx").load(str(out)).graph.node}
    assert {"QAttention", "MatMulInteger"} <= ops  # the fused graph, attention included
    assert session.run(None, {"pixel_values": np.zeros((2, 1, 32, 32), np.float32)})[0].shape == (
        2,
        10,
    )
    assert read_metadata(out)["deit.head"] == "avg"


def test_quantize_portable_graph(gray_dir: Path, tmp_path: Path) -> None:
    from deit.deploy.quantize import quantize_model

    report = quantize_model(gray_dir, tmp_path / "p.int8.onnx", fused=False, bench_runs=0)
    ops = {node.op_type for node in __import__("onnx").load(report.path).graph.node}
    assert "MatMulInteger" in ops and "Softmax" in ops and "QAttention" not in ops
    assert report.agreement >= 0.9


def test_quantize_bad_data_fails_before_writing(
    gray_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.int8.onnx"
    argv = ["quantize", "--model", str(gray_dir), str(out), "--data", str(tmp_path / "none")]
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    for argv in (
        ["quantize", "-m", str(gray_dir), str(tmp_path / "m.txt")],
        ["quantize", "-m", str(gray_dir), str(out), "--keep-fp32", str(out)],
    ):
        assert main(argv) == 2
        assert "must be a .onnx file other than --keep-fp32" in capsys.readouterr().err


def test_labelled_image_folder(rgb_dir: Path, tmp_path: Path, sample_images: list[Path]) -> None:
    from deit.deploy.quantize import load_labelled

    root = tmp_path / "data"
    for i, image in enumerate(sample_images[:4]):
        folder = root / LABELS[3 - i % 2]  # folder names are labels: indices come from the model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image.name).write_bytes(image.read_bytes())
    (root / LABELS[3] / "broken.jpg").write_bytes(b"not an image")  # skipped, not fatal
    pixels, labels, name = load_labelled(str(root), load_model(rgb_dir), limit=None)
    assert pixels.shape == (4, 3, 32, 32) and sorted(labels.tolist()) == [2, 2, 3, 3]
    assert name == str(root)


@pytest.mark.parametrize("dynamic", [True, False])
def test_predict_runs_exported_onnx_files(
    dynamic: bool,
    rgb_dir: Path,
    tmp_path: Path,
    sample_images: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`deit predict --model file.onnx` (and Classifier): same answers as the PyTorch model."""
    from deit.cli import main
    from deit.inference import Classifier

    path = export_onnx(load_model(rgb_dir), tmp_path / "m.onnx", dynamic_batch=dynamic)
    paths = [str(p) for p in sample_images]
    onnx_clf = Classifier.from_pretrained(path)
    torch_clf = Classifier.from_pretrained(rgb_dir, device="cpu")
    assert onnx_clf.labels == LABELS and onnx_clf.loaded.preprocess == torch_clf.loaded.preprocess
    for a, b in zip(onnx_clf.predict(paths, top_k=2), torch_clf.predict(paths, top_k=2)):
        assert [p.index for p in a] == [p.index for p in b]
        assert a[0].score == pytest.approx(b[0].score, abs=1e-4)
    assert main(["predict", "--model", str(path), "--json", "-k", "1", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths) and all(json.loads(x)["predictions"] for x in lines)
    assert main(["info", "--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    params = sum(p.numel() for p in load_model(rgb_dir).model.parameters())
    assert info["format"] == "onnx" and info["parameters"] == params
    with pytest.raises(ValueError, match="runs as exported"):
        Classifier.from_pretrained(path, precision="int8")


def test_onnx_without_our_metadata_is_refused(rgb_dir: Path, tmp_path: Path) -> None:
    import onnx

    from deit.onnx_model import load_onnx

    path = export_onnx(load_model(rgb_dir), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ExportError, match="no deit metadata"):
        load_onnx(tmp_path / "bare.onnx")
    with pytest.raises(ExportError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(ExportError, match="not an ONNX model"):
        load_onnx(tmp_path / "text.onnx")
    (tmp_path / "text.pt2").write_text("not a model")
    with pytest.raises(ExportError, match=r"not a torch\.export file"):
        read_metadata(tmp_path / "text.pt2")
    with pytest.raises(ExportError, match="needs opset 17 or later"):
        export_onnx(load_model(rgb_dir), tmp_path / "old.onnx", opset=7)
    assert not (tmp_path / "old.onnx").exists()


def test_onnx_with_fewer_labels_than_classes_is_refused(gray_dir: Path, tmp_path: Path) -> None:
    from deit.deploy.export import add_onnx_metadata
    from deit.onnx_model import load_onnx

    path = export_onnx(load_model(gray_dir), tmp_path / "m.onnx", dynamic_batch=True)
    add_onnx_metadata(path, {"deit.labels": json.dumps(LABELS[:3])})
    with pytest.raises(ExportError, match="3 labels for 10 classes"):
        load_onnx(path)
