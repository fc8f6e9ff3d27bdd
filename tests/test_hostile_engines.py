"""Hostile files for the engines (issue #24, items 1, 4, 5, 6 and the engine messages of 10).

* ``.pt2`` archives whose entries differ from PyTorch's records only in case: PyTorch's zip
  reader ignores case, so such an entry may be what it reads. Each payload, if it ran, would
  create a marker file; every test checks that it does not exist.
* ONNX graphs and OpenVINO IRs that would allocate without bound once compiled, and IRs whose
  XML would crash the engine's parser: refused before the engine sees them.
* Outputs that do not fit the metadata (too many or too few logits, wrong rank, NaN):
  refused at load, or an error for the one input, never a wrong answer or a traceback.
* Engine errors in one line that names the file.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit.cli import main
from deit.config import DeiTConfig
from deit.errors import ExportError, NonFiniteOutputError, ResourceLimitError, UnsafeFileError
from deit.inference import Classifier, load_any
from deit.safety import check_pt2, load_exported_module
from deit.train.teachers import load_teacher
from deit.transforms import PreprocessConfig
from tests.deploy_helpers import save_tiny_model
from tests.test_hostile_loaders import RGB32, Payload, export_teacher, rewrite_zip

# --------------------------------------------------------------------------- helpers


def one_line_error(capfd: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``deit ARGV``: exit 2 and one line on stderr, counting what PyTorch's own log
    handlers write to the process's stderr (hence ``capfd``). Returns the line."""
    code = main(argv)
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def image_folder(root: Path, classes: int = 2) -> Path:
    """A labelled image folder: one grey 32x32 image per class."""
    for i in range(classes):
        (root / f"class-{i}").mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / f"class-{i}" / "a.png")
    return root


def _config_of(good: Path, kind: str) -> tuple[str, dict]:
    with zipfile.ZipFile(good) as z:
        name = next(n for n in z.namelist() if n.endswith(f"_{kind}_config.json"))
        return name.partition("/")[2], json.loads(z.read(name))


def insert_entries(good: Path, dst: Path, extra: dict[str, bytes], position: int) -> Path:
    """Copy ``good`` with ``extra`` entries (names inside its top folder) placed before its
    ``position``-th entry (-1: at the end): where PyTorch finds them depends on it."""
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].partition("/")[0]
        items = [(info.filename, zin.read(info)) for info in zin.infolist()]
        at = len(items) if position < 0 else position
        items[at:at] = [(f"{root}/{name}", data) for name, data in extra.items()]
        for name, data in items:
            zout.writestr(name, data)
    return dst


def case_twin_of_weights_config(good: Path, marker: Path) -> dict[str, bytes]:
    """``model_weights_config.JSON``, a copy of the weights config that marks its first weight
    ``use_pickle`` and points it at a pickle whose unpickling creates ``marker``."""
    name, config = _config_of(good, "weights")
    first = next(iter(config["config"].values()))
    first.update(use_pickle=True, path_name="evil")
    return {
        name.removesuffix(".json") + ".JSON": json.dumps(config).encode(),
        "data/weights/evil": pickle.dumps(Payload(marker)),
    }


# --------------------------------------------------------------------------- 1. .pt2 by case


@pytest.mark.parametrize("position", [0, 1, 3, 9, -1])
def test_a_weights_config_differing_only_in_case_is_refused_and_runs_nothing(
    tmp_path: Path, position: int
) -> None:
    """PyTorch read the ``.JSON`` twin in place of the real config at positions 1, 3 and 9
    (measured on torch 2.14) and unpickled the payload; the old check never opened it."""
    marker = tmp_path / "pwned"
    good = export_teacher(tmp_path / "good.pt2")
    twin = case_twin_of_weights_config(good, marker)
    evil = insert_entries(good, tmp_path / "evil.pt2", twin, position)
    for load in (check_pt2, load_exported_module):
        with pytest.raises(UnsafeFileError, match=r"only in case|one record to PyTorch"):
            load(evil)
    with pytest.raises(UnsafeFileError):
        load_teacher(str(evil), student=RGB32, num_classes=10)
    assert not marker.exists()


def test_a_constants_config_differing_only_in_case_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = export_teacher(tmp_path / "good.pt2")
    name, _ = _config_of(good, "constants")
    twin = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False}}}
    extra = {
        name.upper().replace("DATA/CONSTANTS/", "data/constants/"): json.dumps(twin).encode(),
        "data/constants/opaque_obj_0": pickle.dumps(Payload(marker)),
    }
    for position in (0, -1):
        evil = insert_entries(good, tmp_path / f"evil{position}.pt2", extra, position)
        with pytest.raises(UnsafeFileError, match=r"only in case|one record to PyTorch"):
            load_exported_module(evil)
    assert not marker.exists()


