"""Batch inference on Ray Data: the map_batches callables, the output files and resume, and a
real local cluster against `deit predict --json` on 1,000 real images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deit.cli import main
from deit.deploy.batch import Predict, Preprocess, _Writer, done_paths, predict_to_file, records
from deit.inference import Classifier
from deit.train.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist

from .deploy_helpers import save_tiny_model

ray = pytest.importorskip("ray")
HAVE_FMNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="module")
def gray_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("gray"), channels=1)


def _bad_files(folder: Path) -> None:
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    good = (folder / "0000.png").read_bytes() if (folder / "0000.png").exists() else b""
    (folder / "truncated.png").write_bytes(good[: len(good) // 2] or b"\x89PNG\r\n")


def test_the_callables_map_a_batch_with_errors_as_rows(gray_dir: Path, tmp_path: Path) -> None:
    Image.fromarray(np.full((40, 30), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")
    batch = {"path": np.array([str(tmp_path / "a.png"), str(tmp_path / "b.png")])}
    pre = Preprocess(str(gray_dir))(batch)
    assert pre["pixels"].shape == (2, 1, 32, 32) and list(pre["error"]) == ["", "empty file"]
    rows = list(records(Predict(str(gray_dir), top_k=3, device="cpu")(pre)))
    want = Classifier.from_pretrained(str(gray_dir), device="cpu").predict(
        [str(tmp_path / "a.png")], top_k=3
    )[0]
    assert [p["index"] for p in rows[0]["predictions"]] == [p.index for p in want]
    assert rows[0]["ood"]["method"] == want.ood.method
    assert rows[0]["ood"]["score"] == pytest.approx(want.ood.score, rel=1e-5, abs=1e-6)
    assert rows[0]["error"] is None and rows[1] == {
        "path": str(tmp_path / "b.png"),
        "predictions": [],
        "ood": None,
        "error": "empty file",
    }


def test_outputs_resume_without_loss_or_duplicates(tmp_path: Path) -> None:
    rows = [{"path": f"p{i}", "predictions": [], "error": None} for i in range(5)]
    jsonl = tmp_path / "out.jsonl"
    writer = _Writer(jsonl, resume=False)
    writer.write(rows[:3])
    writer.close()
    with jsonl.open("a") as f:
        f.write('{"path": "p3", "predic')  # the torn line of a killed run
    assert done_paths(jsonl) == {"p0", "p1", "p2"}
    writer = _Writer(jsonl, resume=True)
    writer.write(rows[3:])
    writer.close()
    assert [json.loads(line)["path"] for line in jsonl.read_text().splitlines()] == [
        f"p{i}" for i in range(5)
    ]
    parquet = tmp_path / "out.parquet"
    for part in (rows[:2], rows[2:]):
        writer = _Writer(parquet, resume=True)
        writer.write(part)
        writer.close()
    assert done_paths(parquet) == {f"p{i}" for i in range(5)}
    assert len(list(parquet.glob("part-*.parquet"))) == 2


def test_usage_errors(gray_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"\.jsonl or \.parquet"):
        predict_to_file(str(gray_dir), [str(tmp_path)], tmp_path / "out.csv")
    assert main(["predict", "-m", str(gray_dir), "--engine", "ray", str(tmp_path)]) == 2
    assert "give --out" in capsys.readouterr().err
    assert main(["predict", "-m", str(gray_dir), "--resume", str(tmp_path)]) == 2
    assert "go with --engine ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fmnist_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_FMNIST:
        pytest.skip("dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
    folder = tmp_path_factory.mktemp("fmnist-png")
    images, _ = load_fashion_mnist("test")
    for i, im in enumerate(images[:1000]):
        Image.fromarray(im[0].numpy(), "L").save(folder / f"{i:04d}.png")
    _bad_files(folder)
    return folder


def _reference(model: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    assert main(["predict", "-m", str(model), "--device", "cpu", "--json", str(folder)]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {r["path"]: r for r in rows}


def _same(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys()
    for path, row in want.items():
        assert got[path]["error"] == row["error"], path
        g, w = got[path]["predictions"], row["predictions"]
        assert [p["index"] for p in g] == [p["index"] for p in w], path
        assert np.allclose([p["score"] for p in g], [p["score"] for p in w], atol=1e-5), path
        if row["ood"] is None:
            assert got[path]["ood"] is None, path
        else:
            assert got[path]["ood"]["unusual"] == row["ood"]["unusual"], path
            assert np.isclose(got[path]["ood"]["score"], row["ood"]["score"], atol=1e-4), path


@pytest.mark.slow
def test_a_local_cluster_matches_deit_predict_json(
    gray_dir: Path, fmnist_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    want = _reference(gray_dir, fmnist_images, capsys)
    assert len(want) == 1003 and sum(r["error"] is not None for r in want.values()) == 3
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
    try:
        out = tmp_path / "out.parquet"
        counts = predict_to_file(str(gray_dir), [str(fmnist_images)], out, batch_size=128)
    finally:
        ray.shutdown()
    assert counts == {"inputs": 1003, "skipped": 0, "written": 1003, "errors": 3, "dropped": 0}
    import pyarrow.parquet as pq

    got = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    _same(got, want)


@pytest.mark.slow
def test_resume_after_a_kill_loses_nothing_and_duplicates_nothing(
    gray_dir: Path, fmnist_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    want = _reference(gray_dir, fmnist_images, capsys)
    out = tmp_path / "out.jsonl"
    argv = ["predict", "-m", str(gray_dir), "--engine", "ray", "--out", str(out), "-b", "32"]
    env = {**os.environ, "RAY_num_cpus": "2"}
    job = subprocess.Popen(
        [sys.executable, "-m", "deit", *argv, str(fmnist_images)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the job and the Ray processes it starts, killed together
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job.poll() is None:
            if out.is_file() and len(out.read_text().splitlines()) >= 64:
                break
            time.sleep(0.2)
        assert job.poll() is None, "the job finished before it could be killed"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    first = len(done_paths(out))
    assert 0 < first < 1003
    assert main([*argv, "--resume", str(fmnist_images)]) == 1  # the 3 bad files
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len({r["path"] for r in lines}) == 1003  # nothing twice, nothing lost
    _same({r["path"]: r for r in lines}, want)
