"""Shared fixtures: tiny configs, the repository's shared sample data."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from deit.config import DeiTConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def idx_bytes(arr: np.ndarray, *, gz: bool = False) -> bytes:
    """``arr`` as an IDX file (the Fashion-MNIST format), gzip-compressed when ``gz``."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    return gzip.compress(data) if gz else data


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SAMPLE_IMAGES = FIXTURES / "images"  # scikit-image's sample photos (public domain / CC0)


@pytest.fixture
def sample_images() -> list[Path]:
    return sorted(p for p in SAMPLE_IMAGES.iterdir() if p.is_file())


@pytest.fixture
def tiny_config() -> DeiTConfig:
    return DeiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
