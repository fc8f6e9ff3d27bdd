"""Attention rollout maps for the class token and the distillation token.

Attention rollout (Abnar & Zuidema 2020) follows how much each patch contributes to a token
through all blocks: per block, average the heads' attention weights, add the identity for the
residual connection, renormalise every row to sum to one, and multiply the blocks' matrices
(``R = A_L ... A_2 A_1``). Row ``t`` of ``R`` restricted to the patch columns is the map for
token ``t``; DeiT has two such tokens, ``cls`` (row 0) and ``dist`` (row 1).

The weights come from the model's explicit attention path (``output_attentions=True``), which
computes the same softmax as the fused kernel, so the maps work with fused attention too (the
fused path is used for everything else).

References:
    Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020 (arXiv 2005.00928).

Example:
    >>> from deit.explain import explain, render_overlay, model_view
    >>> maps = explain("fashion-mnist", "shoe.png", token="both")
    >>> render_overlay("shoe.png", maps["dist"], preprocess=cfg).save("map.png")
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from deit.checkpoints import LoadedModel, as_loaded
from deit.images import ImageLike, load_image
from deit.model import DeiT
from deit.transforms import (
    PreprocessConfig,
    preprocess_image,
    resize_and_crop,
    to_mode,
)

Token = Literal["cls", "dist", "both"]
TOKEN_ROWS = {"cls": 0, "dist": 1}

# A perceptually ordered colormap (dark blue -> purple -> orange -> light yellow), given by
# anchor colours and linearly interpolated to 256 entries.
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB (shape + (3,))."""
    pos = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def attention_rollout(attentions: Sequence[Tensor], residual: bool = True) -> Tensor:
    """Roll attention out through the blocks.

    Args:
        attentions: Per block, softmax weights (B, heads, T, T), first block first.
        residual: Add the identity before renormalising (the paper's residual correction).

    Returns:
        (B, T, T) float32; every row sums to one. Row ``t`` says how much each input token
        flows into output token ``t`` after the last block.
    """
    if not attentions:
        raise ValueError("no attention weights: the model has no blocks")
    b, _, t, _ = attentions[0].shape
    eye = torch.eye(t, dtype=torch.float32, device=attentions[0].device)
    rollout = eye.expand(b, t, t)
    for weights in attentions:
        a = weights.float().mean(dim=1)  # (B, T, T), heads averaged
        if residual:
            a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout  # this block applied after the ones before it
    return rollout


@torch.no_grad()
def rollout_maps(model: DeiT, pixel_values: Tensor, token: Token = "both") -> dict[str, Tensor]:
    """Rollout maps (B, grid_h, grid_w) per token for preprocessed images (B, C, H, W).

    ``both`` gives ``cls`` and, for a model with a distillation token, ``dist``. The values
    are each patch's share of the token's rolled-out attention (the prefix tokens take the
    rest, so a map sums to less than one).

    Raises:
        ValueError: ``dist`` asked of a model without a distillation token.
    """
    has_dist = model.config.distilled
    if token == "dist" and not has_dist:
        raise ValueError("this model has no distillation token; use token 'cls'")
    if token not in ("cls", "dist", "both"):
        raise ValueError(f"token must be cls, dist or both, not {token!r}")
    tokens = [token] if token != "both" else (["cls", "dist"] if has_dist else ["cls"])
    was_training = model.training
    model.eval()
    try:
        out = model(pixel_values, output_attentions=True, interpolate_pos_encoding=True)
    finally:
        model.train(was_training)
    rollout = attention_rollout(out.attentions)
    prefix = model.config.num_prefix_tokens
    p = model.config.patch_size
    grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
    return {name: rollout[:, TOKEN_ROWS[name], prefix:].reshape(-1, *grid).cpu() for name in tokens}


def explain(
    model: LoadedModel | DeiT | Any,
    image: ImageLike,
    token: Token = "both",
    *,
    max_pixels: int | None = None,
) -> dict[str, np.ndarray]:
    """Attention rollout map(s) of one image: ``{"cls": (grid_h, grid_w), "dist": ...}``.

    Args:
        model: A :class:`LoadedModel`, ``Classifier``, ``DeiT`` or a checkpoint source.
        image: Path, bytes, PIL image, array or tensor; preprocessed with the model's config.
        token: ``cls``, ``dist`` or ``both``.
        max_pixels: Refuse larger images (see :func:`deit.images.load_image`).
    """
    loaded = as_loaded(model)
    img = load_image(image) if max_pixels is None else load_image(image, max_pixels=max_pixels)
    x = preprocess_image(img, loaded.preprocess)[None]
    device = next(loaded.model.parameters()).device
    maps = rollout_maps(loaded.model, x.to(device), token)
    return {k: v[0].numpy() for k, v in maps.items()}


