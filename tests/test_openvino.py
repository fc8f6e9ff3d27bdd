"""OpenVINO: IR export verified against eager PyTorch, NNCF int8, .xml models everywhere a
model goes, --fast, and the bench modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deit.checkpoints import load_model
from deit.cli import main
from deit.errors import ExportError, UsageError
from deit.inference import Classifier
from deit.model import HeadLogits

from .deploy_helpers import LABELS, save_tiny_model

pytest.importorskip("openvino")
from deit.deploy.export import verify_export
from deit.deploy.openvino import export_openvino, quantize_openvino
from deit.openvino_model import bf16_supported, load_openvino


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("rgb"), channels=3)


@pytest.fixture(scope="module")
def gray_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("gray"), channels=1)


@pytest.mark.parametrize(("head", "channels"), [("avg", 3), ("cls", 3), ("dist", 1)])
def test_ir_matches_eager_and_carries_its_settings(
    head: str, channels: int, rgb_dir: Path, gray_dir: Path, tmp_path: Path
) -> None:
    loaded = load_model(rgb_dir if channels == 3 else gray_dir)
    path = export_openvino(loaded, tmp_path / "m.xml", head=head)  # type: ignore[arg-type]
    assert path.is_file() and path.with_suffix(".bin").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    report = verify_export(path, loaded)
    assert report.passed and report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0
    back = load_openvino(path)
    assert back.labels == LABELS and back.config == loaded.config
    assert back.preprocess == loaded.preprocess and back.metadata["deit.head"] == head
    x = torch.randn(5, channels, 32, 32)  # a dynamic batch
    with torch.no_grad():
        want = HeadLogits(loaded.model.eval(), head)(x)  # type: ignore[arg-type]
    assert torch.allclose(back.model(x).logits, want, atol=1e-4)


def test_xml_models_predict_like_the_checkpoint(
    rgb_dir: Path, tmp_path: Path, sample_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    xml = export_openvino(load_model(rgb_dir), tmp_path / "m.xml")
    images = [str(p) for p in sample_images]
    torch_preds = Classifier.from_pretrained(str(rgb_dir), device="cpu").predict(images)
    ov = Classifier.from_pretrained(str(xml))
    assert ov.engine == "openvino fp32" and ov.device.type == "cpu"
    ov_preds = ov.predict(images)
    assert [p[0].index for p in ov_preds] == [p[0].index for p in torch_preds]
    assert all(
        abs(a[0].score - b[0].score) < 1e-4 for a, b in zip(ov_preds, torch_preds, strict=True)
    )
    assert main(["predict", "--model", str(xml), "--json", *images[:2]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["predictions"][0]["index"] for r in rows] == [p[0].index for p in torch_preds[:2]]
    assert main(["info", "--model", str(xml), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "openvino" and info["num_labels"] == len(LABELS)


def test_bf16_where_the_cpu_has_it(rgb_dir: Path, tmp_path: Path) -> None:
    xml = export_openvino(load_model(rgb_dir), tmp_path / "m.xml")
    if not bf16_supported():
        with pytest.raises(UsageError, match="no bf16"):
            Classifier.from_pretrained(str(xml), precision="bf16")
        return
    clf = Classifier.from_pretrained(str(xml), precision="bf16")
    ref = Classifier.from_pretrained(str(xml))
    x = torch.randn(8, 3, 32, 32)
    assert clf.engine == "openvino bf16"
    assert (clf.logits(x) - ref.logits(x)).abs().max() < 0.5  # bf16 rounding, same function


def test_xml_refuses_what_it_cannot_do(rgb_dir: Path, tmp_path: Path) -> None:
    xml = export_openvino(load_model(rgb_dir), tmp_path / "m.xml")
    with pytest.raises(UsageError, match="runs on the CPU in fp32 or bf16"):
        Classifier.from_pretrained(str(xml), precision="int8")
    with pytest.raises(UsageError, match="carries its own settings"):
        Classifier.from_pretrained(str(xml), preprocess="official")
    (tmp_path / "lonely.xml").write_bytes(xml.read_bytes())
    with pytest.raises(ExportError, match=r"lonely\.bin is missing"):
        load_openvino(tmp_path / "lonely.xml")
    (tmp_path / "junk.xml").write_text("<not an IR/>")
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(ExportError, match="not an OpenVINO IR"):
        load_openvino(tmp_path / "junk.xml")
    with pytest.raises(UsageError, match=r"\.xml"):
        export_openvino(load_model(rgb_dir), tmp_path / "m.onnx")


def test_cli_export_and_errors(
    rgb_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.xml"
    argv = ["export", "--model", str(rgb_dir), str(out), "--format", "openvino", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["backend"] == "openvino" and report["max_abs_diff"] < 1e-4
    assert (
        main(["export", "--model", str(rgb_dir), str(tmp_path / "x.onnx"), "--format", "openvino"])
        == 2
    )
    assert "writes a .xml file" in capsys.readouterr().err


def test_nncf_int8_report_and_model(
    gray_dir: Path, tmp_path: Path, sample_images: list[Path]
) -> None:
    pytest.importorskip("nncf")
    out = tmp_path / "m.int8.xml"
    report = quantize_openvino(
        gray_dir, out, calibration=4, bench_runs=2, threads=1, keep_fp32=tmp_path / "fp32.xml"
    )
    assert out.is_file() and (tmp_path / "fp32.xml").is_file()
    assert report.num_samples == len(sample_images) - 1 or report.num_samples > 0
    assert 0 <= report.agreement <= 1 and report.max_abs_diff < 5
    assert report.int8_ms is not None and report.torch_ms is not None
    int8 = load_openvino(out)
    assert int8.metadata["deit.quantization"] == "nncf int8"
    preds = Classifier(int8, "cpu").predict([str(p) for p in sample_images])
    assert len(preds) == len(sample_images)
    with pytest.raises(UsageError, match=r"\.xml file other than --keep-fp32"):
        quantize_openvino(gray_dir, tmp_path / "x.onnx")


def test_cli_quantize_openvino(
    gray_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("nncf")
    out = tmp_path / "q.xml"
    argv = ["quantize", "--engine", "openvino", "-m", str(gray_dir), str(out)]
    assert main([*argv, "--calibration", "3", "--bench-runs", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["calibration_samples"] == 3
    assert (
        main(["quantize", "--engine", "openvino", "-m", str(gray_dir), str(tmp_path / "q.onnx")])
        == 2
    )
    assert "must be a .xml file" in capsys.readouterr().err


def test_fast_picks_openvino_with_the_same_answers(
    rgb_dir: Path, sample_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    images = [str(p) for p in sample_images]
    plain = Classifier.from_pretrained(str(rgb_dir), device="cpu")
    fast = Classifier.from_pretrained(str(rgb_dir), device="cpu", fast=True)
    assert plain.engine == "pytorch fp32" and fast.engine == "openvino fp32"
    for a, b in zip(plain.predict(images), fast.predict(images), strict=True):
        assert a[0].index == b[0].index and abs(a[0].score - b[0].score) < 1e-4
    assert main(["predict", "-m", str(rgb_dir), "--device", "cpu", "--fast", images[0]]) == 0
    assert "engine: openvino fp32" in capsys.readouterr().err


def test_fast_falls_back_to_pytorch_without_openvino(
    rgb_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deit.openvino_model as ovm
    from deit.errors import MissingDependencyError

    def missing() -> None:
        raise MissingDependencyError("openvino is needed for this")

    monkeypatch.setattr(ovm, "openvino", missing)
    clf = Classifier.from_pretrained(str(rgb_dir), device="cpu", fast=True)
    assert clf.engine == "pytorch fp32"
    assert np.isfinite(clf.logits(torch.zeros(1, 3, 32, 32)).numpy()).all()


def test_bench_openvino_modes() -> None:
    pytest.importorskip("nncf")
    from deit.bench import run_bench

    modes = ("openvino", "openvino-int8") + (("openvino-bf16",) if bf16_supported() else ())
    results = list(
        run_bench(
            "deit_tiny_patch16_224",
            batches=(2,),
            impls=("deit",),
            modes=modes,
            iters=1,
            min_seconds=0,
        )
    )
    assert [m.mode for m in results] == list(modes)
    assert results[0].max_abs_logit_diff < 1e-4  # fp32
    assert results[1].max_abs_logit_diff < 1.0  # int8: the same function, rounded
    with pytest.raises(ValueError, match="use --dtype fp32"):
        list(run_bench(dtype="bf16", modes=("openvino",)))


def test_eval_scores_an_xml_like_its_checkpoint(rgb_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    from deit.train.evaluate import evaluate

    xml = export_openvino(load_model(rgb_dir), tmp_path / "m.xml")
    rng = np.random.default_rng(0)
    for name in (LABELS[1], LABELS[3]):  # folders named like the model's labels
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    want = evaluate(str(rgb_dir), str(tmp_path / "data"), device="cpu")
    got = evaluate(str(xml), str(tmp_path / "data"), device="cpu")
    assert got.num_samples == want.num_samples == 6
    assert got.top1 == want.top1 and got.top5 == want.top5
