"""Hostile conditions around outputs and inputs (issue #16, items 4 and 5, and 6's first point).

Outputs are atomic: ``deit convert`` and ``deit export`` onto a full disk leave nothing
behind, say "disk full" in one line, and a rerun succeeds. Errors promised as one line are one
line: an unusable ``--resume`` state, a label list shorter than the classes. A failed resume
leaves the run's ``config.json`` alone. ``deit predict`` inputs: symlink loops, duplicates,
empty paths; empty class folders; negative counts in a training config. ``deit convert``
keeps each weight's stored dtype by default.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deit.checkpoints import load_model
from deit.cli import main
from deit.config import DeiTConfig
from deit.errors import CheckpointError, ConfigError, TrainingError, UsageError
from deit.inference import expand_paths
from deit.model import DeiT
from deit.runtime import DiskFullError
from deit.saving import convert, save_model
from deit.transforms import PreprocessConfig

from .conftest import idx_bytes

LABELS = ["cat", "dog", "fox"]


def _tiny() -> DeiT:
    cfg = DeiTConfig(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1, num_classes=3)
    return DeiT(cfg).eval()


def _model_dir(folder: Path, dtype: torch.dtype | None = None, fmt: str = "deit") -> Path:
    return save_model(
        _tiny(),
        folder,
        labels=LABELS,
        preprocess=PreprocessConfig.official(32),
        format=fmt,  # type: ignore[arg-type]
        dtype=dtype,
    )


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deit {command}: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _default_mode(kind: str) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if kind == "dir" else 0o666) & ~umask


# --------------------------------------------------------------------------- item 4: full disk


@pytest.mark.parametrize("failing", ["weights", "config", "weights-wrapped"])
def test_convert_onto_a_full_disk_leaves_nothing_and_a_rerun_works(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failing: str,
) -> None:
    import safetensors.torch

    src = _model_dir(tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "converted"
    real_save_file, real_write_text = safetensors.torch.save_file, Path.write_text

    def full_save_file(state: Any, filename: str, **kw: Any) -> None:
        Path(filename).write_bytes(b"\0" * 100)  # part of the file made it to disk
        if failing == "weights-wrapped":  # safetensors keeps only the text of the OS error
            raise safetensors.SafetensorError(
                "Error while serializing: No space left on device (os error 28)"
            )
        raise _enospc()

    def full_write_text(self: Path, text: str, *args: Any, **kw: Any) -> int:
        if self.name == "config.json" or self.name.startswith(".config.json."):
            raise _enospc()
        return real_write_text(self, text, *args, **kw)

    if failing == "config":
        monkeypatch.setattr(Path, "write_text", full_write_text)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", full_save_file)
    for to in ("deit", "hf"):
        code, _, err = _run(["convert", str(src), str(out), "--to", to], capsys)
        assert code == 2 and "disk full" in _one_line_error(err, "convert")
        assert list(work.iterdir()) == []  # no folder, no temporary sibling
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    monkeypatch.setattr(Path, "write_text", real_write_text)

    code, _, err = _run(["convert", str(src), str(out), "--to", "deit"], capsys)
    assert code == 0, err
    assert [p.name for p in work.iterdir()] == ["converted"]
    assert load_model(out).labels == LABELS
    assert out.stat().st_mode & 0o777 == _default_mode("dir")  # not mkdtemp's 0700
    for name in ("config.json", "model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == _default_mode("file"), name


def test_save_model_onto_an_existing_folder_keeps_the_old_files_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    folder = _model_dir(tmp_path / "m")
    (folder / "README.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full(*args: Any, **kw: Any) -> None:
        raise _enospc()

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiskFullError, match="disk full"):
        save_model(_tiny(), folder, labels=["a", "b", "c"], preprocess=PreprocessConfig())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_onnx_export_onto_a_full_disk_leaves_no_truncated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    src = _model_dir(tmp_path / "m")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "model.onnx"
    real_save = onnx.save

    def full_save(proto: Any, f: Any, *args: Any, **kw: Any) -> None:
        Path(f).write_bytes(proto.SerializeToString()[:1000])  # truncated
        raise _enospc()

    monkeypatch.setattr(onnx, "save", full_save)
    code, _, err = _run(["export", "-m", str(src), str(out), "--ort-fused"], capsys)
    assert code == 2 and "disk full" in _one_line_error(err, "export")
    assert list(work.iterdir()) == []
    monkeypatch.setattr(onnx, "save", real_save)
    code, out_text, err = _run(["export", "-m", str(src), str(out), "--ort-fused"], capsys)
    assert code == 0, err
    assert [p.name for p in work.iterdir()] == ["model.onnx"] and "OK" in out_text


def test_dynamo_onnx_export_onto_a_full_disk_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from deit.deploy.export import export_onnx

    def full_save(proto: Any, f: Any, *args: Any, **kw: Any) -> None:
        Path(f).write_bytes(b"\0" * 1000)
        raise _enospc()

    monkeypatch.setattr(onnx, "save", full_save)  # add_onnx_metadata's rewrite
    with pytest.raises(DiskFullError, match="disk full"):
        export_onnx(_tiny(), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_torch_export_refuses_a_full_disk_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's zip writer aborts the process on ENOSPC, so free space is checked first."""
    import shutil

    from deit.deploy.export import export_torch

    model, out = _tiny(), tmp_path / "model.pt2"
    real_usage, real_save = shutil.disk_usage, torch.export.save
    calls: list[str] = []

    def nearly_full(path: Any) -> Any:
        return real_usage(path)._replace(free=100_000)  # the tiny model is ~0.3 MB

    def spy_save(*args: Any, **kw: Any) -> None:
        calls.append("save")
        return real_save(*args, **kw)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    monkeypatch.setattr(torch.export, "save", spy_save)
    with pytest.raises(DiskFullError, match="disk full"):
        export_torch(model, out)
    assert calls == [] and list(tmp_path.iterdir()) == []

    def full_save(program: Any, f: Any, **kw: Any) -> None:
        Path(f).write_bytes(b"PK\0")
        raise _enospc()

    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    monkeypatch.setattr(torch.export, "save", full_save)
    with pytest.raises(DiskFullError, match="disk full"):
        export_torch(model, out)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(torch.export, "save", real_save)
    assert export_torch(model, out) == out and [p.name for p in tmp_path.iterdir()] == [out.name]


