"""DeiT written directly as an ONNX graph for ONNX Runtime, with its fused attention operator.

The exporter in :mod:`deit.deploy.export` traces the model into portable ONNX: attention becomes a
dozen ``Reshape``/``Transpose``/``Split``/``MatMul``/``Softmax`` nodes per block, which ONNX
Runtime's CPU provider runs one by one, and which its quantizer leaves in fp32. This module
writes the same computation node by node instead, using

* ``com.microsoft.Attention`` for each block's q/k/v projection and multi-head attention (one
  kernel; ``deit quantize`` turns it into ``QAttention``, whose projection is int8),
* ``LayerNormalization`` (opset 17) and ``Gelu`` (opset 20, exact erf form),
* the prefix tokens with their position embedding folded into one constant, and the average
  of the two heads as one ``MatMul`` over the concatenated tokens.

The graph runs in ONNX Runtime only (the ``com.microsoft`` domain) and computes the logits
of :class:`~deit.deploy.export.HeadLogits` to float32 rounding, and, given fitted statistics, the
out-of-distribution score of :class:`~deit.ood.ScoredLogits` as a second output (nodes named
``ood*``): ``tests/test_ort_graph.py`` checks
it against eager PyTorch, and ``deit export``/``deit quantize`` verify every file they write
(:func:`deit.deploy.export.verify_export`). Speed: docs/performance.md.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from deit.model import DeiT
from deit.ood import OUTPUT_NAME as OOD_OUTPUT
from deit.ood import OODStats

ORT_DOMAIN = "com.microsoft"
OPSET = 20  # Gelu


class _GraphBuilder:
    """Nodes and initializers of one graph; every tensor and node is named by the caller."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def const(self, name: str, value: np.ndarray | torch.Tensor) -> str:
        """Add an initializer (torch tensors as float32) and return its name."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().float().numpy()
        array = np.ascontiguousarray(value)
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        """Add a node with one output; ``domain`` in ``attrs`` selects a contrib op."""
        domain = attrs.pop("domain", None)
        self.nodes.append(
            self.helper.make_node(op_type, inputs, [output], name=output, domain=domain, **attrs)
        )
        return output


def _ood_score(g: _GraphBuilder, stats: OODStats, layers: list[str]) -> str:
    """Nodes computing :class:`~deit.ood.LayeredScore` on the tapped layers' tokens (the
    tensor names in ``layers``), in the eager module's order of operations."""
    k = stats.taps.num_prefix
    total = ""
    for i, (tokens, layer) in enumerate(zip(layers, stats.layers, strict=True)):
        n, m = f"ood{i}", layer.scorer()
        axis1, last = g.ints(f"{n}.axis1", [1]), g.ints(f"{n}.last", [-1])
        k0, k1 = g.ints(f"{n}.k0", [0]), g.ints(f"{n}.k", [k])
        prefix = g.op("Slice", [tokens, k0, k1, axis1], f"{n}.prefix")
        prefix = g.op("ReduceMean", [prefix, axis1], f"{n}.prefix_mean", keepdims=1)
        patches = g.op("Slice", [tokens, k1, g.ints(f"{n}.end", [2**62]), axis1], f"{n}.patches")
        mean = g.op("ReduceMean", [patches, axis1], f"{n}.patch_mean", keepdims=1)
        squares = g.op("Mul", [patches, patches], f"{n}.squares")
        mean_sq = g.op("ReduceMean", [squares, axis1], f"{n}.patch_mean_sq", keepdims=1)
        t = g.op("Concat", [prefix, mean, mean_sq], f"{n}.tokens", axis=1)
        norm = g.op("ReduceL2", [t, last], f"{n}.norm", keepdims=1)
        eps = g.const(f"{n}.eps", np.array(1e-12, np.float32))
        norm = g.op("Max", [norm, eps], f"{n}.norm_eps")
        f = g.op("Flatten", [g.op("Div", [t, norm], f"{n}.unit")], f"{n}.features", axis=1)
        y = g.op("Sub", [f, g.const(f"{n}.center", m.center)], f"{n}.centered")
        y = g.op("MatMul", [y, g.const(f"{n}.whiten", m.whiten_t)], f"{n}.white")
        sq = g.op("ReduceSumSquare", [y, last], f"{n}.sq", keepdims=1)
        cross = g.op("MatMul", [y, g.const(f"{n}.means", m.means_w_t)], f"{n}.cross")
        cross = g.op("Mul", [cross, g.const(f"{n}.two", np.array(2, np.float32))], f"{n}.cross2")
        d2 = g.op("Sub", [sq, cross], f"{n}.d2_")
        d2 = g.op("Add", [d2, g.const(f"{n}.means_sq", m.means_sq)], f"{n}.d2")
        d = g.op("ReduceMin", [d2, last], f"{n}.min", keepdims=0)
        d = g.op("Max", [d, g.const(f"{n}.zero", np.array(0, np.float32))], f"{n}.clamped")
        d = g.op("Div", [d, g.const(f"{n}.dim", np.array(m.dim, np.float32))], f"{n}.per_dim")
        d = g.op("Sub", [d, g.const(f"{n}.offset", stats.offset[i : i + 1])], f"{n}.shifted")
        d = g.op("Div", [d, g.const(f"{n}.scale", stats.scale[i : i + 1])], f"{n}.z")
        total = d if not total else g.op("Add", [total, d], f"{n}.sum")
    return g.op("Identity", [total], OOD_OUTPUT)


