"""Model configuration: one frozen dataclass and the eight published DeiT shapes.

References:
    Touvron et al., "Training data-efficient image transformers & distillation through
    attention", ICML 2021 (arXiv 2012.12877), Table 1.
    facebookresearch/deit `models.py` (the published constructors).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from deit.errors import ConfigError, ConfigTypeError

# Upper bounds no file or setting may exceed, far above any published ViT (ViT-22B: width
# 6144, 48 blocks, 48 heads), so that a config can't claim an absurd model and make the
# loader allocate it. The image side matches PreprocessConfig's limit (deit.transforms).
LIMITS: dict[str, int] = {
    "img_size": 8192,  # pixels per side
    "patch_size": 1024,
    "in_chans": 256,
    "num_classes": 1_000_000,
    "embed_dim": 16384,
    "depth": 256,
    "num_heads": 1024,
}
MAX_MLP_RATIO = 64.0
_INT_FIELDS = ("patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads")
_REAL_FIELDS = ("mlp_ratio", "layer_norm_eps", "drop_path_rate")
_BOOL_FIELDS = ("distilled", "distill_head", "qkv_bias")


@dataclass(frozen=True)
class DeiTConfig:
    """Architecture of a DeiT model. Every published variant is one instance of this."""

    img_size: int | tuple[int, int] = 224  # input size the position embedding was trained at
    patch_size: int = 16  # side of the square patches (conv kernel and stride)
    in_chans: int = 3  # image channels (3 for RGB, 1 for grayscale data)
    num_classes: int = 1000  # outputs of each classification head
    embed_dim: int = 192  # token width D
    depth: int = 12  # number of transformer blocks
    num_heads: int = 3  # attention heads; head_dim = embed_dim // num_heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * embed_dim
    distilled: bool = True  # adds the distillation token and its head
    distill_head: bool = True  # False: a dist token with no head (HF DeiTForImageClassification)
    layer_norm_eps: float = 1e-6  # 1e-6 official/timm; HF configs store 1e-12
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear from 0)
    qkv_bias: bool = True  # bias on the fused q/k/v projection

    def __post_init__(self) -> None:
        if isinstance(self.img_size, list):
            object.__setattr__(self, "img_size", tuple(self.img_size))
        wrong = _type_problems(self)
        if wrong:  # before any arithmetic: "depth": 6.5 must not reach torch
            raise ConfigTypeError("invalid DeiTConfig: " + "; ".join(wrong))
        h, w = self.image_hw
        sizes = {"img_size": max(h, w), **{name: getattr(self, name) for name in _INT_FIELDS}}
        problems = [
            f"{name} {value} is over the limit of {LIMITS[name]}"
            for name, value in sizes.items()
            if value > LIMITS[name]
        ]
        not_positive = [
            name for name, value in {**sizes, "img_size": min(h, w)}.items() if value < 1
        ]
        if not_positive:
            problems.append(f"{', '.join(not_positive)} must be positive")
        elif h % self.patch_size or w % self.patch_size:
            problems.append(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        elif self.embed_dim % self.num_heads:
            problems.append(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate {self.drop_path_rate} is not in [0, 1)")
        if not (0.0 < self.mlp_ratio <= MAX_MLP_RATIO and self.mlp_hidden_dim >= 1):
            problems.append(f"mlp_ratio {self.mlp_ratio} is not in (0, {MAX_MLP_RATIO:g}]")
        if self.layer_norm_eps < 0:
            problems.append(f"layer_norm_eps {self.layer_norm_eps} is negative")
        if problems:
            raise ConfigError("invalid DeiTConfig: " + "; ".join(problems))

    @property
    def image_hw(self) -> tuple[int, int]:
        """Input (height, width)."""
        if isinstance(self.img_size, int):
            return (self.img_size, self.img_size)
        return (int(self.img_size[0]), int(self.img_size[1]))

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) at the configured input size."""
        h, w = self.image_hw
        return (h // self.patch_size, w // self.patch_size)

    @property
    def has_dist_head(self) -> bool:
        """Whether a head reads the distillation token (its logits join the average)."""
        return self.distilled and self.distill_head

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [CLS] or [CLS, DIST]."""
        return 2 if self.distilled else 1

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def replace(self, **changes: Any) -> DeiTConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of all fields."""
        d = dataclasses.asdict(self)
        if isinstance(d["img_size"], tuple):
            d["img_size"] = list(d["img_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeiTConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown DeiTConfig keys: {', '.join(unknown)}")
        return cls(**d)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _type_problems(config: DeiTConfig) -> list[str]:
    """One message per field of the wrong type (naming the field); normalises numbers."""
    problems = []
    size = config.img_size
    if _is_int(size) or (isinstance(size, tuple) and len(size) == 2 and all(map(_is_int, size))):
        pass
    else:
        problems.append(f"img_size must be an integer or [height, width], not {size!r}")
    for name in _INT_FIELDS:
        value = getattr(config, name)
        if not _is_int(value):
            problems.append(f"{name} must be an integer, not {value!r}")
        else:
            object.__setattr__(config, name, int(value))
    for name in _REAL_FIELDS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            problems.append(f"{name} must be a number, not {value!r}")
    for name in _BOOL_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, bool):
            problems.append(f"{name} must be true or false, not {value!r}")
    return problems


def _variant(dim: int, heads: int, distilled: bool, img_size: int = 224) -> DeiTConfig:
    return DeiTConfig(img_size=img_size, embed_dim=dim, num_heads=heads, distilled=distilled)


# The eight published shapes (paper Table 1; official `models.py`). All: patch 16, depth 12,
# MLP ratio 4, head_dim 64, 1000 classes, LayerNorm eps 1e-6.
VARIANTS: dict[str, DeiTConfig] = {
    "deit_tiny_patch16_224": _variant(192, 3, False),
    "deit_small_patch16_224": _variant(384, 6, False),
    "deit_base_patch16_224": _variant(768, 12, False),
    "deit_tiny_distilled_patch16_224": _variant(192, 3, True),
    "deit_small_distilled_patch16_224": _variant(384, 6, True),
    "deit_base_distilled_patch16_224": _variant(768, 12, True),
    "deit_base_patch16_384": _variant(768, 12, False, 384),
    "deit_base_distilled_patch16_384": _variant(768, 12, True, 384),
}
