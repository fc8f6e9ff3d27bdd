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
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deit.cli import main
from deit.errors import UnsafeFileError
from deit.safety import check_pt2, load_exported_module
from deit.train.teachers import load_teacher
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
