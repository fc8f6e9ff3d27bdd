"""Hostile inputs on the data side (issue 24): elongated images, tar bombs in WebDataset
shards, lying labels, ``deit data pack`` output, Ray ``--resume`` files, training config
values, and hostile Hugging Face ``save_to_disk`` folders and Parquet files.

Each test here failed on the code before its fix; docs/security.md says what each bounds.
"""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit.cli import main
from deit.config import DeiTConfig
from deit.errors import ImageTooLargeError
from deit.model import DeiT
from deit.saving import save_model
from deit.transforms import (
    MAX_SIZE,
    PreprocessConfig,
    check_resize,
    preprocess_image,
    preprocess_pixels,
)

# --------------------------------------------------------------------------- item 2


def _official_model(folder: Path) -> Path:
    """A tiny DeiT with the official eval pipeline: shorter side 36, center crop 32."""
    config = DeiTConfig(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3
    )
    preprocess = PreprocessConfig.official(32)
    return save_model(DeiT(config).eval(), folder, labels=["a", "b", "c"], preprocess=preprocess)


def test_an_elongated_image_is_refused_before_the_resize_allocates() -> None:
    cfg = PreprocessConfig.official(224)  # shorter side 256
    strip = Image.new("RGB", (1, 8192), (200, 10, 10))  # 8,192 pixels
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match=r"1x8192 .* 256x2097152"):
            preprocess_image(strip, cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # nothing near the 1.6 GB the resize would have taken
    with pytest.raises(ImageTooLargeError):
        check_resize(8192, 1, cfg)  # the same lying on its side
    # The bound is a side of MAX_SIZE: 32:1 at a shorter side of 256 still passes.
    assert check_resize(256, 256 * 32, cfg) == (256, MAX_SIZE)
    # A resize that changes nothing allocates nothing, whatever the shape.
    none = PreprocessConfig(resize_mode="none", crop_size=(224, 224))
    assert check_resize(1, 20000, none) == (1, 20000)


def test_preprocess_pixels_counts_what_the_resize_makes() -> None:
    cfg = PreprocessConfig.official(224)
    assert preprocess_pixels(1, 8192, cfg) == 8192 + 256 * 2_097_152 + 224 * 224
    assert preprocess_pixels(640, 480, cfg) == 640 * 480 + 341 * 256 + 224 * 224
    squash = PreprocessConfig(resize_mode="squash", resize_size=(32, 32), crop_size=None)
    assert preprocess_pixels(32, 32, squash) == 32 * 32 + 0 + 32 * 32  # no resize needed
    assert preprocess_pixels(0, 10, cfg) == 0


def test_predict_answers_the_others_of_a_batch_with_an_elongated_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _official_model(tmp_path / "model")
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("a", (40, 50)), ("strip", (8192, 1)), ("b", (64, 48))):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    code = main(["predict", "--model", str(model), "--json", "-b", "8", "--device", "cpu", *paths])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == paths
    assert rows[0]["error"] is None and len(rows[0]["predictions"]) == 3
    assert rows[2]["error"] is None and len(rows[2]["predictions"]) == 3
    assert "too elongated" in rows[1]["error"] and not rows[1]["predictions"]
    assert code == 1 and "1 of 3 inputs failed" in err and "Traceback" not in err


# --------------------------------------------------------------------------- items 3 and 7

datasets = pytest.importorskip("datasets")
pytest.importorskip("webdataset")

from deit.train import hf_data, packing, shards, streams  # noqa: E402  (needs the optional packages above)
from deit.train.data import BadSample  # noqa: E402
from deit.train.fashion_mnist import FASHION_MNIST_CLASSES  # noqa: E402


