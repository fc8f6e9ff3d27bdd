"""Logit parity with transformers and timm for all eight published shapes.

The checkpoints are random-initialised models that transformers and timm build and write
themselves (real weights can't be downloaded here). fp32, CPU, tolerance 1e-5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from deit.checkpoints import load_model
from deit.config import VARIANTS, DeiTConfig
from deit.saving import save_model

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

ATOL = 1e-5


def hf_config(cfg: DeiTConfig, **overrides: object):
    kwargs = dict(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_hidden_dim,
        image_size=cfg.image_hw[0],
        patch_size=cfg.patch_size,
        num_labels=cfg.num_classes,
        **overrides,
    )
    if cfg.distilled:
        return transformers.DeiTConfig(**kwargs)
    return transformers.ViTConfig(**kwargs)


def hf_model(cfg: DeiTConfig, **overrides: object) -> torch.nn.Module:
    config = hf_config(cfg, **overrides)
    if not cfg.distilled:
        return transformers.ViTForImageClassification(config).eval()
    if cfg.distill_head:
        return transformers.DeiTForImageClassificationWithTeacher(config).eval()
    return transformers.DeiTForImageClassification(config).eval()


def images(cfg: DeiTConfig, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, *cfg.image_hw, generator=torch.Generator().manual_seed(0))


def _randomise_norms(model: torch.nn.Module) -> None:
    """transformers initialises LayerNorms to 1/0; random values make the comparison sharper."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_transformers_both_directions(name: str, tmp_path: Path) -> None:
    cfg = VARIANTS[name]
    theirs = hf_model(cfg)
    _randomise_norms(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    x = images(cfg)
    with torch.no_grad():
        ref = theirs(pixel_values=x)
    ours = load_model(tmp_path / "hf")
    assert ours.format == "hf" and ours.config.layer_norm_eps == 1e-12
    with torch.no_grad():
        out = ours.model(x)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    if cfg.distilled:
        torch.testing.assert_close(out.cls_logits, ref.cls_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.dist_logits, ref.distillation_logits, atol=ATOL, rtol=0)

    # ... and transformers loads what we write, with the same answer.
    save_model(
        ours.model, tmp_path / "ours", labels=ours.labels, preprocess=ours.preprocess, format="hf"
    )
    auto = transformers.AutoModelForImageClassification
    back = auto.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(theirs)
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x).logits, ref.logits, atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_timm(name: str, tmp_path: Path) -> None:
    cfg = VARIANTS[name]
    theirs = timm.create_model(name, pretrained=False).eval()
    _randomise_norms(theirs)
    path = tmp_path / f"{name}.pth"
    torch.save(theirs.state_dict(), path)
    ours = load_model(path)
    assert ours.format == "timm" and ours.config == cfg
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x).logits, theirs(x), atol=ATOL, rtol=0)


def test_hf_deit_without_teacher_head(tmp_path: Path) -> None:
    """DeiTForImageClassification: a distillation token, but logits from the cls token only."""
    cfg = DeiTConfig(
        img_size=64, embed_dim=128, num_heads=2, depth=3, num_classes=7, distill_head=False
    )
    theirs = hf_model(cfg)
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.distilled and not ours.config.distill_head
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.model(x).logits, theirs(pixel_values=x).logits, atol=ATOL, rtol=0
        )


def test_interpolated_position_embedding_matches_transformers(tmp_path: Path) -> None:
    cfg = DeiTConfig(img_size=64, embed_dim=128, num_heads=2, depth=2, num_classes=5)
    theirs = hf_model(cfg)
    with torch.no_grad():
        theirs.deit.embeddings.position_embeddings.normal_()
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = theirs(pixel_values=x, interpolate_pos_encoding=True).logits
        out = ours.model(x, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_official_pth_layout(tmp_path: Path) -> None:
    """Official files wrap the weights under "model" beside optimizer state and args."""
    theirs = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    path = tmp_path / "deit_tiny_distilled_patch16_224-b40b3cf7.pth"
    args = argparse.Namespace(lr=5e-4, model="deit_tiny_distilled_patch16_224")
    torch.save({"model": theirs.state_dict(), "epoch": 299, "args": args}, path)
    ours = load_model(path)
    assert ours.format == "official"
    assert ours.preprocess.resize_size == 256 and ours.preprocess.crop_size == (224, 224)
    x = images(ours.config)
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x).logits, theirs(x), atol=ATOL, rtol=0)
