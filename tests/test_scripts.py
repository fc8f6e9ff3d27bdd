"""scripts/seed_table.py (the seed summary of the results page, on made-up `deit eval`
files), scripts/paired_svm.py (a model against the pixel SVM, image by image) and the
whole-image sets of scripts/ood_eval.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deit.train.fashion_mnist import FASHION_MNIST_DIR, write_fashion_mnist_folder

HAVE_FMNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "seed_table.py"


def _eval_json(path: Path, top1: float) -> str:
    path.write_text(
        json.dumps({"top1": top1, "cls_top1": top1, "dist_top1": top1 - 0.01, "agreement": 0.9})
    )
    return str(path)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def test_mean_std_and_paired_differences(tmp_path: Path) -> None:
    none = [_eval_json(tmp_path / f"n{i}.json", v) for i, v in enumerate((0.80, 0.82, 0.84))]
    hard = [_eval_json(tmp_path / f"h{i}.json", v) for i, v in enumerate((0.81, 0.81, 0.86))]
    result = _run("none=" + ",".join(none), "hard=" + ",".join(hard))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2] == "| none | 3 | 82.00 ± 2.00 | 82.00 ± 2.00 | 81.00 ± 2.00 | 90.00 ± 0.00 |"
    assert lines[3].startswith("| hard | 3 | 82.67 ± 2.89 |")
    assert lines[-1] == (
        "- hard − none (avg of heads, per seed): +1.00, -1.00, +2.00; "
        "mean +0.67 (95% CI -3.13 to +4.46), ahead in 2 of 3"
    )


def test_bad_input_is_one_readable_line(tmp_path: Path) -> None:
    one = _eval_json(tmp_path / "a.json", 0.5)
    result = _run("none=" + one, "hard=" + one + "," + one)
    assert result.returncode == 1
    assert "hard has 2 seeds, none 1" in result.stderr
    result = _run("none=" + str(tmp_path / "missing.json"))
    assert result.returncode == 1 and "not a readable `deit eval --json` file" in result.stderr
    assert "expected LABEL=FILE" in _run("none").stderr


PAIRED = SCRIPT.with_name("paired_svm.py")


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")
def test_paired_svm_counts_every_test_image_once(tmp_path: Path) -> None:
    classes = ["Trouser", "Bag", "Sneaker"]
    for split, per_class, source in (
        ("train", 30, "train"),
        ("val", 5, "train"),
        ("test", 12, "test"),
    ):
        write_fashion_mnist_folder(tmp_path / split, classes, per_class, split=source)
    result = subprocess.run(
        [sys.executable, str(PAIRED), f"fashion-mnist={tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.splitlines()[1].rsplit(": ", 1)[1])
    assert sum(counts) == 36  # both right, only the model, only the SVM, neither
    assert counts[0] + counts[1] >= 30  # the embedded model knows these three classes well
    assert "McNemar z = " in result.stdout.splitlines()[-1]
    bad = subprocess.run(
        [sys.executable, str(PAIRED), "fashion-mnist"], capture_output=True, text=True, check=False
    )
    assert bad.returncode != 0 and "expected MODEL=SCENARIO" in bad.stderr


def _ood_eval() -> Any:
    spec = importlib.util.spec_from_file_location("ood_eval", SCRIPT.with_name("ood_eval.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ood_eval_whole_images_keep_the_decision_photos_out_of_the_held_out_set() -> None:
    """The held-out whole images are the packages' bundled images less the sample photos
    the score was chosen on (and the motorcycle's other stereo view); each set is every
    image whole, then crops of 60-100% of each side."""
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    from PIL import Image

    ood_eval = _ood_eval()
    held_out = ood_eval.package_images()
    samples = {p.name for p in ood_eval.PHOTOS.iterdir()}
    names = {p.name for p in held_out}
    assert len(held_out) >= 15 and not names & samples
    assert "motorcycle_right.png" not in names and "page.png" in names
    assert not any(n.startswith("chessboard") for n in names)
    paths = sorted(ood_eval.PHOTOS.glob("*.png"))[:3]
    images = ood_eval.whole_and_large_crops(ood_eval.rgb(paths), 12, seed=0)
    sizes = [Image.open(p).size for p in paths]
    assert len(images) == 15 and [im.size for im in images[:3]] == sizes
    for i, im in enumerate(images[3:]):
        w, h = sizes[i % 3]
        assert 0.6 * w - 1 <= im.width <= w and 0.6 * h - 1 <= im.height <= h