def _json_payload_config_named(name: str, marker: Path) -> dict[str, bytes]:
    config = {"config": {"w": {"path_name": "evil", "is_param": True, "use_pickle": True}}}
    return {name: json.dumps(config).encode(), "data/weights/evil": pickle.dumps(Payload(marker))}


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        # a config under any name is checked: PyTorch reads the one named after the model
        (lambda m: _json_payload_config_named("data/weights/other.json", m), "use_pickle"),
        # a file no config describes is not raw tensor bytes PyTorch would read
        (lambda m: {"data/weights/evil": pickle.dumps(Payload(m))}, "no payload config"),
        (lambda m: {"data/constants/opaque_obj_7": pickle.dumps(Payload(m))}, "no payload"),
        # the case of folders and of known records counts too
        (lambda m: {"DATA/weights/x": b"1"}, "only in case"),
        (lambda m: {"Archive_Format": b"pt2"}, "archive_format"),
        (lambda m: {"data/weights/weight_0.PT": b"1"}, "only in case"),
        (lambda m: {"data/weights/WEIGHT_0": pickle.dumps(Payload(m))}, "one record"),
    ],
    ids=["other-json", "undescribed", "undescribed-constant", "folder", "marker", "pt", "twin"],
)
def test_every_file_a_config_could_unpickle_is_inspected(
    tmp_path: Path, extra: object, why: str
) -> None:
    marker = tmp_path / "pwned"
    good = export_teacher(tmp_path / "good.pt2")
    evil = insert_entries(good, tmp_path / "evil.pt2", extra(marker), 0)  # type: ignore[operator]
    with pytest.raises(UnsafeFileError, match=why):
        load_exported_module(evil)
    assert not marker.exists()
    check_pt2(good)  # the untouched export still passes


def test_deit_eval_refuses_a_case_twin_teacher_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    model = save_tiny_model(tmp_path / "model")
    good = export_teacher(tmp_path / "t.pt2")
    evil = insert_entries(good, tmp_path / "evil.pt2", case_twin_of_weights_config(good, marker), 9)
    argv = ["eval", "--model", str(model), "--data", str(image_folder(tmp_path / "images"))]
    err = one_line_error(capfd, [*argv, "--device", "cpu", "--teacher", str(evil)])
    assert "evil.pt2" in err and "ignores case" in err and "--trust-code" in err
    assert not marker.exists()


# --------------------------------------------------------------------------- 10. messages


def test_a_teacher_torch_cannot_deserialize_is_one_line_without_torch_warnings(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """torch.export.load logs the whole traceback as a warning, then raises "see the warnings
    above"; only our line, with the real cause, may show."""
    good = export_teacher(tmp_path / "t.pt2")
    name, config = _config_of(good, "weights")
    meta = next(iter(config["config"].values()))["tensor_meta"]
    meta["sizes"] = [{"as_int": 20}, {"as_int": 3072}]  # the file holds 10 x 3072

    def edit(entry: str, data: bytes) -> bytes:
        return json.dumps(config).encode() if entry == name else data

    broken = rewrite_zip(good, tmp_path / "broken.pt2", edit)
    model = save_tiny_model(tmp_path / "model")
    argv = ["eval", "--model", str(model), "--data", str(image_folder(tmp_path / "images"))]
    err = one_line_error(capfd, [*argv, "--device", "cpu", "--teacher", str(broken)])
    assert "broken.pt2" in err and "out of bounds" in err and "warnings above" not in err


# --------------------------------------------------------------------------- exported graphs

CONFIG = DeiTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=10)
PREPROCESS = PreprocessConfig(
    resize_mode="squash", resize_size=(32, 32), crop_size=None, mean=(0.5,) * 3, std=(0.5,) * 3
)
METADATA = {
    "config": json.dumps(CONFIG.to_dict()),
    "labels": json.dumps([f"class-{i}" for i in range(10)]),
    "preprocess": json.dumps(PREPROCESS.to_dict()),
    "dynamic_batch": "true",
}
BOMB = 20_000  # a constant broadcast to BOMB x BOMB floats: 1.6 GB once compiled


