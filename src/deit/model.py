"""The DeiT model, in one file: patch embedding, attention, MLP, block, model.

DeiT is a ViT with an optional second prefix token, the distillation token, whose head learns
from a teacher. Tokens are ordered ``[CLS, DIST, patch_1 ... patch_N]``; one learned position
embedding covers all of them and is added after concatenation. Pre-norm blocks, exact (erf)
GELU, fused q/k/v projection, attention scale ``head_dim ** -0.5``.

Parameter names are the official/timm checkpoint keys (``cls_token``, ``dist_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``, ``head``, ``head_dist``), so those checkpoints load with no renaming.

References:
    Touvron et al., "Training data-efficient image transformers & distillation through
    attention", ICML 2021 (arXiv 2012.12877).
    facebookresearch/deit `models.py`; timm `vision_transformer.py`, `deit.py`;
    transformers `modeling_deit.py` (all three compute the same function).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deit.config import DeiTConfig
from deit.errors import UsageError


class DeiTOutput(NamedTuple):
    """What every forward returns, in train and eval mode alike.

    Attributes:
        logits: inference logits (B, classes): the mean of the two heads' logits for a
            distilled model (as official, timm and transformers compute it), else the cls head.
        cls_logits: the class-token head (B, classes).
        dist_logits: the distillation-token head (B, classes); None for plain models.
        attentions: per block, softmax attention weights (B, heads, T, T); only when asked.
        block_outputs: the tokens (B, T, D) after each block asked for with
            ``output_blocks``, in block order; the last block's through the final norm, as the
            heads read them. Only when asked (the out-of-distribution score reads them).
    """

    logits: Tensor
    cls_logits: Tensor
    dist_logits: Tensor | None = None
    attentions: tuple[Tensor, ...] | None = None
    block_outputs: tuple[Tensor, ...] | None = None


def resize_pos_embed(
    pos_embed: Tensor, num_prefix_tokens: int, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> Tensor:
    """Resample a position embedding to another patch grid.

    The prefix rows (CLS, and DIST when present) are kept as they are; the patch rows are
    reshaped to their grid and resized bicubically with ``align_corners=False`` and no
    antialiasing, as the official fine-tuning script and transformers do (timm's default
    antialiased kernel gives different values).

    Args:
        pos_embed: (1, prefix + old_h * old_w, D).
        num_prefix_tokens: 1 or 2.
        old_grid: (old_h, old_w) patch grid of ``pos_embed``.
        new_grid: (new_h, new_w) wanted patch grid.

    Returns:
        (1, prefix + new_h * new_w, D), same dtype as the input.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    if patches.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch rows, not a {old_grid} grid")
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, patches.to(pos_embed.dtype)], dim=1)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly embedded by a strided convolution."""

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.patch_size = p
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), row-major over the grid


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection.

    The qkv output rows are laid out ``[q | k | v]``, each split into contiguous heads.
    The default path is PyTorch's fused ``scaled_dot_product_attention``; asking for the
    weights computes the same softmax explicitly.
    """

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: Tensor, return_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        weights = None
        if return_weights:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, T, T)
            x = weights @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(b, t, d)  # heads concatenated in order
        return self.proj(x), weights