def _png(value: int = 128, size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sparse_member(name: str, declared: int) -> bytes:
    """A GNU ``S`` (sparse) tar entry, as ``tar --sparse`` writes one for a file of
    ``declared`` bytes that is all holes but its last 512: a header and one data block."""
    info = tarfile.TarInfo(name)
    info.size = 512
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:398] = f"{declared - 512:011o}\0".encode()  # the one data region: offset,
    header[398:410] = f"{512:011o}\0".encode()  # and length
    header[483:495] = f"{declared:011o}\0".encode()  # the real size
    header[148:156] = b"        "
    header[148:156] = f"{sum(header):06o}\0 ".encode()  # the checksum
    return bytes(header) + b"\1" * 512


def _shard(path: Path, members: list[tuple[str, bytes]], raw: bytes = b"") -> Path:
    """A tar of ``members``, with ``raw`` (already tar-formatted entries) first."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw + buf.getvalue())
    return path


def _samples(pattern: str, classes: list[str] | None = None) -> list[object]:
    ds = streams.WebDatasetShards(
        pattern, 1, labels=classes or FASHION_MNIST_CLASSES, train=False, shuffle_buffer=0
    )
    return list(ds.samples())


def test_a_sparse_member_is_refused_unread_and_the_shard_goes_on(tmp_path: Path) -> None:
    declared = 3 * 2**30  # 3 GB of holes in a 2.5 KB shard
    shard = _shard(
        tmp_path / "s-000000.tar",
        [("000000.cls", b"1"), ("000001.png", _png()), ("000001.cls", b"2")],
        raw=_sparse_member("000000.png", declared),
    )
    assert shard.stat().st_size < 16 * 1024
    tracemalloc.start()
    try:
        got = _samples(str(shard))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    assert isinstance(got[0], BadSample) and "sparse" in got[0].reason
    assert got[0].path == "s-000000.tar:000000"
    assert not isinstance(got[1], BadSample) and got[1][1] == 2  # type: ignore[index]


def test_a_member_over_the_cap_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 2**20)
    zeros = tmp_path / "z-000000.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _add(tar, "000000.png", _png())
        _add(tar, "000000.cls", b"0")
        _add(tar, "000001.png", bytes(4 * 2**20))  # 4 MiB of zeros: 4 KB compressed
        _add(tar, "000001.cls", b"0")
        _add(tar, "000002.png", _png())
    zeros.write_bytes(buf.getvalue())
    got = _samples(str(zeros))
    assert len(got) == 2 and not isinstance(got[0], BadSample)
    assert isinstance(got[1], BadSample) and "declares 4194304 bytes" in got[1].reason
    assert "rest of the shard skipped" in got[1].reason


def test_decompression_is_bounded_by_the_shard_size(tmp_path: Path) -> None:
    zeros = tmp_path / "z.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(64):  # 64 x 256 KiB of zeros, each under the member cap
            _add(tar, f"{i:06d}.png", bytes(256 * 1024))
    zeros.write_bytes(buf.getvalue())
    got = list(shards.iter_shard(str(zeros), {"png"}, max_ratio=100, ratio_grace_bytes=2**20))
    assert isinstance(got[-1], BadSample) and "inflates" in got[-1].reason
    assert len(got) < 10  # stopped after about 1 MiB, not 16 MiB


def test_a_shard_that_is_no_tar_is_one_bad_sample(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"\x1f\x8b" + bytes(600))
    (got,) = list(shards.iter_shard(str(tmp_path / "x.tar"), {"png"}))
    assert isinstance(got, BadSample) and "unreadable shard" in got.reason


def test_labels_out_of_range_or_not_integers_are_bad_samples(tmp_path: Path) -> None:
    members = []
    labels = {"a": b"3", "b": b"99", "c": b"-1", "d": b"3.9", "e": b"true", "f": b" 7\n"}
    for key, cls in labels.items():
        members += [(f"{key}.png", _png()), (f"{key}.cls", cls)]
    for key, label in {"g": 3.9, "h": True, "i": 5, "j": "4"}.items():
        members += [(f"{key}.png", _png()), (f"{key}.json", json.dumps({"label": label}).encode())]
    _shard(tmp_path / "l-000000.tar", members)
    got = {
        (s.path.split(":")[1] if isinstance(s, BadSample) else None): s
        for s in _samples(str(tmp_path / "l-000000.tar"))
    }
    assert set(got) >= {"b", "c", "d", "e", "g", "h"}
    assert "out of range" in got["b"].reason and "out of range" in got["c"].reason  # type: ignore[union-attr]
    assert "not an integer" in got["g"].reason and "not an integer" in got["h"].reason  # type: ignore[union-attr]
    good = [s[1] for s in _samples(str(tmp_path / "l-000000.tar")) if not isinstance(s, BadSample)]
    assert good == [3, 7, 5, 4]


def _fm_folder(root: Path, names: dict[str, int], per_class: int = 4) -> Path:
    from deit.train.fashion_mnist import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    for folder, label in names.items():
        (root / folder).mkdir(parents=True)
        for n, i in enumerate((y == label).nonzero().flatten()[:per_class].tolist()):
            Image.fromarray(x[i, 0].numpy(), mode="L").save(root / folder / f"{n}.png")
    return root


def test_eval_relabels_shards_whose_class_names_differ_from_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Folder names spelled differently from the model's labels and in another order.
    folder = _fm_folder(tmp_path / "folder", {"trouser": 1, "T-shirt_top": 0, "bag": 8})
    packing.pack(str(folder), tmp_path / "shards", shard_size=5, split="test")
    args = ["eval", "--model", "fashion-mnist", "--device", "cpu", "--json"]
    assert main([*args, "--data", str(folder)]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main([*args, "--data", f"webdataset:{tmp_path / 'shards'}/test-*.tar"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["num_samples"] == want["num_samples"] == 12
    assert got["top1"] == want["top1"] and got["confusion"] == want["confusion"]


def test_eval_counts_out_of_range_labels_as_bad_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members = [("0.png", _png()), ("0.cls", b"99"), ("1.png", _png()), ("1.cls", b"-1")]
    members += [("2.png", _png()), ("2.cls", b"1")]
    _shard(tmp_path / "e-000000.tar", members)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": FASHION_MNIST_CLASSES}))
    data = f"webdataset:{tmp_path / 'e-000000.tar'}"
    code = main(["eval", "--model", "fashion-mnist", "--device", "cpu", "--json", "--data", data])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["num_samples"] == 1 and len(report["bad_samples"]) == 2
    assert "Traceback" not in err and code in (0, 1)


# --------------------------------------------------------------------------- item 8


def test_packing_again_replaces_the_split_and_keeps_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _fm_folder(tmp_path / "folder", {"Trouser": 1, "Bag": 8}, per_class=5)
    out = tmp_path / "out"
    args = ["data", "pack", str(folder), str(out), "--shard-size", "3"]
    assert main([*args, "--split", "test"]) == 0
    assert main(args) == 0
    assert "10 samples, 2 classes in 4 shards" in capsys.readouterr().out
    assert main([*args[:-1], "5"]) == 0  # again, in larger shards
    assert "10 samples, 2 classes in 2 shards" in capsys.readouterr().out
    meta = json.loads((out / "classes.json").read_text())
    on_disk = sorted(p.name for p in out.iterdir() if p.suffix == ".tar")
    assert sorted(meta["shards"]) == on_disk  # the old train-000002/3 are gone
    assert on_disk == [f"test-00000{i}.tar" for i in range(4)] + [
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert meta["samples"] == 20 and meta["splits"]["train"]["samples"] == 10
    assert len(_samples(str(out / "train-*.tar"), ["Bag", "Trouser"])) == 10  # not read twice
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_failed_pack_leaves_the_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _fm_folder(tmp_path / "folder", {"Trouser": 1, "Bag": 8}, per_class=5)
    packing.pack(str(folder), tmp_path / "out", shard_size=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    written = []

    def killed(items: object, tmp: Path, split: str, shard_size: int) -> None:
        (tmp / f"{split}-000000.tar").write_bytes(b"half a shard")
        written.append(tmp)
        raise KeyboardInterrupt  # what a kill leaves, short of the process dying

    monkeypatch.setattr(packing, "_write_shards", killed)
    with pytest.raises(KeyboardInterrupt):
        packing.pack(str(folder), tmp_path / "out", shard_size=2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert written and not written[0].exists()
    with pytest.raises(KeyboardInterrupt):  # a first pack that fails leaves no folder at all
        packing.pack(str(folder), tmp_path / "new", shard_size=2)
    assert not (tmp_path / "new").exists()


def test_percent_signs_and_odd_split_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _fm_folder(tmp_path / "folder", {"Trouser": 1}, per_class=2)
    out = tmp_path / "100% %d %s"
    assert main(["data", "pack", str(folder), str(out), "--split", "a%d%%"]) == 0
    assert (out / "a%d%%-000000.tar").is_file() and (out / "classes.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["100% %d %s", "folder"]  # nothing stray
    for split in ("../x", ".hidden", ""):
        assert main(["data", "pack", str(folder), str(out), "--split", split]) == 2
        err = capsys.readouterr().err
        assert "split name" in err and "Traceback" not in err
    assert not (tmp_path / "x-000000.tar").exists()


def test_other_splits_with_other_classes_are_not_mixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _fm_folder(tmp_path / "a", {"Trouser": 1, "Bag": 8}, per_class=2)
    b = _fm_folder(tmp_path / "b", {"Coat": 4}, per_class=2)
    assert main(["data", "pack", str(a), str(tmp_path / "out"), "--split", "test"]) == 0
    assert main(["data", "pack", str(b), str(tmp_path / "out")]) == 2
    assert "other classes" in capsys.readouterr().err
    (tmp_path / "out" / "notes").mkdir()
    assert main(["data", "pack", str(a), str(tmp_path / "out")]) == 2
    assert "pack into a new or empty folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- item 10: Ray output


def test_resume_drops_lines_that_are_no_record_and_counts_them(tmp_path: Path) -> None:
    from deit.deploy.batch import _Writer, done_paths, read_jsonl

    out = tmp_path / "out.jsonl"
    good = [json.dumps({"path": f"p{i}", "predictions": [], "error": None}) for i in range(3)]
    torn = json.dumps({"path": "p3 é", "predictions": []}, ensure_ascii=False).encode()
    torn = torn[: torn.index("é".encode()) + 1]  # ends inside the two bytes of "é"
    out.write_bytes(
        b"\n".join([good[0].encode(), b"12", b'"p9"', b"[1, 2]", b'{"path": 5}', good[1].encode()])
        + b"\n\n"
        + good[2].encode()
        + b"\n"
        + torn
    )
    assert done_paths(out) == {"p0", "p1", "p2"}
    assert read_jsonl(out)[1] == 5
    writer = _Writer(out, resume=True)
    assert writer.dropped == 5
    writer.write([{"path": "p3", "predictions": [], "error": None}])
    writer.close()
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [
        "p0",
        "p1",
        "p2",
        "p3",
    ]


def test_parquet_output_after_a_killed_writer(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from deit.deploy.batch import _Writer, done_paths
    from deit.errors import UsageError

    out = tmp_path / "out.parquet"
    rows = [{"path": f"p{i}", "predictions": [], "error": None} for i in range(6)]
    writer = _Writer(out, resume=False)
    writer.write(rows[:2])
    writer.write(rows[2:4])
    (out / ".part-00002.parquet.1a2b3c4d.tmp").write_bytes(b"PAR1 half")  # killed mid-write
    (out / "part-00000.parquet").unlink()  # and a part removed by hand: numbering has a gap
    writer = _Writer(out, resume=True)
    assert not list(out.glob(".*.tmp"))
    writer.write(rows[4:])
    assert sorted(p.name for p in out.iterdir()) == ["part-00001.parquet", "part-00002.parquet"]
    assert done_paths(out) == {"p2", "p3", "p4", "p5"}  # nothing overwritten
    (out / "part-00003.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UsageError, match=r"part-00003\.parquet: unreadable Parquet part"):
        done_paths(out)


# --------------------------------------------------------------------------- item 10: config

BAD_VALUES = {
    "run.time_limit=nan": "run.time_limit must be finite",
    "schedule.warmup_epochs=nan": "schedule.warmup_epochs must be finite",
    "optim.weight_decay=nan": "optim.weight_decay must be finite",
    "optim.weight_decay=inf": "optim.weight_decay must be finite",
    "augment.label_smoothing=2": "augment.label_smoothing 2.0 is not in [0, 1)",
    "augment.hflip=1.5": "augment.hflip 1.5 is not in [0, 1]",
    "augment.random_erasing=-0.1": "augment.random_erasing -0.1 is not in [0, 1]",
    "augment.mixup_prob=3": "augment.mixup_prob 3.0 is not in [0, 1]",
    "augment.mixup=-1": "augment.mixup -1.0 is not in [0, inf)",
    "augment.scale=[2,1]": "augment.scale must be [min, max]",
    "augment.scale=[0.5]": "augment.scale must be [min, max]",
    "optim.betas=[0.9,1.5]": "optim.betas must be two values",
    "distill.tau=0": "distill.tau 0.0 is not in (0, inf)",
    "run.ema_decay=nan": "run.ema_decay must be finite",
    "data.mean=[]": "data.mean has 0 values for 1 channels",
    "data.mean=[nan]": "data.mean must be finite",
    "data.std=[0.5,0]": "data.std has 2 values for 1 channels",
    "data.std=[0]": "data.std values must be > 0",
    "data.in_chans=0": "data.in_chans 0 is not in [1, 4096]",
}


@pytest.mark.parametrize("override", sorted(BAD_VALUES))
def test_config_values_must_be_finite_and_in_range(override: str) -> None:
    from deit.errors import ConfigError
    from deit.train.runconfig import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert BAD_VALUES[override] in str(e.value) and "\n" not in str(e.value)


def test_config_lengths_follow_the_channels() -> None:
    from deit.errors import ConfigError
    from deit.train.runconfig import load_config

    ok = ["data.dataset=imagefolder", "data.path=x", "data.mean=[0.5,0.5,0.5]", "data.std=[0.2]"]
    load_config(None, ok)
    with pytest.raises(ConfigError, match=r"data\.mean has 2 values for 3 channels"):
        load_config(None, [*ok[:2], "data.mean=[0.5,0.5]"])
    load_config(None, ["data.in_chans=3", "data.mean=[0.1,0.2,0.3]"])  # Fashion-MNIST as RGB


def test_a_given_std_is_the_one_the_model_gets(tmp_path: Path) -> None:
    from deit.train.data import build_data
    from deit.train.fashion_mnist import FASHION_MNIST_DIR
    from deit.train.runconfig import load_config

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist not installed")
    cfg = load_config(None, ["data.std=[0.25]", "data.train_subset=64", "data.val_subset=64"])
    data = build_data(cfg, torch.device("cpu"))
    assert data.spec.std == (0.25,)
    assert data.spec.mean[0] == pytest.approx(0.286, abs=0.01)  # the data's own mean
    rgb = load_config(None, ["data.in_chans=3", "data.mean=[0.5]", "data.std=[0.25]"])
    spec = build_data(rgb, torch.device("cpu")).spec
    assert spec.mean == (0.5,) * 3 and spec.std == (0.25,) * 3


# --------------------------------------------------------------------------- Hugging Face files


@pytest.fixture
def disk_dataset(tmp_path: Path) -> Path:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    images = [Image.new("L", (8, 8), 40 * i) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "good"))
    return tmp_path / "good"


def _lying(good: Path, name: str, file: str, change: object) -> Path:
    import shutil

    out = good.parent / name
    shutil.copytree(good, out)
    meta = json.loads((out / file).read_text())
    change(meta)  # type: ignore[operator]
    (out / file).write_text(json.dumps(meta))
    return out


def test_save_to_disk_folders_that_lie_are_one_line_errors(disk_dataset: Path) -> None:
    from deit.errors import ConfigError

    outside = disk_dataset.parent / "outside.arrow"
    outside.write_bytes((disk_dataset / "data-00000-of-00001.arrow").read_bytes())
    cases = {
        "absolute": ("state.json", lambda m: m.update(_data_files=[{"filename": str(outside)}])),
        "dotdot": (
            "state.json",
            lambda m: m.update(_data_files=[{"filename": "../outside.arrow"}]),
        ),
        "none": ("state.json", lambda m: m.update(_data_files=[])),
        "custom": ("state.json", lambda m: m.update(_format_type="custom")),
        "features": (
            "dataset_info.json",
            lambda m: m["features"].update(label={"_type": "Value", "dtype": "string"}),
        ),
        "numclasses": (
            "dataset_info.json",
            lambda m: m["features"].update(label={"_type": "ClassLabel", "num_classes": 10**9}),
        ),
    }
    for name, (file, change) in cases.items():
        folder = _lying(disk_dataset, name, file, change)
        with pytest.raises(ConfigError) as e:
            hf_data.open_hf(str(folder))
        assert str(folder) in str(e.value) and "\n" not in str(e.value), name
    (disk_dataset.parent / "link").mkdir()
    for f in disk_dataset.iterdir():
        (disk_dataset.parent / "link" / f.name).write_bytes(f.read_bytes())
    (disk_dataset.parent / "link" / "data-00000-of-00001.arrow").unlink()
    (disk_dataset.parent / "link" / "data-00000-of-00001.arrow").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"is not an \.arrow file"):
        hf_data.open_hf(str(disk_dataset.parent / "link"))
    tr, _, _ = hf_data.open_hf(str(disk_dataset))  # the honest folder still loads
    assert len(tr) == 4


def test_an_arrow_extension_type_never_unpickles(disk_dataset: Path, tmp_path: Path) -> None:
    import pickle

    import pyarrow as pa

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    table = pa.ipc.open_stream(pa.memory_map(str(disk_dataset / "data-00000-of-00001.arrow")))
    table = table.read_all()
    label = table.schema.field("label").with_metadata(
        {
            b"ARROW:extension:name": b"arrow.py_extension_type",
            b"ARROW:extension:metadata": pickle.dumps(Payload()),
        }
    )
    table = table.cast(table.schema.set(table.schema.get_field_index("label"), label))
    with pa.ipc.new_stream(str(disk_dataset / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    try:
        tr, _, _ = hf_data.open_hf(str(disk_dataset))
        [hf_data.HFImages(tr)[i] for i in range(len(tr))]
    except Exception as e:  # refusing is fine too, in one line
        assert "\n" not in str(e)
    assert not marker.exists()


def test_a_parquet_that_inflates_is_refused_before_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deit.errors import ConfigError

    monkeypatch.setattr(shards, "MAX_CHUNK_BYTES", 4 * 2**20)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = 200  # one 1 MiB value repeated by dictionary encoding: 200 MiB from a 1 KB file
    table = pa.table(
        {
            "image": pa.array([{"bytes": bytes(2**20), "path": None}] * rows, struct),
            "label": pa.array([0] * rows, pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "bomb.parquet", compression="zstd", row_group_size=rows)
    del table
    assert (tmp_path / "bomb.parquet").stat().st_size < 4096
    with pytest.raises(ConfigError, match="decodes to more than"):
        hf_data.open_hf(str(tmp_path / "bomb.parquet"))
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "bomb.parquet").read_bytes()[:-20])
    with pytest.raises(ConfigError, match="unreadable Parquet"):
        hf_data.open_hf(str(tmp_path / "cut.parquet"))
