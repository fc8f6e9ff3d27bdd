"""`deit predict`, `convert` and `info` end to end, on real image files, good and bad."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from deit.cli import main
from deit.inference import Classifier, expand_paths, prepare_model
from deit.runtime import quantize_int8
from deit.transforms import preprocess

from .deploy_helpers import png_claiming
from .test_checkpoints import write_tiny_hf

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)  # module-scoped: created before the per-test seeding, whatever ran first
    write_tiny_hf(folder)
    return folder


@pytest.fixture
def bad_files(tmp_path: Path, sample_images: list[Path]) -> dict[str, Path]:
    jpeg = next(p for p in sample_images if p.suffix == ".jpg").read_bytes()
    files = {
        "empty": b"",
        "text": b"this is not an image\n",
        "truncated": jpeg[: len(jpeg) // 3],
        "corrupt": jpeg[:200] + os.urandom(2000),
        "oversized": png_claiming(50_000, 50_000),
    }
    out = {}
    for name, data in files.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        out[name] = tmp_path / f"{name}.jpg"
    return out


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_json_good_and_bad(
    model_dir: Path,
    sample_images: list[Path],
    bad_files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    inputs = [str(p) for p in sample_images] + [str(p) for p in bad_files.values()]
    code, out, err = _run(
        [
            "predict",
            "--model",
            str(model_dir),
            "--json",
            "-k",
            "2",
            "--device",
            "cpu",
            *inputs,
            "missing.png",
        ],
        capsys,
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == [*inputs, "missing.png"]  # input order kept
    good = rows[: len(sample_images)]
    assert all(r["error"] is None and len(r["predictions"]) == 2 for r in good)
    assert all(
        0 <= p["score"] <= 1 and p["label"] in {"cat", "dog", "fox"}
        for r in good
        for p in r["predictions"]
    )
    errors = {Path(r["path"]).stem: r["error"] for r in rows[len(sample_images) :]}
    assert errors["empty"] == "empty file"
    assert errors["text"] == "not an image file"
    assert "truncated" in errors["truncated"] or "corrupt" in errors["truncated"]
    assert errors["corrupt"]
    assert "too large" in errors["oversized"]
    assert "not found" in errors["missing"]
    assert code == 1 and "6 of" in err and "Traceback" not in err


def test_predict_text_output_folder_and_glob(
    model_dir: Path, sample_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = sample_images[0].parent
    code, out, _ = _run(["predict", "-m", str(model_dir), "-k", "1", str(folder)], capsys)
    assert code == 0 and out.count("%") == len(sample_images)
    code, out, _ = _run(["predict", "-m", str(model_dir), "--json", str(folder / "*.png")], capsys)
    assert code == 0 and len(out.splitlines()) == len(list(folder.glob("*.png")))


def test_predict_usage_errors(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["predict", "-m", str(tmp_path / "nope"), "x.png"], capsys)
    assert code == 2 and "no such file" in err
    code, _, err = _run(["predict", "-m", str(model_dir), "--top-k", "0", "x.png"], capsys)
    assert code == 2 and "--top-k" in err
    code, _, err = _run(["predict", "-m", str(model_dir), str(tmp_path)], capsys)
    assert code == 2 and "no input images" in err
    code, _, err = _run(["predict", "-m", str(model_dir), "--workers", "-1", "x.png"], capsys)
    assert code == 2 and "--workers must be at least 1" in err
    code, _, err = _run(["predict", "-m", str(model_dir), "--device", "gpu0", "x.png"], capsys)
    assert code == 2 and "unknown device 'gpu0'" in err


def test_files_that_are_not_models_get_one_line_errors(
    model_dir: Path, tmp_path: Path, sample_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(sample_images[0])
    code, _, err = _run(["predict", "-m", image, image], capsys)
    assert code == 2 and "is not a checkpoint: expected weights (.safetensors" in err
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    code, _, err = _run(["predict", "-m", str(tmp_path / "module.pth"), image], capsys)
    assert code == 2 and "pickled Python objects (GLOBAL torch.nn.modules.linear.Linear)" in err
    (tmp_path / "garbage.pth").write_bytes(b"garbage" * 10)
    code, _, err = _run(["info", "-m", str(tmp_path / "garbage.pth")], capsys)
    assert code == 2 and "not a PyTorch or safetensors weights file" in err
    assert len(err.strip().splitlines()) == 1
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    for text, message in [
        ('{"format": "deit"}', "(format deit) has no 'model'"),
        ('{"format": "deit", "model": 3, "preprocess": {}, "labels": []}', "malformed"),
        ('{"format": ', "cannot read"),
        ("[1]", "holds a JSON list, not an object"),
        ('{"model_type": "deit", "id2label": 7}', "not a valid transformers config"),
        ('{"format": "other"}', "is not a deit, timm or transformers DeiT config"),
    ]:
        (folder / "config.json").write_text(text)
        code, _, err = _run(["predict", "-m", str(folder), image], capsys)
        assert code == 2 and message in err and str(folder / "config.json") in err, (text, err)
        assert len(err.strip().splitlines()) == 1


def test_python_api_batches_and_orders(model_dir: Path, sample_images: list[Path]) -> None:
    clf = Classifier.from_pretrained(model_dir, device="cpu")
    images = [Image.open(p) for p in sample_images]
    one_by_one = [clf.predict(img, top_k=3)[0] for img in images]
    batched = clf.predict(images, top_k=3, batch_size=3)
    assert [[p.index for p in r] for r in batched] == [[p.index for p in r] for r in one_by_one]
    for a, b in zip(batched, one_by_one):
        assert a[0].score == pytest.approx(b[0].score, abs=1e-5)
    buffer = io.BytesIO()
    images[0].convert("RGB").save(buffer, format="PNG")
    assert clf.predict(buffer.getvalue())[0][0].index == batched[0][0].index


def test_precisions_agree_with_fp32(model_dir: Path, sample_images: list[Path]) -> None:
    from torch import nn

    reference = Classifier.from_pretrained(model_dir, device="cpu")
    images = [str(p) for p in sample_images]
    pixels = preprocess(images, reference.loaded.preprocess)
    expected = reference.logits(pixels)
    for precision, tol in (("bf16", 0.1), ("int8", 0.1)):
        clf = Classifier(reference.loaded, device="cpu", precision=precision)
        got = clf.logits(pixels)
        assert got.dtype == torch.float32 and (got - expected).abs().max() < tol, precision
        assert all(r.predictions for r in clf.predict_files(images))  # the file pipeline too
    # the fp32 model is left as it was: the reference, used by `explain`
    assert next(reference.loaded.model.parameters()).dtype == torch.float32
    assert all(type(m) is not nn.Linear for m in quantize_int8(reference.model).modules())
    compiled = Classifier(reference.loaded, device="cpu", compile=True)
    assert (compiled.logits(pixels) - expected).abs().max() < 1e-4
    with pytest.raises(ValueError, match="CPU only"):
        prepare_model(reference.model, torch.device("cuda"), "int8")
    with pytest.raises(ValueError, match="unknown precision"):
        Classifier(reference.loaded, device="cpu", precision="int4")


def test_predict_int8_cli(
    model_dir: Path, sample_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [str(p) for p in sample_images]
    code, fp32, _ = _run(["predict", "-m", str(model_dir), "--json", "-k", "1", *paths], capsys)
    code8, int8, _ = _run(
        ["predict", "-m", str(model_dir), "--json", "-k", "1", "--precision", "int8", *paths],
        capsys,
    )
    assert code == code8 == 0
    top = lambda out: [json.loads(line)["predictions"][0]["index"] for line in out.splitlines()]  # noqa: E731
    agree = sum(a == b for a, b in zip(top(fp32), top(int8)))
    assert agree >= len(paths) - 1  # random tiny weights: small margins, allow one flip


def test_expand_paths(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.JPG", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_paths([tmp_path / "a"]) == [
        str(tmp_path / "a/b/y.JPG"),
        str(tmp_path / "a/x.png"),
    ]
    assert expand_paths([str(tmp_path / "a/**/*.png")]) == [str(tmp_path / "a/x.png")]
    assert expand_paths(["nothing*.png"]) == ["nothing*.png"]


def test_convert_and_info(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(["convert", str(model_dir), str(tmp_path / "ours"), "--to", "deit"], capsys)
    assert code == 0 and (tmp_path / "ours" / "model.safetensors").is_file()
    code, out, _ = _run(["info", "-m", str(tmp_path / "ours"), "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["format"] == "deit" and info["config"]["embed_dim"] == 64
    code, _, err = _run(["convert", str(model_dir), str(tmp_path / "ours"), "--to", "hf"], capsys)
    assert code == 2 and "exists and is not an empty folder" in err  # nothing overwritten


def test_convert_to_fp16_halves_the_file_and_keeps_the_answers(
    model_dir: Path, tmp_path: Path, sample_images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    half = tmp_path / "half"
    code, _, _ = _run(
        ["convert", str(model_dir), str(half), "--to", "deit", "--dtype", "fp16"], capsys
    )
    assert code == 0
    assert {t.dtype for t in load_file(half / "model.safetensors").values()} == {torch.float16}
    code, out, _ = _run(["info", "-m", str(half), "--json"], capsys)
    assert json.loads(out)["metadata"]["dtype"] == "float16"
    full, halved = Classifier.from_pretrained(str(model_dir)), Classifier.from_pretrained(str(half))
    batch = preprocess(sample_images, full.loaded.preprocess)
    reference, rounded = full.logits(batch), halved.logits(batch)
    assert torch.equal(reference.argmax(-1), rounded.argmax(-1))
    assert 0 < (reference - rounded).abs().max() < 1e-2  # fp16 weights: rounded, not broken
    with pytest.raises(SystemExit):  # argparse rejects an unknown dtype
        _run(["convert", str(model_dir), str(half), "--to", "deit", "--dtype", "int4"], capsys)


def test_console_script_runs_as_module(model_dir: Path, sample_images: list[Path]) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deit",
            "predict",
            "-m",
            str(model_dir),
            "--json",
            str(sample_images[0]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["error"] is None


def test_predict_fast_decode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--fast-decode: large JPEGs decode at reduced size; the trained model's answers hold."""
    samples = sorted((Path(__file__).parents[1] / "samples" / "fashion-mnist").glob("*.png"))[:4]
    paths = []
    for src in samples:  # 28 px items as 1120 px photos: decoded at 1/2 scale with the flag
        paths.append(str(tmp_path / f"{src.stem}.jpg"))
        Image.open(src).convert("RGB").resize((1120, 1120), Image.Resampling.BICUBIC).save(
            paths[-1], quality=92
        )
    argv = ["predict", "-m", "fashion-mnist", "--json", "-k", "1", *paths]
    code, exact, _ = _run(argv, capsys)
    code_fast, fast, _ = _run([*argv, "--fast-decode"], capsys)
    assert code == code_fast == 0
    rows = lambda out: [json.loads(line)["predictions"][0] for line in out.splitlines()]  # noqa: E731
    for a, b in zip(rows(exact), rows(fast), strict=True):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 0.05
    assert Classifier.from_pretrained("fashion-mnist", fast_decode=True).fast_decode
