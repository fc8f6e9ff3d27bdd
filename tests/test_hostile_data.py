"""Hostile inputs on the data side (issue 24): elongated images, tar bombs in WebDataset
shards, lying labels, ``deit data pack`` output, Ray ``--resume`` files, training config
values, and hostile Hugging Face ``save_to_disk`` folders and Parquet files.

Each test here failed on the code before its fix; docs/security.md says what each bounds.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deit.checkpoints import save_model
from deit.cli import main
from deit.config import DeiTConfig
from deit.errors import ImageTooLargeError
from deit.model import DeiT
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