def onnx_file(path: Path, kind: str, classes: int = 10) -> Path:
    """A dynamic-batch ONNX classifier with our metadata. ``kind``: ``plain`` (flatten, matmul
    to ``classes``), ``4d`` (its logits as N x classes x 1 x 1), ``bomb`` (plus an Expand of a
    constant to BOMB x BOMB), ``sqrt`` (the square root of each image's mean: NaN for dark
    images)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value, name)

    weights = np.random.default_rng(0).standard_normal((3072, classes)).astype(np.float32)
    inits = [const("w", weights), const("axes", np.array([2, 3], np.int64))]
    nodes = [
        helper.make_node("Flatten", ["pixel_values"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),
    ]
    out = "scores"
    if kind == "4d":
        nodes.append(helper.make_node("Unsqueeze", ["scores", "axes"], ["scores4"]))
        out = "scores4"
    elif kind == "bomb":
        inits += [const("one", np.ones(1, np.float32)), const("big", np.array([BOMB] * 2))]
        nodes += [
            helper.make_node("Expand", ["one", "big"], ["huge"], name="the_bomb"),
            helper.make_node("ReduceSum", ["huge"], ["total"], keepdims=0),
            helper.make_node("Add", ["scores", "total"], ["scores_b"]),
        ]
        out = "scores_b"
    elif kind == "sqrt":
        inits.append(const("ones", np.ones((1, classes), np.float32)))
        nodes += [
            helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
            helper.make_node("Sqrt", ["mean"], ["root"]),
            helper.make_node("Mul", ["root", "ones"], ["scores_s"]),
        ]
        out = "scores_s"
    nodes.append(helper.make_node("Identity", [out], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for key, value in METADATA.items():
        proto.metadata_props.add(key=f"deit.{key}", value=value)
    onnx.save(proto, str(path))
    return path


def ir_file(path: Path, kind: str, classes: int = 10) -> Path:
    """The OpenVINO IR twin of :func:`onnx_file` (``bomb``: a Broadcast)."""
    ov = pytest.importorskip("openvino")
    from openvino import opset13 as ops

    from deit.openvino_model import set_openvino_metadata

    x = ops.parameter([-1, 3, 32, 32], np.float32, name="pixel_values")
    flat = ops.reshape(x, ops.constant(np.array([0, -1])), special_zero=True)
    weights = np.random.default_rng(0).standard_normal((3072, classes)).astype(np.float32)
    scores = ops.matmul(flat, ops.constant(weights), False, False)
    if kind == "4d":
        scores = ops.unsqueeze(scores, ops.constant(np.array([2, 3])))
    elif kind == "bomb":
        huge = ops.broadcast(ops.constant(np.float32(1)), ops.constant(np.array([BOMB] * 2)))
        huge.set_friendly_name("the_bomb")
        scores = ops.add(scores, ops.reduce_sum(huge, ops.constant(np.array([0, 1])), False))
    model = ov.Model([scores], [x], "hostile")
    model.outputs[0].get_tensor().set_names({"logits"})
    set_openvino_metadata(model, METADATA)
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if anything compiles a model: ONNX Runtime sessions, OpenVINO compilation."""

    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("compiled a model")

    monkeypatch.setattr("deit.onnx_model.OnnxRunner.__init__", refuse)
    monkeypatch.setattr("deit.openvino_model.compile_model", refuse)


@pytest.mark.parametrize("make", [onnx_file, ir_file], ids=["onnx", "openvino"])
def test_a_graph_that_would_allocate_gigabytes_is_refused_before_compiling(
    tmp_path: Path, make: object, capfd: pytest.CaptureFixture[str]
) -> None:
    suffix = ".onnx" if make is onnx_file else ".xml"
    bomb = make(tmp_path / f"bomb{suffix}", "bomb")  # type: ignore[operator]
    assert bomb.stat().st_size < 200_000  # a file of 120 KB
    with pytest.raises(ResourceLimitError, match=r"the_bomb.*1,600,000,000 bytes"):
        load_any(bomb)
    image = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    err = one_line_error(capfd, ["predict", "--model", str(bomb), str(image)])
    assert str(bomb) in err and "the_bomb" in err
    plain = make(tmp_path / f"plain{suffix}", "plain")  # type: ignore[operator]
    assert load_any(plain).model(torch.zeros(3, 3, 32, 32)).logits.shape == (3, 10)


