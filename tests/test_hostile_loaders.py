"""Hostile files given to the loaders (issue #16, items 1, 2 and 6).

* Files that would run code when loaded: a ``.pt2`` carrying pickles or strings PyTorch
  evaluates, TorchScript teachers, pickles with payloads. Each payload, if it ran, would
  create a marker file; every test checks that it does not exist.
* Allocation bombs: small files whose keys or configs claim huge models or images. A guard
  on ``DeiT.__init__`` fails the test if a model of more than 100 blocks is ever built on a
  real device (building one on the ``meta`` device allocates nothing and is allowed).
* Error messages that name the real problem.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from deit.checkpoints import load_model, read_state_dict
from deit.cli import build_parser, main
from deit.config import LIMITS, VARIANTS, DeiTConfig
from deit.deploy.export import export_torch, read_metadata, run_exported
from deit.errors import CheckpointError, ConfigError, ResourceLimitError, UnsafeFileError
from deit.model import DeiT
from deit.safety import check_pt2, pickle_globals
from deit.train.data import InputSpec
from deit.train.runconfig import load_config
from deit.train.teachers import load_teacher
from deit.transforms import PreprocessConfig
from tests.deploy_helpers import save_tiny_model

RGB32 = InputSpec((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32, 3)

# --------------------------------------------------------------------------- helpers


class Payload:
    """Unpickling this creates ``path`` (what an attacker's os.system would do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.path, "w"))


def teacher_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()


def export_teacher(path: Path, *, dynamic: bool = False) -> Path:
    """A real torch.export archive of a tiny classifier of 3x32x32 images."""
    x = torch.randn(2, 3, 32, 32)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    torch.export.save(torch.export.export(teacher_net(), (x,), dynamic_shapes=shapes), str(path))
    return path


def rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy an archive, passing each entry (its name inside the top folder, its bytes) through
    ``edit``; None drops the entry. ``edit.extra`` (a dict, optional) adds entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].partition("/")[0]
        for info in zin.infolist():
            data = edit(info.filename.partition("/")[2], zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in getattr(edit, "extra", {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def make_evil_pt2(good: Path, dst: Path, marker: Path) -> Path:
    """``good`` with its first weight marked ``use_pickle`` and replaced by a pickle whose
    unpickling creates ``marker``."""
    with zipfile.ZipFile(good) as z:
        name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(z.read(name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True

    def edit(entry: str, data: bytes) -> bytes | None:
        if entry.endswith("_weights_config.json"):
            return json.dumps(config).encode()
        if entry == f"data/weights/{first['path_name']}":
            return pickle.dumps(Payload(marker))
        return data

    return rewrite_zip(good, dst, edit)


@pytest.fixture
def no_big_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if a DeiT of more than 100 blocks is built anywhere but on the meta device."""
    original = DeiT.__init__

    def guarded(self: DeiT, config: DeiTConfig) -> None:
        if config.depth > 100 and torch.get_default_device().type != "meta":
            raise AssertionError(f"allocated a {config.depth}-block model")
        original(self, config)

    monkeypatch.setattr(DeiT, "__init__", guarded)


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``deit ARGV``; it must fail with exit 2 and one line on stderr. Returns the line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- 1. code in files


def test_pickled_pt2_teacher_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = export_teacher(tmp_path / "good.pt2")
    evil = make_evil_pt2(good, tmp_path / "evil.pt2", marker)
    with pytest.raises(UnsafeFileError, match=r"use_pickle.*distill\.trust_code=true"):
        load_teacher(str(evil), student=RGB32, num_classes=10)
    with pytest.raises(UnsafeFileError, match="use_pickle"):
        read_metadata(evil)
    with pytest.raises(UnsafeFileError, match="use_pickle"):
        run_exported(evil, torch.zeros(1, 3, 32, 32), dynamic_batch=False)
    assert not marker.exists()
    # the untouched archive loads as a teacher with no opt-in: a .pt2 is data once checked
    teacher = load_teacher(str(good), student=RGB32, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), teacher_net()(x))


def test_deit_eval_refuses_a_pickled_pt2_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    model = save_tiny_model(tmp_path / "model")
    data = tmp_path / "images"
    for label in ("class-0", "class-1"):
        (data / label).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(data / label / "a.png")
    evil = make_evil_pt2(export_teacher(tmp_path / "t.pt2"), tmp_path / "evil.pt2", marker)
    argv = ["eval", "--model", str(model), "--data", str(data), "--device", "cpu"]
    err = one_line_error(capsys, [*argv, "--teacher", str(evil)])
    assert "could run code" in err and "--trust-code" in err
    assert not marker.exists()


def _graph_edit(change: Callable[[dict], None]) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.startswith("models/") and name.endswith(".json"):
            program = json.loads(data)
            change(program)
            return json.dumps(program).encode()
        return data

    return edit


def _set_first(obj: object, key: str, value: object) -> bool:
    """Replace the first value of ``key`` found in a JSON tree."""
    if isinstance(obj, dict):
        if key in obj:
            obj[key] = value
            return True
        return any(_set_first(v, key, value) for v in obj.values())
    if isinstance(obj, list):
        return any(_set_first(v, key, value) for v in obj)
    return False


def _python(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


CODE_IN_PT2 = {
    # torch evaluates symbolic shapes with sympy.sympify, i.e. eval()
    "sympy expression": lambda m: _graph_edit(lambda p: _set_first(p, "expr_str", _python(m))),
    # torch exec()s guard code when building the module
    "guard code": lambda m: _graph_edit(lambda p: p.update(guards_code=[f"{_python(m)} or 1"])),
    # names are pasted into the generated forward() source
    "parameter name": lambda m: _graph_edit(
        lambda p: _set_first(p, "parameter_name", f'x")\n{_python(m)}\n("')
    ),
    "range bound": lambda m: _graph_edit(
        lambda p: p["range_constraints"][next(iter(p["range_constraints"]))].update(
            max_val=_python(m)
        )
    ),
}


@pytest.mark.parametrize("kind", sorted(CODE_IN_PT2))
def test_pt2_strings_that_torch_would_evaluate_are_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    good = export_teacher(tmp_path / "good.pt2", dynamic=True)
    evil = rewrite_zip(good, tmp_path / "evil.pt2", CODE_IN_PT2[kind](marker))
    with pytest.raises(UnsafeFileError):
        load_teacher(str(evil), student=RGB32, num_classes=10)
    assert not marker.exists()


def _pickled_sample_inputs(marker: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.startswith("data/sample_inputs/"):
            buffer = __import__("io").BytesIO()
            torch.save(((torch.zeros(1),), {"x": Payload(marker)}), buffer)
            return buffer.getvalue()
        return data

    return edit


def _with_entry(name: str, data: bytes) -> Callable[[str, bytes], bytes | None]:
    def edit(n: str, d: bytes) -> bytes | None:
        return d

    edit.extra = {name: data}  # type: ignore[attr-defined]
    return edit


def _opaque_constant(marker: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith("_constants_config.json"):
            return json.dumps(
                {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False}}}
            ).encode()
        return data

    edit.extra = {"data/constants/opaque_obj_0": pickle.dumps(Payload(marker))}  # type: ignore[attr-defined]
    return edit


PICKLES_IN_PT2 = {
    # torch.load(weights_only=True), then on failure weights_only=False
    "sample inputs": _pickled_sample_inputs,
    # pickle.loads, whatever use_pickle says
    "opaque constant": _opaque_constant,
    # the legacy layout: one pickle of all weights
    "legacy weights": lambda m: _with_entry("data/weights/model.pt", pickle.dumps(Payload(m))),
    # a compiled shared library, dlopen()ed
    "aotinductor": lambda m: _with_entry("data/aotinductor/model/model.so", b"\x7fELF"),
}


@pytest.mark.parametrize("kind", sorted(PICKLES_IN_PT2))
def test_pt2_pickles_and_native_code_are_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    good = export_teacher(tmp_path / "good.pt2")
    evil = rewrite_zip(good, tmp_path / "evil.pt2", PICKLES_IN_PT2[kind](marker))
    with pytest.raises(UnsafeFileError, match=r"could run code|refused"):
        check_pt2(evil)
    with pytest.raises(UnsafeFileError):
        load_teacher(str(evil), student=RGB32, num_classes=10)
    assert not marker.exists()


def test_pt2_zip_bomb_is_refused_before_loading(tmp_path: Path) -> None:
    good = export_teacher(tmp_path / "good.pt2")
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith("data/weights/weight_0"):  # 80 MB of zeros, deflated
                zout.writestr(info.filename, bytes(80 << 20), zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(info, zin.read(info))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ResourceLimitError, match="zip bomb"):
        load_teacher(str(bomb), student=RGB32, num_classes=10)


def test_our_own_pt2_export_passes_the_check(tmp_path: Path) -> None:
    loaded = load_model(save_tiny_model(tmp_path / "m"))
    path = export_torch(loaded, tmp_path / "m.pt2", dynamic_batch=True)
    check_pt2(path)
    assert read_metadata(path)["deit.head"] == "avg"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = loaded.model(x).logits.numpy()
    np.testing.assert_allclose(run_exported(path, x, dynamic_batch=True), expected, atol=1e-4)


def test_torchscript_teacher_needs_trust_code_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "teacher.pt"
    torch.jit.save(torch.jit.trace(teacher_net(), x), str(path))
    with pytest.raises(UnsafeFileError, match=r"TorchScript program.*trust_code=True") as err:
        load_teacher(str(path), student=RGB32, num_classes=10)
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="deit.safety"):
        teacher = load_teacher(str(path), student=RGB32, num_classes=10, trust_code=True)
    logged = [r.getMessage() for r in caplog.records]
    assert any(str(path) in line and "trust_code" in line for line in logged), logged
    torch.testing.assert_close(teacher(x), teacher_net()(x))


def test_trust_code_is_a_config_key_and_an_eval_flag() -> None:
    assert load_config(None, []).distill.trust_code is False
    assert load_config(None, ["distill.trust_code=true"]).distill.trust_code is True
    args = build_parser().parse_args(["eval", "--model", "m", "--trust-code"])
    assert args.trust_code is True
    assert build_parser().parse_args(["eval", "--model", "m"]).trust_code is False


# --------------------------------------------------------------------------- 6. error messages


def test_pickle_with_a_payload_is_called_unsafe(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw.pth"  # a plain pickle (torch's legacy format), protocol 4
    raw.write_bytes(pickle.dumps(Payload(marker), protocol=4))
    zipped = tmp_path / "zipped.pth"  # torch.save's zip format
    torch.save({"model": Payload(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(UnsafeFileError, match=r"pickled Python objects \(GLOBAL [\w.]*open\)"):
            read_state_dict(path)
        with pytest.raises(UnsafeFileError, match="could run code; refused"):
            load_model(path)
    assert not marker.exists()
    assert pickle_globals(raw.read_bytes()) in (["io.open"], ["builtins.open"])


def test_pt2_is_not_offered_to_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_model(save_tiny_model(tmp_path / "m"))
    path = export_torch(loaded, tmp_path / "m.pt2")
    err = one_line_error(capsys, ["predict", "--model", str(path), "x.png"])
    assert "torch.export program" in err and "do not load" in err and ".onnx" in err
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "notes.txt")
    assert ".pt2" not in str(e.value) and ".onnx" in str(e.value)


# --------------------------------------------------------------------------- 2. allocation bombs


def _tiny_state(config: DeiTConfig) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in DeiT(config).state_dict().items()}


TINY = DeiTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=10)


@pytest.mark.usefixtures("no_big_models")
def test_stray_block_key_is_refused_before_allocating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bomb.safetensors"
    save_file({**_tiny_state(TINY), "blocks.39999.x": torch.zeros(1)}, str(path))
    assert path.stat().st_size < 1_000_000
    with pytest.raises(CheckpointError, match=r"'blocks\.39999\.x' implies at least 40000 blocks"):
        load_model(path)
    assert "blocks.39999.x" in one_line_error(capsys, ["info", "--model", str(path)])


def _deit_dir(tmp_path: Path, change: Callable[[dict], None]) -> Path:
    folder = save_tiny_model(tmp_path / "m")
    meta = json.loads((folder / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.usefixtures("no_big_models")
def test_config_claiming_a_huge_model_is_refused_before_allocating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _deit_dir(tmp_path / "a", lambda m: m["model"].update(depth=1_000_000))
    err = one_line_error(capsys, ["info", "--model", str(folder)])
    assert "config.json" in err and "depth 1000000 is over the limit" in err
    # within the limits but far larger than the file: refused by the meta-device check
    folder = _deit_dir(tmp_path / "b", lambda m: m["model"].update(depth=200))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.10\.attn"):
        load_model(folder)
    # a transformers config says the same thing in its own words
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"vit.embeddings.cls_token": torch.zeros(1, 1, 64)}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(
        json.dumps({"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 10**6})
    )
    with pytest.raises(CheckpointError, match=r"depth 1000000 is over the limit"):
        load_model(hf)


@pytest.mark.usefixtures("no_big_models")
def test_onnx_metadata_claiming_a_huge_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    def onnx_file(name: str, depth: int) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Identity", ["pixel_values"], ["logits"])],
            "g",
            [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 10])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        config = TINY.to_dict() | {"depth": depth}
        for key, value in {
            "deit.config": json.dumps(config),
            "deit.labels": json.dumps([str(i) for i in range(10)]),
            "deit.preprocess": json.dumps(PreprocessConfig().to_dict()),
        }.items():
            proto.metadata_props.add(key=key, value=value)
        path = tmp_path / name
        onnx.save(proto, str(path))
        return path

    err = one_line_error(capsys, ["info", "--model", str(onnx_file("huge.onnx", 10**6))])
    assert "depth 1000000 is over the limit" in err
    # 200 blocks is allowed: the count is computed on the meta device, allocating nothing
    assert main(["info", "--json", "--model", str(onnx_file("deep.onnx", 200))]) == 0
    info = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        expected = sum(p.numel() for p in DeiT(TINY.replace(depth=200)).parameters())
    assert info["parameters"] == expected


def test_wrong_types_in_config_json_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i, (key, value) in enumerate(
        [("depth", 6.5), ("embed_dim", "64"), ("distilled", "yes"), ("img_size", [32, None])]
    ):
        folder = _deit_dir(tmp_path / str(i), lambda m, k=key, v=value: m["model"].update({k: v}))
        err = one_line_error(capsys, ["info", "--model", str(folder)])
        assert "config.json" in err and key in err, err


def test_preprocess_sizes_are_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"crop_size \(100000, 100000\) is over the limit"):
        PreprocessConfig(crop_size=100_000)
    with pytest.raises(ConfigError, match="resize_size 100000 is over the limit"):
        PreprocessConfig(resize_size=100_000)
    with pytest.raises(ConfigError, match="resize_size"):
        PreprocessConfig(resize_mode="squash", resize_size=(224, 100_000), crop_size=None)
    PreprocessConfig(resize_size=8192, crop_size=(8192, 8192))  # the limit itself is fine
    folder = _deit_dir(tmp_path, lambda m: m["preprocess"].update(crop_size=[100_000, 100_000]))
    err = one_line_error(capsys, ["info", "--model", str(folder)])
    assert "config.json" in err and "crop_size" in err


def test_config_limits_name_the_field_and_pass_every_published_variant() -> None:
    for name, config in VARIANTS.items():
        assert DeiTConfig.from_dict(config.to_dict()) == config, name
    for field, limit in LIMITS.items():
        base = DeiTConfig(img_size=32, patch_size=8, embed_dim=64, num_heads=1, depth=2)
        value = limit * 2 if field != "img_size" else 16384
        changes = {field: value}
        if field == "patch_size":
            changes["img_size"] = value
        with pytest.raises(ConfigError, match=rf"{field} \d+ is over the limit of {limit}"):
            base.replace(**changes)
    with pytest.raises(ConfigError, match=r"depth must be an integer, not 6\.5"):
        DeiTConfig(depth=6.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_heads must be positive"):
        DeiTConfig(num_heads=0)  # was a ZeroDivisionError
