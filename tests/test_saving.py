"""Writing models (deit.saving): our folder format and transformers', fp16, file modes,
conversion both ways."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from deit.checkpoints import load_model
from deit.saving import convert, save_model
from deit.transforms import PreprocessConfig

from .test_checkpoints import tiny_model, write_tiny_hf

transformers = pytest.importorskip("transformers")


def test_own_format_round_trip_and_fp16(tmp_path: Path) -> None:
    model = tiny_model()
    pre = PreprocessConfig(
        resize_mode="none",
        crop_size=None,
        channels=1,
        mean=(0.5,),
        std=(0.25,),
        invert_light_background=True,
    )
    save_model(
        model, tmp_path / "m", labels=["a", "b", "c"], preprocess=pre, metadata={"top1": 0.9}
    )
    loaded = load_model(tmp_path / "m")
    assert (loaded.format, loaded.labels, loaded.preprocess) == ("deit", ["a", "b", "c"], pre)
    assert loaded.metadata == {"top1": 0.9} and loaded.config == model.config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).logits, model(x).logits)
    save_model(model, tmp_path / "h", labels=["a", "b", "c"], preprocess=pre, dtype=torch.float16)
    half = load_model(tmp_path / "h")
    assert half.model.pos_embed.dtype == torch.float32  # upcast at load
    with torch.no_grad():
        torch.testing.assert_close(half.model(x).logits, model(x).logits, atol=2e-3, rtol=0)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_weights_are_readable_like_any_new_file(tmp_path: Path) -> None:
    """safetensors 0.8 writes 0600 files; a saved model must be readable by its group and
    others when the umask says so, or a service running as another user can't load it."""
    old = os.umask(0o022)
    try:
        save_model(
            tiny_model(), tmp_path / "m", labels=["a", "b", "c"], preprocess=PreprocessConfig()
        )
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o644, name


def test_convert_to_hf_and_back(tmp_path: Path) -> None:
    write_tiny_hf(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "ours", to="deit")
    convert(tmp_path / "ours", tmp_path / "hf", to="hf")
    back = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    assert back.config.id2label[2] == "fox" and processor.size["height"] == 32
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            back.eval()(pixel_values=x).logits,
            load_model(tmp_path / "src").model(x).logits,
            atol=1e-5,
            rtol=0,
        )
