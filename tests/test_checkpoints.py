"""Checkpoint formats, strict loading, saving, conversion and the Hub (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deit.checkpoints import CheckpointError, infer_config, load_model, read_state_dict
from deit.config import VARIANTS, DeiTConfig
from deit.errors import UnsafeFileError
from deit.hf_keys import hf_to_timm, timm_to_hf
from deit.model import DeiT
from deit.saving import save_model
from deit.transforms import PreprocessConfig

transformers = pytest.importorskip("transformers")

TINY_HF = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=1,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    num_labels=3,
    id2label={0: "cat", 1: "dog", 2: "fox"},
    label2id={"cat": 0, "dog": 1, "fox": 2},
)
HF_PROCESSOR = {
    "feature_extractor_type": "DeiTFeatureExtractor",
    "size": 32,
    "crop_size": 32,
    "resample": 3,
    "do_resize": True,
    "do_center_crop": True,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def write_tiny_hf(folder: Path) -> torch.nn.Module:
    model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TINY_HF))
    model.eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(HF_PROCESSOR))
    return model


def tiny_model() -> DeiT:
    return DeiT(
        DeiTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=3)
    ).eval()


def test_hf_folder_gives_labels_and_processor(tmp_path: Path) -> None:
    write_tiny_hf(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.labels == ["cat", "dog", "fox"]
    assert loaded.preprocess.resize_mode == "squash" and loaded.preprocess.input_size == (32, 32)
    assert loaded.config.layer_norm_eps == 1e-12 and loaded.config.num_heads == 1


def test_hf_pytorch_model_bin(tmp_path: Path) -> None:
    theirs = write_tiny_hf(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    torch.save(theirs.state_dict(), tmp_path / "b" / "pytorch_model.bin")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "b").model(x).logits,
            theirs(pixel_values=x).logits,
            atol=1e-5,
            rtol=0,
        )


def test_hf_key_mapping_round_trip() -> None:
    state = tiny_model().state_dict()
    hf = timm_to_hf(state, tiny_model().config)
    assert "deit.encoder.layer.1.attention.attention.value.weight" in hf
    assert "distillation_classifier.bias" in hf
    back = hf_to_timm(hf)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_wrappers_and_prefixes_are_unwrapped(tmp_path: Path) -> None:
    state = tiny_model().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "a.pth")
    read, fmt = read_state_dict(tmp_path / "a.pth")
    assert fmt == "timm" and set(read) == set(state)


def test_infer_config_from_shapes() -> None:
    for name, cfg in VARIANTS.items():
        state = {k: torch.empty(v.shape) for k, v in DeiT(cfg).state_dict().items()}
        assert infer_config(state) == cfg, name


def test_strict_loading_names_the_keys(tmp_path: Path) -> None:
    state = tiny_model().state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.extra"] = torch.zeros(1)
    state["head.bias"] = torch.zeros(4)
    state["head.weight"] = torch.zeros(4, 64)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth", labels=None)
    message = str(err.value)
    assert "missing keys: blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys: blocks.0.extra" in message


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    save_model(tiny_model(), folder, labels=["a", "b", "c"], preprocess=PreprocessConfig())
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["mlp_ratio"] = 3.0
    (folder / "config.json").write_text(json.dumps(meta))
    pattern = r"blocks\.0\.mlp\.fc1\.weight: checkpoint \(256, 64\) vs model \(192, 64\)"
    with pytest.raises(CheckpointError, match=pattern):
        load_model(folder)


def test_unreadable_and_unsafe_files(tmp_path: Path) -> None:
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(tmp_path / "text.pth")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeFileError, match=r"pickled Python objects \(GLOBAL \w+\.system\)"):
        load_model(tmp_path / "evil.pth")
    assert not Path("pwned").exists()
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.pth")


def test_timm_hub_folder_layout(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architecture": "deit_tiny_patch16_224",
                "num_classes": 1000,
                "pretrained_cfg": {
                    "crop_pct": 0.9,
                    "interpolation": "bicubic",
                    "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225],
                },
            }
        )
    )
    loaded = load_model(tmp_path)
    assert loaded.format == "timm" and loaded.preprocess.resize_size == 248
    assert loaded.labels[0] == "tench, Tinca tinca"


def test_preprocess_and_label_overrides(tmp_path: Path) -> None:
    write_tiny_hf(tmp_path / "m")
    (tmp_path / "labels.txt").write_text("one\ntwo\nthree\n")
    loaded = load_model(tmp_path / "m", preprocess="official", labels=tmp_path / "labels.txt")
    assert loaded.preprocess == PreprocessConfig.official(loaded.config.image_hw[0])
    assert loaded.labels == ["one", "two", "three"]
    with pytest.raises(ValueError, match="RGB ImageNet transform for 224 px"):
        load_model(tmp_path / "m", preprocess="model-card")  # a 224 px crop, a smaller model
    (tmp_path / "short.txt").write_text("one\n")
    with pytest.raises(ValueError, match="has 1 names; the model has 3"):
        load_model(tmp_path / "m", labels=tmp_path / "short.txt")
    for name, text in [
        ("id2label.json", '{"0": "one", "1": "two", "2": "three"}'),
        ("class_index.json", '{"1": ["n2", "two"], "0": ["n1", "one"], "2": ["n3", "three"]}'),
        ("list.json", '["one", "two", "three"]'),
    ]:
        (tmp_path / name).write_text(text)
        assert load_model(tmp_path / "m", labels=tmp_path / name).labels == ["one", "two", "three"]
    for name, data in [("broken.json", b'["one",\n'), ("image.png", b"\x89PNG\r\n\x1a\n\xff")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"label file .*{name} is not text"):
            load_model(tmp_path / "m", labels=tmp_path / name)


# --------------------------------------------------------------------------- Hub, offline

REPO_ID = "facebook/deit-tiny-distilled-patch16-224"


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deit", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def _fill_cache(cache: Path, source: Path, revision: str = "main") -> None:
    """Lay out a Hub cache the way huggingface_hub writes it (refs → snapshot folder)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


def test_hub_id_from_prefilled_cache_offline(tmp_path: Path, sample_images: list[Path]) -> None:
    write_tiny_hf(tmp_path / "src")
    _fill_cache(tmp_path / "cache", tmp_path / "src", revision="v1.0")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    result = _run_cli(
        [
            "predict",
            "--model",
            REPO_ID,
            "--revision",
            "v1.0",
            "--json",
            "-k",
            "3",
            str(sample_images[0]),
        ],
        env,
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["error"] is None and {p["label"] for p in row["predictions"]} == {
        "cat",
        "dog",
        "fox",
    }


def test_hub_offline_without_cache_is_one_clear_message(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    result = _run_cli(["predict", "img.png"], env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "--model fashion-mnist" in result.stderr and REPO_ID in result.stderr


def test_load_at_another_input_size(tmp_path: Path) -> None:
    """The official 224 → 384 fine-tuning start: pos_embed resampled, preprocessing scaled."""
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    torch.save({"model": theirs.state_dict()}, tmp_path / "official.pth")
    loaded = load_model(tmp_path / "official.pth", img_size=384)
    assert loaded.config.img_size == 384 and loaded.model.pos_embed.shape == (1, 2 + 24 * 24, 192)
    assert loaded.preprocess.crop_size == (384, 384) and loaded.preprocess.resize_size == 438
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():  # same as resampling at forward time
        expected = load_model(tmp_path / "official.pth").model(x, interpolate_pos_encoding=True)
        torch.testing.assert_close(loaded.model(x).logits, expected.logits)