class _Weights:
    """The model's float32 weights, written into a graph's nodes as they are used."""

    def __init__(self, g: _GraphBuilder, model: DeiT) -> None:
        self.g, self.cfg = g, model.config
        self.sd = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}

    def layer_norm(self, name: str, key: str, inp: str) -> str:
        weight = self.g.const(f"{name}.w", self.sd[f"{key}.weight"])
        bias = self.g.const(f"{name}.b", self.sd[f"{key}.bias"])
        eps = self.cfg.layer_norm_eps
        return self.g.op("LayerNormalization", [inp, weight, bias], name, axis=-1, epsilon=eps)

    def linear(self, name: str, key: str, inp: str) -> str:
        w = self.g.const(f"{name}.w", self.sd[f"{key}.weight"].T)
        y = self.g.op("MatMul", [inp, w], f"{name}.mm")
        return self.g.op("Add", [y, self.g.const(f"{name}.b", self.sd[f"{key}.bias"])], name)


def _embeddings(w: _Weights) -> str:
    """The tokens (B, prefix + patches, D) entering the first block."""
    g, sd, cfg = w.g, w.sd, w.cfg
    d, p, n_prefix = cfg.embed_dim, cfg.patch_size, cfg.num_prefix_tokens
    # Patches: conv (B, D, h, w) -> (B, h*w, D), plus their position embeddings.
    conv_w = g.const("patch.w", sd["patch_embed.proj.weight"])
    conv_b = g.const("patch.b", sd["patch_embed.proj.bias"])
    x = g.op(
        "Conv", ["pixel_values", conv_w, conv_b], "patch.conv", kernel_shape=[p, p], strides=[p, p]
    )
    x = g.op("Reshape", [x, g.ints("patch.shape", [0, d, -1])], "patch.flat")
    x = g.op("Transpose", [x], "patch.tokens", perm=[0, 2, 1])
    pos = sd["pos_embed"]
    x = g.op("Add", [x, g.const("patch.pos", pos[:, n_prefix:])], "patch.embedded")
    # Prefix tokens ([CLS] or [CLS, DIST]) with their position embeddings: one constant,
    # repeated over the batch.
    tokens = [sd["cls_token"]] + ([sd["dist_token"]] if cfg.distilled else [])
    prefix = g.const("prefix", torch.cat(tokens, dim=1) + pos[:, :n_prefix])
    batch = g.op("Shape", [x], "batch", start=0, end=1)
    shape = g.op("Concat", [batch, g.ints("prefix.dims", [n_prefix, d])], "prefix.shape", axis=0)
    prefix = g.op("Expand", [prefix, shape], "prefix.batch")
    return g.op("Concat", [prefix, x], "tokens", axis=1)