# --------------------------------------------------------------------------- item 4: one line


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny stand-in with the Fashion-MNIST file layout."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28)) + labels[:, None, None] * 20
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_bytes(images, gz=True))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_bytes(labels, gz=True))
    return root


def _train_args(data: Path, *extra: str) -> list[str]:
    return [
        "model.name=deit",
        "model.patch_size=7",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "data.batch_size=32",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "run.progress=false",
        "run.device=cpu",
        "augment.repeated_aug=1",
        f"data.path={data}",
        *extra,
    ]


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage that is not a checkpoint" * 10])
def test_resume_from_an_unusable_last_pt_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(content)
    (run / "config.json").write_text("{}\n")
    args = ["train", "--out", str(run), "--resume", *_train_args(tmp_path / "no-data")]
    code, _, err = _run(args, capsys)
    line = _one_line_error(err, "train")
    assert code == 2 and str(run / "last.pt") in line
    assert "delete" in line and "--out" in line and "weights_only" not in line
    assert (run / "config.json").read_text() == "{}\n"


def test_failed_resume_with_another_model_keeps_config_json(
    fake_fmnist: Path, tmp_path: Path
) -> None:
    from deit.train.loop import train
    from deit.train.runconfig import load_config

    run = train(load_config(None, _train_args(fake_fmnist, "run.max_steps=1")), out_dir=tmp_path)
    before = (run / "config.json").read_bytes()
    changed = load_config(None, _train_args(fake_fmnist, "model.embed_dim=64"))
    with pytest.raises(TrainingError, match=r"last\.pt.*model\.embed_dim") as e:
        train(changed, out_dir=run, resume=True)
    assert "\n" not in str(e.value)
    assert (run / "config.json").read_bytes() == before
    resumed = train(load_config(None, _train_args(fake_fmnist)), out_dir=run, resume=True)
    assert json.loads((resumed / "config.json").read_text())["run"]["max_steps"] == 0


def test_a_label_list_shorter_than_the_classes_is_refused_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _model_dir(tmp_path / "m")
    meta = json.loads((folder / "config.json").read_text())
    meta["labels"] = LABELS[:2]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json lists 2 labels .* 3 classes"):
        load_model(folder)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code, _, err = _run(["predict", "-m", str(folder), str(image), "--device", "cpu"], capsys)
    assert code == 2 and "2 labels" in _one_line_error(err, "predict")
    (tmp_path / "short.txt").write_text("one\ntwo\n")
    meta["labels"] = LABELS
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"short\.txt has 2 names; the model has 3 classes"):
        load_model(folder, labels=tmp_path / "short.txt")


