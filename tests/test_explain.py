"""Attention rollout: the algorithm, the maps of both tokens, the overlay and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deit.checkpoints import load_model
from deit.cli import main
from deit.explain import (
    attention_rollout,
    colormap,
    explain,
    model_view,
    render_overlay,
    rollout_maps,
)

from .deploy_helpers import save_tiny_model


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("rgb"))


def _random_attention(b: int, heads: int, t: int) -> torch.Tensor:
    return torch.randn(b, heads, t, t).softmax(dim=-1)


def test_rollout_rows_sum_to_one_and_match_a_hand_computation() -> None:
    layers = [_random_attention(2, 3, 6) for _ in range(3)]
    rollout = attention_rollout(layers)
    assert rollout.shape == (2, 6, 6)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 6))
    expected = np.stack([np.eye(6)] * 2)
    for weights in layers:  # A = (mean over heads + I) / 2 per row, R = A_L ... A_1
        a = weights.double().numpy().mean(axis=1) + np.eye(6)
        a /= a.sum(-1, keepdims=True)
        expected = a @ expected
    np.testing.assert_allclose(rollout.numpy(), expected, atol=1e-6)


def test_rollout_of_identity_attention_is_identity() -> None:
    eye = torch.eye(5).expand(1, 2, 5, 5)
    torch.testing.assert_close(attention_rollout([eye, eye]), torch.eye(5)[None])


def test_cls_and_dist_maps(rgb_dir: Path, sample_images: list[Path]) -> None:
    loaded = load_model(rgb_dir)
    maps = explain(loaded, sample_images[0], token="both")
    assert set(maps) == {"cls", "dist"}
    for m in maps.values():
        assert m.shape == (4, 4) and (m > 0).all() and m.sum() < 1.0  # prefix tokens keep a share
    assert not np.allclose(maps["cls"], maps["dist"])
    np.testing.assert_allclose(
        explain(loaded, sample_images[0], token="dist")["dist"], maps["dist"]
    )


def test_rollout_maps_match_rows_of_the_full_rollout(rgb_dir: Path) -> None:
    loaded = load_model(rgb_dir)
    x = torch.randn(2, 3, 32, 32)
    maps = rollout_maps(loaded.model, x, "both")
    attentions = loaded.model(x, output_attentions=True).attentions
    full = attention_rollout(attentions)
    torch.testing.assert_close(maps["cls"], full[:, 0, 2:].reshape(2, 4, 4))
    torch.testing.assert_close(maps["dist"], full[:, 1, 2:].reshape(2, 4, 4))


def test_grayscale_and_plain_models(tmp_path: Path, sample_images: list[Path]) -> None:
    gray = load_model(save_tiny_model(tmp_path / "gray", channels=1))
    assert explain(gray, sample_images[0])["cls"].shape == (4, 4)
    assert model_view(sample_images[0], gray.preprocess).size == (32, 32)
    plain = load_model(save_tiny_model(tmp_path / "plain", distilled=False))
    assert set(explain(plain, sample_images[0], token="both")) == {"cls"}
    with pytest.raises(ValueError, match="no distillation token"):
        explain(plain, sample_images[0], token="dist")


def test_overlay_and_colormap(rgb_dir: Path, sample_images: list[Path]) -> None:
    loaded = load_model(rgb_dir)
    attn = explain(loaded, sample_images[0], token="cls")["cls"]
    overlay = render_overlay(sample_images[0], attn, preprocess=loaded.preprocess)
    assert overlay.mode == "RGB" and overlay.size == (224, 224)  # 32 px view enlarged 7x
    assert colormap(np.array([0.0, 1.0])).tolist() == [[0, 0, 4], [252, 255, 164]]
    flat = render_overlay(Image.new("RGB", (64, 64), "gray"), np.ones((4, 4)), min_size=0)
    assert flat.size == (64, 64)  # a flat map is fine (no division by zero)


def test_explain_cli_writes_png(rgb_dir: Path, tmp_path: Path, sample_images: list[Path]) -> None:
    out = tmp_path / "map.png"
    argv = ["explain", str(sample_images[0]), "--model", str(rgb_dir), "--out", str(out)]
    assert main(argv) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height  # cls and dist side by side
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    argv = ["explain", str(bad), "--model", str(rgb_dir), "--out", str(tmp_path / "x.png")]
    assert main(argv) == 1