def _block(w: _Weights, i: int, x: str) -> str:
    """Block ``i`` applied to the tokens ``x``."""
    g, sd, cfg = w.g, w.sd, w.cfg
    key, name = f"blocks.{i}", f"b{i}"
    y = w.layer_norm(f"{name}.norm1", f"{key}.norm1", x)
    # Attention's weights are (D, 3D) with columns [q | k | v], heads contiguous: the
    # transpose of our fused qkv linear. Its default scale is 1/sqrt(head_dim).
    qkv_w = g.const(f"{name}.qkv.w", sd[f"{key}.attn.qkv.weight"].T)
    qkv_b = g.const(f"{name}.qkv.b", sd.get(f"{key}.attn.qkv.bias", torch.zeros(3 * cfg.embed_dim)))
    y = g.op(
        "Attention", [y, qkv_w, qkv_b], f"{name}.attn", domain=ORT_DOMAIN, num_heads=cfg.num_heads
    )
    y = w.linear(f"{name}.proj", f"{key}.attn.proj", y)
    x = g.op("Add", [x, y], f"{name}.residual1")
    y = w.layer_norm(f"{name}.norm2", f"{key}.norm2", x)
    y = w.linear(f"{name}.fc1", f"{key}.mlp.fc1", y)
    y = g.op("Gelu", [y], f"{name}.gelu")
    y = w.linear(f"{name}.fc2", f"{key}.mlp.fc2", y)
    return g.op("Add", [x, y], f"{name}.residual2")


def _logits(w: _Weights, head: str, distilled: bool, x: str) -> None:
    """The ``logits`` output of ``head`` from the final tokens ``x``."""
    g, sd, d = w.g, w.sd, w.cfg.embed_dim
    if head == "avg" and distilled:
        # avg = (cls @ Wc + bc + dist @ Wd + bd) / 2 = [cls, dist] @ [Wc; Wd] / 2 + ...
        x = g.op(
            "Slice",
            [x, g.ints("head.start", [0]), g.ints("head.end", [2]), g.ints("axis1", [1])],
            "head.tokens",
        )
        x = g.op("Reshape", [x, g.ints("head.shape", [0, 2 * d])], "head.flat")
        weight = torch.cat([sd["head.weight"].T, sd["head_dist.weight"].T]) / 2
        x = g.op("MatMul", [x, g.const("head.w", weight)], "head.mm")
        g.op("Add", [x, g.const("head.b", (sd["head.bias"] + sd["head_dist.bias"]) / 2)], "logits")
    else:
        index, key = (1, "head_dist") if head == "dist" else (0, "head")
        x = g.op("Gather", [x, g.ints("head.index", [index])], "head.token", axis=1)
        x = g.op("Reshape", [x, g.ints("head.shape", [0, d])], "head.flat")
        x = g.op("MatMul", [x, g.const("head.w", sd[f"{key}.weight"].T)], "head.mm")
        g.op("Add", [x, g.const("head.b", sd[f"{key}.bias"])], "logits")


def build_ort_graph(
    model: DeiT,
    head: Literal["avg", "cls", "dist"] = "avg",
    dynamic_batch: bool = False,
    ood: OODStats | None = None,
) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (eval mode) returning ``head``'s logits.

    Input ``pixel_values`` (batch, C, H, W) at the model's image size; output ``logits``
    (batch, classes), and with ``ood`` (statistics fitted for ``model``) ``ood_score``
    (batch,). ``dynamic_batch`` makes the batch dimension symbolic, else it is 1.
    """
    from onnx import TensorProto, helper

    cfg = model.config
    if head == "dist" and model.head_dist is None:
        raise ValueError("head 'dist' needs a distilled model with a distillation head")
    g = _GraphBuilder()
    w = _Weights(g, model)
    x = _embeddings(w)
    taps: list[str] = []  # the tokens the out-of-distribution score reads
    for i in range(cfg.depth):
        x = _block(w, i, x)
        if ood is not None and i in ood.taps.blocks[:-1]:
            taps.append(x)
    x = w.layer_norm("norm", "norm", x)
    outputs = []
    if ood is not None:
        _ood_score(g, ood, [*taps, x])
        outputs.append(helper.make_tensor_value_info(OOD_OUTPUT, TensorProto.FLOAT, [None]))
    _logits(w, head, model.head_dist is not None, x)

    h, wd = cfg.image_hw
    batch_dim: str | int = "batch" if dynamic_batch else 1
    pixels = [batch_dim, cfg.in_chans, h, wd]
    graph = helper.make_graph(
        g.nodes,
        "deit",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, pixels)],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, [batch_dim, cfg.num_classes]
            ),
            *outputs,
        ],
        g.initializers,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ORT_DOMAIN, 1)],
        producer_name="deit",
    )