# --------------------------------------------------------------------------- item 5: inputs


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


def test_symlink_loops_neither_repeat_nor_hang(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    x = _png(d / "x.png")
    _png(d / "sub" / "y.png")
    (d / "loop").symlink_to(".")
    assert expand_paths([f"{d}/**/x.png"]) == [str(x)]
    (d / "sub" / "back").symlink_to("..")  # two loops: exponential for glob.glob
    t0 = time.perf_counter()
    assert expand_paths([f"{d}/**/x.png"]) == [str(x)]
    assert expand_paths([f"{d}/**/nothing.png"]) == [f"{d}/**/nothing.png"]
    assert expand_paths([d]) == [str(d / "sub" / "y.png"), str(x)]  # sorted, once each
    assert time.perf_counter() - t0 < 10


def test_inputs_are_deduplicated_by_real_path_and_links_followed(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    x = _png(d / "x.png")
    (d / "alias.png").symlink_to("x.png")
    outside = _png(tmp_path / "other" / "z.png")
    (d / "ext").symlink_to(tmp_path / "other")
    found = expand_paths([d, x, f"{d}/*.png"])
    assert sorted(os.path.realpath(p) for p in found) == sorted(
        os.path.realpath(p) for p in (x, outside)
    )
    assert len(found) == 2


def test_an_empty_input_path_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "here.png")  # what '' used to predict: the current folder
    with pytest.raises(UsageError, match="empty input path"):
        expand_paths([""])
    src = _model_dir(tmp_path / "m")
    code, out, err = _run(["predict", "-m", str(src), "", "--device", "cpu"], capsys)
    assert code == 2 and "empty input path" in _one_line_error(err, "predict") and out == ""


def test_an_empty_class_folder_is_refused_for_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from deit.train.data import ImageFolder

    _png(tmp_path / "cat" / "a.png")
    (tmp_path / "dog").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*dog has no image files"):
        ImageFolder(tmp_path)
    ds = ImageFolder(tmp_path, classes=["cat", "dog"])  # classes given: absent, with a warning
    assert len(ds) == 1 and "dog" in caplog.text


def test_negative_counts_in_a_training_config_are_refused() -> None:
    from deit.train.runconfig import load_config

    with pytest.raises(ConfigError, match=r"data\.train_subset must be >= 0, not -5"):
        load_config(None, ["data.train_subset=-5"]).validate()
    with pytest.raises(ConfigError, match=r"run\.log_every must be >= 1"):
        load_config(None, ["run.log_every=0"]).validate()


# --------------------------------------------------------------------------- item 6: dtype


@pytest.mark.parametrize("to", ["deit", "hf"])
def test_convert_keeps_the_stored_dtype_by_default(tmp_path: Path, to: str) -> None:
    from safetensors.torch import load_file

    half = _model_dir(tmp_path / "half", dtype=torch.float16)
    kept = convert(half, tmp_path / "kept", to=to)  # type: ignore[arg-type]
    assert {t.dtype for t in load_file(kept / "model.safetensors").values()} == {torch.float16}
    back = convert(kept, tmp_path / "back", to="deit")  # hf keys map back to ours too
    assert {t.dtype for t in load_file(back / "model.safetensors").values()} == {torch.float16}
    full = convert(half, tmp_path / "fp32", to=to, dtype="fp32")  # type: ignore[arg-type]
    assert {t.dtype for t in load_file(full / "model.safetensors").values()} == {torch.float32}


def test_files_written_through_safetensors_keep_an_ordinary_mode(tmp_path: Path) -> None:
    """safetensors recreates the file it writes 0600; atomic_path gives it back the mode a new
    file gets (or the mode of the file it replaces), so other users can read statistics."""
    import safetensors.torch
    import torch

    from deit.runtime import atomic_path

    out = tmp_path / "stats.safetensors"
    with atomic_path(out, suffix=".safetensors") as tmp:
        safetensors.torch.save_file({"a": torch.zeros(2)}, str(tmp))
    assert out.stat().st_mode & 0o777 == _default_mode("file")
    out.chmod(0o640)
    with atomic_path(out, suffix=".safetensors") as tmp:
        safetensors.torch.save_file({"a": torch.ones(2)}, str(tmp))
    assert out.stat().st_mode & 0o777 == 0o640