class Mlp(nn.Module):
    """Two linear layers with exact (erf) GELU between them."""

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_hidden_dim, config.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: DeiTConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor, return_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        y, weights = self.attn(self.norm1(x), return_weights)
        x = x + drop_path(y, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x, weights


class DeiT(nn.Module):
    """DeiT image classifier, plain or distilled, of any size.

    Example:
        >>> from deit.config import VARIANTS
        >>> model = DeiT(VARIANTS["deit_tiny_distilled_patch16_224"]).eval()
        >>> out = model(torch.randn(1, 3, 224, 224))
        >>> out.logits.shape, out.dist_logits.shape
        (torch.Size([1, 1000]), torch.Size([1, 1000]))
    """

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if config.distilled else None
        num_tokens = config.num_prefix_tokens + config.grid_size[0] * config.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, d))
        rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.head = nn.Linear(d, config.num_classes)
        self.head_dist = nn.Linear(d, config.num_classes) if config.has_dist_head else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official DeiT initialisation: truncated normal (std .02) for tokens and linears."""
        if self.cls_token.is_meta:  # built on the meta device: shapes only, nothing to fill
            return
        for token in (self.cls_token, self.dist_token, self.pos_embed):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:  # the qkv projection with qkv_bias=False
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that the DeiT recipe trains without weight decay (besides 1-D ones)."""
        return {"cls_token", "dist_token", "pos_embed"}

    def _pos_embed(self, x: Tensor, grid: tuple[int, int], interpolate: bool) -> Tensor:
        """Prepend the prefix tokens to the patches (B, N, D) and add the position embedding."""
        pos_embed: Tensor = self.pos_embed
        if grid != self.config.grid_size:
            if not interpolate:
                raise ValueError(
                    f"input gives a {grid} patch grid but the model was built for "
                    f"{self.config.grid_size} (img_size {self.config.img_size}); resize the "
                    "input or pass interpolate_pos_encoding=True"
                )
            pos_embed = resize_pos_embed(
                pos_embed, self.config.num_prefix_tokens, self.config.grid_size, grid
            )
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        return torch.cat([*prefix, x], dim=1) + pos_embed  # (B, prefix + N, D)

    def forward_features(
        self,
        pixel_values: Tensor,
        *,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool = False,
        output_blocks: Sequence[int] = (),
    ) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]:
        """Normalised tokens (B, prefix + N, D) and, when asked, each block's attention and
        the outputs of the blocks in ``output_blocks`` (see :class:`DeiTOutput`)."""
        p, depth = self.config.patch_size, self.config.depth
        h, w = pixel_values.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of patch size {p}")
        keep = sorted(set(output_blocks))
        if keep and not 0 <= keep[0] <= keep[-1] < depth:
            raise ValueError(f"output_blocks {list(output_blocks)} are not blocks 0-{depth - 1}")
        x = self._pos_embed(
            self.patch_embed(pixel_values), (h // p, w // p), interpolate_pos_encoding
        )
        attentions, kept = [], []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, output_attentions)
            attentions.append(weights)
            if i in keep:
                kept.append(x)
        x = self.norm(x)
        if keep and keep[-1] == depth - 1:
            kept[-1] = x  # the last block as the heads read it
        return (
            x,
            tuple(attentions) if output_attentions else None,
            tuple(kept) if keep else None,
        )

    def forward(
        self,
        pixel_values: Tensor,
        *,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool = False,
        output_blocks: Sequence[int] = (),
    ) -> DeiTOutput:
        """Classify a batch of normalised images (B, C, H, W)."""
        x, attentions, blocks = self.forward_features(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_blocks=output_blocks,
        )
        cls_logits = self.head(x[:, 0])
        if self.head_dist is None:
            return DeiTOutput(cls_logits, cls_logits, None, attentions, blocks)
        dist_logits = self.head_dist(x[:, 1])
        logits = (cls_logits + dist_logits) / 2
        return DeiTOutput(logits, cls_logits, dist_logits, attentions, blocks)


Head = Literal["avg", "cls", "dist"]
HEADS: tuple[Head, ...] = ("avg", "cls", "dist")


class HeadLogits(nn.Module):
    """Wraps a DeiT so that it returns one logits tensor (B, classes) for the chosen head."""

    def __init__(self, model: DeiT, head: Head = "avg") -> None:
        super().__init__()
        if head not in HEADS:
            raise UsageError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
        if head == "dist" and model.head_dist is None:
            raise UsageError("head 'dist' needs a distilled model with a distillation head")
        self.model = model
        self.head = head

    def forward(self, pixel_values: Tensor) -> Tensor:
        return head_logits(self.model(pixel_values), self.head)


def head_logits(out: DeiTOutput, head: Head) -> Tensor:
    """The logits of ``head`` in a forward's output (``avg``: the inference logits)."""
    if head == "cls":
        return out.cls_logits
    if head == "dist":
        assert out.dist_logits is not None  # HeadLogits checks for a distillation head
        return out.dist_logits
    return out.logits
