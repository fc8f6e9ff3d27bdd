"""Shared by the export, serve, explain and web tests: tiny saved models, a running server."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

from deit.config import DeiTConfig
from deit.model import DeiT
from deit.saving import save_model
from deit.transforms import PreprocessConfig

LABELS = [f"class-{i}" for i in range(10)]


def save_tiny_model(
    folder: Path, *, channels: int = 3, distilled: bool = True, seed: int = 0
) -> Path:
    """A random 32 px, patch 8 (4x4 grid), 2-block DeiT saved in our format."""
    torch.manual_seed(seed)
    config = DeiTConfig(
        img_size=32,
        patch_size=8,
        in_chans=channels,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=10,
        distilled=distilled,
    )
    model = DeiT(config).eval()
    # Larger-than-init weights spread the logits, so argmax comparisons are not coin tosses.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.ndim > 1 else 1.0)
    preprocess = PreprocessConfig(
        resize_mode="squash",
        resize_size=(32, 32),
        crop_size=None,
        channels=channels,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
    )
    return save_model(model, folder, labels=LABELS, preprocess=preprocess)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
