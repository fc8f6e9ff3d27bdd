"""deit.deploy.ort_graph: the hand-written ONNX Runtime graph computes eager PyTorch's logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from deit.config import DeiTConfig
from deit.deploy.export import ExportError, export_onnx, read_metadata, verify_export
from deit.model import DeiT, HeadLogits

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

CONFIGS = {
    "distilled": {},
    "plain": {"distilled": False},
    "dist-token-no-head": {"distill_head": False},  # transformers' DeiTForImageClassification
    "no-qkv-bias": {"qkv_bias": False},
    "gray-wide": {"in_chans": 1, "img_size": (16, 40), "patch_size": 4, "num_heads": 4},
}


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": x.numpy()})[0]


def _model(tiny_config: DeiTConfig, changes: dict) -> DeiT:
    model = DeiT(dataclasses.replace(tiny_config, **changes)).eval()
    with torch.no_grad():  # non-zero biases and norms, so that every term is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("head", ["avg", "cls", "dist"])
def test_fused_graph_matches_eager(
    name: str, head: str, tiny_config: DeiTConfig, tmp_path: Path
) -> None:
    model = _model(tiny_config, CONFIGS[name])
    if head == "dist" and model.head_dist is None:
        with pytest.raises(ValueError, match="distilled model with a distillation head"):
            export_onnx(model, tmp_path / "m.onnx", head="dist", fused=True)
        return
    path = export_onnx(model, tmp_path / "m.onnx", head=head, dynamic_batch=True, fused=True)
    x = torch.randn(3, model.config.in_chans, *model.config.image_hw)
    with torch.no_grad():
        want = HeadLogits(model, head)(x).numpy()  # type: ignore[arg-type]
    np.testing.assert_allclose(_run(path, x), want, rtol=1e-5, atol=1e-5)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Attention" in ops and "Softmax" not in ops
    assert read_metadata(path)["deit.graph"] == "onnxruntime"


def test_fused_graph_fixed_batch_and_opset(tiny_config: DeiTConfig, tmp_path: Path) -> None:
    model = _model(tiny_config, {})
    path = export_onnx(model, tmp_path / "m.onnx", fused=True)
    shape = onnx.load(str(path)).graph.input[0].type.tensor_type.shape
    assert [d.dim_value for d in shape.dim] == [1, 3, 32, 32]
    assert verify_export(path, model).passed
    with pytest.raises(ExportError, match="opset 20"):
        export_onnx(model, tmp_path / "other.onnx", opset=18, fused=True)
    assert not (tmp_path / "other.onnx").exists()