@pytest.mark.usefixtures("no_engine")
@pytest.mark.parametrize("make", [onnx_file, ir_file], ids=["onnx", "openvino"])
def test_info_reads_metadata_only(
    tmp_path: Path, make: object, capsys: pytest.CaptureFixture[str]
) -> None:
    suffix = ".onnx" if make is onnx_file else ".xml"
    bomb = make(tmp_path / f"bomb{suffix}", "bomb")  # type: ignore[operator]
    assert main(["info", "--json", "--model", str(bomb)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_labels"] == 10 and info["config"] == CONFIG.to_dict()


@pytest.mark.parametrize("make", [onnx_file, ir_file], ids=["onnx", "openvino"])
@pytest.mark.parametrize(("kind", "classes"), [("plain", 50), ("plain", 3), ("4d", 10)])
def test_logits_that_do_not_fit_the_metadata_are_refused_at_load(
    tmp_path: Path, make: object, kind: str, classes: int
) -> None:
    suffix = ".onnx" if make is onnx_file else ".xml"
    path = make(tmp_path / f"m{suffix}", kind, classes)  # type: ignore[operator]
    with pytest.raises(ExportError, match=r"logits output is .* metadata says 10 classes"):
        load_any(path)


def test_logits_are_checked_on_every_batch(tmp_path: Path) -> None:
    from deit.onnx_model import OnnxModel

    path = onnx_file(tmp_path / "m.onnx", "plain")
    model = OnnxModel(path, CONFIG.replace(num_classes=3), dynamic_batch=True)
    with pytest.raises(ExportError, match=r"shape \(2, 10\) for 2 images.* 3 classes"):
        model(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("make", [onnx_file], ids=["onnx"])
def test_non_finite_outputs_are_an_error_for_that_image_only(
    tmp_path: Path, make: object, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path / "sqrt.onnx", "sqrt")  # type: ignore[operator]
    dark, grey = tmp_path / "dark.png", tmp_path / "grey.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(dark)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(grey)
    assert main(["predict", "--json", "--model", str(path), str(dark), str(grey)]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["error"] and "not a finite number" in rows[0]["error"]
    assert rows[0]["predictions"] == []
    assert rows[1]["error"] is None and len(rows[1]["predictions"]) == 5
    assert all(np.isfinite(p["score"]) for p in rows[1]["predictions"])
    clf = Classifier.from_pretrained(str(path))
    with pytest.raises(NonFiniteOutputError, match="not a finite number"):
        clf.predict([str(dark)])


# --------------------------------------------------------------------------- IR XML


def _rewrite_xml(src: Path, dst: Path, change: Callable[[str], str]) -> Path:
    dst.write_text(change(src.read_text()))
    dst.with_suffix(".bin").write_bytes(src.with_suffix(".bin").read_bytes())
    return dst


def test_a_deeply_nested_ir_is_refused_not_a_crash(tmp_path: Path) -> None:
    """20,000 nested rt_info elements crashed OpenVINO's parser (SIGSEGV, no message)."""
    good = ir_file(tmp_path / "good.xml", "plain")
    nest = "<a>" * 20_000 + "</a>" * 20_000
    deep = _rewrite_xml(
        good, tmp_path / "deep.xml", lambda t: t.replace("</rt_info>", nest + "</rt_info>", 1)
    )
    for command in ("info", "predict"):
        argv = [sys.executable, "-m", "deit", command, "--model", str(deep)]
        run = subprocess.run(
            [*argv, *(["x.png"] if command == "predict" else [])],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2, (run.returncode, run.stderr[-500:])
        assert len(run.stderr.strip().splitlines()) == 1 and "deep.xml" in run.stderr
        assert "more than 64 deep" in run.stderr


XML_ATTACKS = {
    "xxe": '<!DOCTYPE net [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
    "billion-laughs": '<!DOCTYPE net [<!ENTITY a "aaaaaaaaaa">'
    + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi"))
    + "]>",
}


@pytest.mark.parametrize("attack", sorted(XML_ATTACKS))
def test_doctype_and_entities_in_an_ir_are_refused(tmp_path: Path, attack: str) -> None:
    good = ir_file(tmp_path / "good.xml", "plain")
    ref = "&x;" if attack == "xxe" else "&i;"

    def change(text: str) -> str:
        head, _, rest = text.partition("?>")
        rest = rest.replace('<head value="', f'<head value="{ref}', 1)
        return f"{head}?>{XML_ATTACKS[attack]}{rest}"

    evil = _rewrite_xml(good, tmp_path / "evil.xml", change)
    for load in (load_any, lambda p: load_any(p, engine=False)):
        with pytest.raises(ExportError, match="DOCTYPE"):
            load(evil)


def test_openvino_errors_are_one_line_naming_the_file_and_the_cause(tmp_path: Path) -> None:
    good = ir_file(tmp_path / "good.xml", "plain")
    bad = _rewrite_xml(
        good, tmp_path / "bad.xml", lambda t: t.replace('type="MatMul"', 'type="NoSuchOp"', 1)
    )
    with pytest.raises(ExportError) as e:
        load_any(bad)
    message = str(e.value)
    assert "\n" not in message and "bad.xml" in message and "NoSuchOp" in message, message
    assert not message.rstrip().endswith(":"), message


def test_quantizing_an_ir_prints_no_cuda_probe(tmp_path: Path) -> None:
    """NNCF's import of torch.utils.cpp_extension warned "No CUDA runtime is found" on a CPU
    machine with a CUDA toolkit installed (it can only show where one is, as here)."""
    pytest.importorskip("nncf")
    ir = ir_file(tmp_path / "m.xml", "plain")
    code = (
        "import torch, openvino as ov\n"
        "from deit.deploy.openvino import quantize_ir\n"
        f"quantize_ir(ov.Core().read_model({str(ir)!r}), torch.randn(2, 3, 32, 32))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "No CUDA runtime" not in run.stderr and "CUDA_HOME" not in run.stderr, run.stderr
