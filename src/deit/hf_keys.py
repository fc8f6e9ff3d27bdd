"""The transformers format's names: state-dict keys and ``config.json`` ↔ ours.

transformers stores DeiT/ViT weights under its own key names (``deit.``/``vit.`` prefixes,
separate q/k/v) and describes the architecture in its ``config.json``; the model here uses the
official/timm key names and :class:`~deit.config.DeiTConfig`. This module translates both, both
ways: one table (:data:`_HF_BLOCK_KEYS`) plus the q/k/v fuse for the weights,
:func:`config_from_hf` / :func:`config_to_hf` for the config. It is pure mapping (no files, no
network), so it stands apart from :mod:`deit.checkpoints`, which reads and writes the files and
uses it for the ``hf`` format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from deit.config import DeiTConfig
from deit.errors import CheckpointError

# HF on-disk block keys (after ``{prefix}encoder.layer.{i}.``) → ours (after ``blocks.{i}.``).
# q/k/v are separate in HF and fused (rows [q | k | v]) here; see hf_to_timm.
_HF_BLOCK_KEYS = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    # transformers 5 in-memory names (what ``model.state_dict()`` returns there)
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {"query": "q", "key": "k", "value": "v", "q_proj": "q", "k_proj": "k", "v_proj": "v"}
_HF_TOP_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "layernorm": "norm",
}
_HF_HEADS = {"cls_classifier": "head", "distillation_classifier": "head_dist", "classifier": "head"}


def hf_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a transformers DeiT/ViT state dict to our (official/timm) keys."""
    prefix = "deit." if any(k.startswith("deit.") for k in state) else "vit."
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        block = re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$", name)
        head = name.rsplit(".", 1)
        if block:
            i, sub, kind = int(block[1]), block[2], block[3]
            qkv_part = re.fullmatch(r"attention\.(?:attention\.)?(\w+)", sub)
            if qkv_part and qkv_part[1] in _HF_QKV:
                qkv.setdefault((i, kind), {})[_HF_QKV[qkv_part[1]]] = value
            else:
                out[f"blocks.{i}.{_HF_BLOCK_KEYS.get(sub, sub)}.{kind}"] = value
        elif name in _HF_TOP_KEYS:
            out[_HF_TOP_KEYS[name]] = value
        elif head[0] in _HF_TOP_KEYS:
            out[f"{_HF_TOP_KEYS[head[0]]}.{head[1]}"] = value
        elif head[0] in _HF_HEADS and not key.startswith(prefix):
            out[f"{_HF_HEADS[head[0]]}.{head[1]}"] = value
        else:
            out[key] = value  # left for the strict check to name
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"block {i}: q/k/v {kind} incomplete ({sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def timm_to_hf(state: dict[str, Tensor], config: DeiTConfig) -> dict[str, Tensor]:
    """Our keys → transformers on-disk keys (``deit.`` for distilled, ``vit.`` for plain)."""
    prefix = "deit." if config.distilled else "vit."
    top = {v: k for k, v in _HF_TOP_KEYS.items()}
    blocks = {v: k for k, v in _HF_BLOCK_KEYS.items()}
    heads = {
        "head": "cls_classifier" if config.has_dist_head else "classifier",
        "head_dist": "distillation_classifier",
    }
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        block = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        stem, _, kind = key.rpartition(".")
        if block:
            i, sub, kind = block[1], block[2], block[3]
            base = f"{prefix}encoder.layer.{i}."
            if sub == "attn.qkv":
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{base}attention.attention.{name}.{kind}"] = part.contiguous()
            else:
                out[f"{base}{blocks[sub]}.{kind}"] = value
        elif key in top:
            out[prefix + top[key]] = value
        elif stem in top:
            out[f"{prefix}{top[stem]}.{kind}"] = value
        else:
            out[f"{heads[stem]}.{kind}"] = value
    return out


def config_from_hf(hf: Mapping[str, Any]) -> DeiTConfig:
    """DeiTConfig from a transformers ``config.json`` (model_type ``deit`` or ``vit``)."""
    model_type = hf.get("model_type")
    if model_type not in ("deit", "vit"):
        raise CheckpointError(f"config.json has model_type {model_type!r}, not 'deit' or 'vit'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"unsupported hidden_act {hf['hidden_act']!r} (DeiT uses 'gelu')")
    hidden = hf.get("hidden_size", 768)
    architectures = hf.get("architectures") or []
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    return DeiTConfig(
        img_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16),
        in_chans=hf.get("num_channels", 3),
        num_classes=num_labels,
        embed_dim=hidden,
        depth=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        mlp_ratio=hf.get("intermediate_size", 4 * hidden) / hidden,
        distilled=model_type == "deit",
        distill_head="DeiTForImageClassification" not in architectures,
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        qkv_bias=hf.get("qkv_bias", True),
    )


def config_to_hf(config: DeiTConfig, labels: list[str]) -> dict[str, Any]:
    """A transformers ``config.json`` for this architecture (DeiT when distilled, else ViT)."""
    if config.distilled:
        arch = (
            "DeiTForImageClassificationWithTeacher"
            if config.has_dist_head
            else "DeiTForImageClassification"
        )
        model_type = "deit"
    else:
        arch, model_type = "ViTForImageClassification", "vit"
    img = config.img_size if isinstance(config.img_size, int) else list(config.img_size)
    return {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_hidden_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": img,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "encoder_stride": config.patch_size,
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }
