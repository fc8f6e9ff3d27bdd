"""The model on tiny configs: shapes, outputs, attention path, stochastic depth, golden values."""

from __future__ import annotations

import pytest
import torch

from deit.config import VARIANTS, DeiTConfig
from deit.model import DeiT, drop_path, resize_pos_embed

from .conftest import FIXTURES

# Parameter counts printed by timm for the eight published variants.
PARAMS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
    "deit_base_patch16_384": 86_859_496,
    "deit_base_distilled_patch16_384": 87_630_032,
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_parameter_counts(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = DeiT(VARIANTS[name])
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_distilled_output_is_mean_of_heads(tiny_config: DeiTConfig) -> None:
    model = DeiT(tiny_config).eval()
    out = model(torch.randn(3, 3, 32, 32))
    assert out.logits.shape == out.cls_logits.shape == out.dist_logits.shape == (3, 10)
    torch.testing.assert_close(out.logits, (out.cls_logits + out.dist_logits) / 2)
    assert out.attentions is None
    # Same type and fields in train mode (no tuple switch).
    train_out = model.train()(torch.randn(3, 3, 32, 32))
    assert type(train_out) is type(out) and train_out.dist_logits is not None


def test_plain_model_has_no_dist_token(tiny_config: DeiTConfig) -> None:
    model = DeiT(tiny_config.replace(distilled=False)).eval()
    assert model.dist_token is None and model.head_dist is None
    assert model.pos_embed.shape == (1, 1 + 16, 32)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.dist_logits is None and torch.equal(out.logits, out.cls_logits)


def test_dist_token_without_head(tiny_config: DeiTConfig) -> None:
    model = DeiT(tiny_config.replace(distill_head=False)).eval()
    assert model.dist_token is not None and model.head_dist is None
    assert model.pos_embed.shape[1] == 2 + 16
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.equal(out.logits, out.cls_logits)


def test_token_order_cls_then_dist(tiny_config: DeiTConfig) -> None:
    """The cls head reads token 0 and the distillation head token 1."""
    model = DeiT(tiny_config).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)[0]
    out = model(x)
    torch.testing.assert_close(out.cls_logits, model.head(tokens[:, 0]))
    torch.testing.assert_close(out.dist_logits, model.head_dist(tokens[:, 1]))


def test_block_outputs_are_the_blocks_tokens(tiny_config: DeiTConfig) -> None:
    """``output_blocks`` returns the asked blocks' tokens in block order, the last through the
    final norm, without changing the logits; bad indices are one clear error."""
    model = DeiT(tiny_config).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
    out = model(x, output_blocks=(tiny_config.depth - 1, 0))
    hook.remove()
    tokens = model.forward_features(x)[0]
    assert out.block_outputs is not None and len(out.block_outputs) == 2
    torch.testing.assert_close(out.block_outputs[0], seen[0])
    torch.testing.assert_close(out.block_outputs[1], tokens)
    torch.testing.assert_close(out.logits, model(x).logits)
    assert model(x).block_outputs is None
    with pytest.raises(ValueError, match="output_blocks"):
        model(x, output_blocks=(tiny_config.depth,))


def test_attention_weights_path_matches_fused(tiny_config: DeiTConfig) -> None:
    model = DeiT(tiny_config).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = model(x)
    explicit = model(x, output_attentions=True)
    torch.testing.assert_close(explicit.logits, fused.logits, atol=1e-5, rtol=1e-5)
    assert len(explicit.attentions) == tiny_config.depth
    weights = explicit.attentions[0]
    assert weights.shape == (2, 2, 18, 18)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 18))


def test_input_size_checked_and_interpolated(tiny_config: DeiTConfig) -> None:
    model = DeiT(tiny_config).eval()
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(torch.randn(1, 3, 48, 40))
    with pytest.raises(ValueError, match="multiple of patch size"):
        model(torch.randn(1, 3, 30, 32))
    out = model(torch.randn(1, 3, 48, 40), interpolate_pos_encoding=True)
    assert out.logits.shape == (1, 10)


def test_resize_pos_embed_keeps_prefix_and_is_identity_on_same_grid() -> None:
    pos = torch.randn(1, 2 + 4 * 4, 8)
    assert resize_pos_embed(pos, 2, (4, 4), (4, 4)) is pos
    big = resize_pos_embed(pos, 2, (4, 4), (6, 8))
    assert big.shape == (1, 2 + 48, 8)
    assert torch.equal(big[:, :2], pos[:, :2])
    # A constant grid stays constant under bicubic resampling.
    flat = torch.cat([pos[:, :2], torch.ones(1, 16, 8)], dim=1)
    torch.testing.assert_close(
        resize_pos_embed(flat, 2, (4, 4), (7, 7))[:, 2:], torch.ones(1, 49, 8)
    )


def test_drop_path() -> None:
    x = torch.ones(4000, 3)
    assert drop_path(x, 0.3, training=False) is x
    y = drop_path(x, 0.3, training=True)
    kept = (y[:, 0] > 0).float().mean().item()
    assert abs(kept - 0.7) < 0.05
    assert torch.allclose(y[y > 0], torch.full_like(y[y > 0], 1 / 0.7))
    model = DeiT(
        DeiTConfig(
            img_size=16,
            patch_size=8,
            embed_dim=16,
            depth=4,
            num_heads=2,
            num_classes=3,
            drop_path_rate=0.3,
        )
    )
    assert [round(b.drop_path_rate, 3) for b in model.blocks] == [0.0, 0.1, 0.2, 0.3]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DeiTConfig(img_size=30, patch_size=16)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DeiTConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown DeiTConfig keys: colour"):
        DeiTConfig.from_dict({"colour": 1})
    cfg = DeiTConfig(img_size=(32, 48), patch_size=16)
    assert DeiTConfig.from_dict(cfg.to_dict()) == cfg and cfg.grid_size == (2, 3)


def test_golden_outputs(tiny_config: DeiTConfig) -> None:
    """A seeded tiny model gives the stored logits (guards against silent numeric changes)."""
    torch.manual_seed(1234)
    model = DeiT(tiny_config).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = model(x)
    golden_path = FIXTURES / "tiny_golden.pt"
    golden = torch.load(golden_path, weights_only=True)
    torch.testing.assert_close(out.cls_logits, golden["cls_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.dist_logits, golden["dist_logits"], atol=1e-5, rtol=0)
