"""The embedded `fashion-mnist` model: accuracy on the real test split, the bundled samples,
and the README's offline main job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deit.checkpoints import load_model
from deit.inference import Classifier

from .conftest import REPO

SAMPLES = REPO / "samples" / "fashion-mnist"
# The bar the embedded model must clear (issue 6). It measures 92.12% on this split
# (docs/results/fashion-mnist.md); the accuracy is computed here, from the shipped fp16 weights.
MIN_TEST_TOP1 = 0.92


def _label_of(path: Path) -> str:
    """`test00019_t-shirt-top.png` → `t-shirt-top`."""
    return path.stem.split("_", 1)[1]


def _slug(label: str) -> str:
    return label.lower().replace("/", "-").replace(" ", "-")


def test_embedded_model_is_a_distilled_deit() -> None:
    loaded = load_model("fashion-mnist")
    assert loaded.format == "deit" and loaded.config.distilled and loaded.config.in_chans == 1
    assert [_slug(x) for x in loaded.labels][:3] == ["t-shirt-top", "trouser", "pullover"]
    assert loaded.preprocess.invert_light_background


def test_accuracy_on_the_real_test_split() -> None:
    """Computed here on all 10,000 test images; nothing about the result is stored."""
    fmnist = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    if not fmnist.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from deit.train.evaluate import evaluate

    report = evaluate("fashion-mnist", "fashion-mnist:test", data_root=str(fmnist), batch_size=500)
    assert report.num_samples == 10_000
    assert report.top1 >= MIN_TEST_TOP1, report.top1


def test_bundled_samples_match_their_labels() -> None:
    paths = sorted(SAMPLES.glob("*.png"))
    assert len(paths) == 10
    clf = Classifier.from_pretrained("fashion-mnist", device="cpu")
    predicted = [_slug(p[0].label) for p in clf.predict([str(p) for p in paths], top_k=1)]
    assert predicted == [_label_of(p) for p in paths]


def test_eval_of_a_folder_named_like_the_samples(tmp_path: Path) -> None:
    """Folders named `ankle-boot`, `t-shirt-top`, ... are the labels `Ankle boot`, ...: the
    scores of `deit eval` on a class folder agree with `deit predict` on the same files."""
    from deit.train.evaluate import evaluate

    for path in SAMPLES.glob("*.png"):
        folder = tmp_path / _label_of(path)
        folder.mkdir(exist_ok=True)
        (folder / path.name).write_bytes(path.read_bytes())
    report = evaluate("fashion-mnist", str(tmp_path))
    assert report.num_samples == 10 and report.top1 == 1.0


def test_readme_main_job_runs_offline() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "deit", "predict", "--model", "fashion-mnist", str(SAMPLES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("%") == 5 * 10  # top-5 for each of the ten samples


def test_ships_out_of_distribution_statistics(sample_images: list[Path]) -> None:
    """Issue 26: the statistics load with the model; on the test images its threshold was not
    set on (rows 5000-9999) about 5% are flagged, and every sample photo is (the issue's cat,
    cup, astronaut, rocket and cameraman among them)."""
    fmnist = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    if not fmnist.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from deit.ood import MAHALANOBIS
    from deit.train.fashion_mnist import load_fashion_mnist

    clf = Classifier.from_pretrained("fashion-mnist", device="cpu")
    assert clf.calibration.method == MAHALANOBIS and clf.ood_stats is not None
    x, _ = load_fashion_mnist("test", fmnist)
    images = [a[0].numpy() for a in x[5000:]]
    flagged = sum(r.ood.unusual for r in clf.predict(images, top_k=1, batch_size=500))
    assert 0.03 <= flagged / len(images) <= 0.08, flagged
    photos = clf.predict([str(p) for p in sample_images], top_k=1)
    scores = {p.name: r.ood.score for p, r in zip(sample_images, photos, strict=True)}
    assert all(r.ood.unusual for r in photos), (scores, clf.calibration.threshold)