def model_view(image: ImageLike | Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """The RGB picture the model sees: the image resized and cropped per ``cfg``, not normalised.

    Grayscale models' inputs are shown in gray; light-background inversion is not applied, so
    the view matches what the user uploaded.
    """
    img = image if isinstance(image, Image.Image) else load_image(image)
    img = to_mode(to_mode(img, cfg.channels), 3)  # gray models: show the gray picture
    arr = resize_and_crop(img, cfg)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def normalize_map(attn_map: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] (min to 0, max to 1; a flat map becomes all zeros)."""
    lo, hi = float(attn_map.min()), float(attn_map.max())
    return (attn_map - lo) / (hi - lo) if hi > lo else np.zeros_like(attn_map, dtype=np.float64)


def render_overlay(
    image: ImageLike | Image.Image,
    attn_map: np.ndarray,
    *,
    preprocess: PreprocessConfig | None = None,
    alpha: float = 0.55,
    min_size: int = 224,
) -> Image.Image:
    """The map, normalised and colour-mapped, blended over the model's view of ``image``.

    Args:
        image: The model's view (see :func:`model_view`), or any image when ``preprocess`` is
            given to produce that view.
        attn_map: (grid_h, grid_w) map, e.g. from :func:`explain`.
        preprocess: The model's preprocessing; ``None`` if ``image`` is already the view.
        alpha: Weight of the colour map in the blend.
        min_size: Small views are enlarged (nearest neighbour) to at least this shorter side.

    The map is upsampled bilinearly to the view.
    """
    if preprocess is not None:
        image = model_view(image, preprocess)
    elif not isinstance(image, Image.Image):
        image = load_image(image)
    view = image.convert("RGB")
    scale = max(1, -(-min_size // min(view.size)))
    if scale > 1:
        view = view.resize((view.width * scale, view.height * scale), Image.Resampling.NEAREST)
    small = Image.fromarray(normalize_map(attn_map).astype(np.float32), "F")
    heat = np.asarray(small.resize(view.size, Image.Resampling.BILINEAR))
    blended = (1 - alpha) * np.asarray(view, np.float64) + alpha * colormap(heat)
    return Image.fromarray(np.rint(blended).astype(np.uint8), "RGB")


TOKEN_NAMES = {"cls": "class token", "dist": "distillation token"}


def render_sheet(view: Image.Image, maps: dict[str, np.ndarray]) -> Image.Image:
    """Captioned overlays of each map over ``view``, side by side (``cls`` then ``dist``)."""
    from PIL import ImageDraw

    panels = [render_overlay(view, m) for m in maps.values()]
    gap, caption = 8, 22
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, max(p.height for p in panels) + caption), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for name, panel in zip(maps, panels):
        sheet.paste(panel, (x, 0))
        draw.text((x + 4, panel.height + 5), f"rollout: {TOKEN_NAMES[name]}", fill=(40, 40, 40))
        x += panel.width + gap
    return sheet


def explain_to_file(
    model: LoadedModel | DeiT | Any, image: ImageLike, out: str | Path, token: Token = "both"
) -> Path:
    """Write a PNG of the captioned overlay(s); ``both`` puts ``cls`` and ``dist`` side by side."""
    loaded = as_loaded(model)
    img = load_image(image)
    sheet = render_sheet(model_view(img, loaded.preprocess), explain(loaded, img, token))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def explain_payload(
    image: Image.Image, cfg: PreprocessConfig, maps: dict[str, np.ndarray], fmt: str
) -> bytes | dict[str, Any]:
    """What the server answers: PNG bytes of :func:`render_sheet`, or a JSON-able dict.

    The dict holds ``grid`` (h, w), ``tokens``, ``maps`` (nested lists) and ``view``, the
    model's view of the image as a PNG data URL, over which a client draws the maps.
    """
    view = model_view(image, cfg)
    if fmt == "png":
        return png_bytes(render_sheet(view, maps))
    return {
        "grid": list(next(iter(maps.values())).shape),
        "tokens": list(maps),
        "maps": {k: np.round(v, 6).tolist() for k, v in maps.items()},
        "view": "data:image/png;base64," + base64.b64encode(png_bytes(view)).decode("ascii"),
    }
