"""What an exported graph may make its engine do, decided before the engine sees it.

An ``.onnx`` file or an OpenVINO IR is data, but a small one can still ask for a lot: one
``Expand``/``Broadcast`` of a constant to 25,000 x 25,000 is 2.5 GB that ONNX Runtime or
OpenVINO allocates while compiling (constant folding), and a deeply nested ``.xml`` crashes
OpenVINO's XML parser. This module bounds both, from what the file declares:

* :func:`scan_ir_xml` reads an IR's ``.xml`` with a streaming parser (expat) bounded in size,
  depth and element count, refuses any DOCTYPE (so no entity, internal or external, is ever
  expanded), and returns the ``deit`` runtime info: the metadata, without OpenVINO.
* :func:`check_onnx_graph` and :func:`check_ir_graph` infer every node's output shape for one
  image of the size the metadata declares (ONNX shape inference with data propagation;
  OpenVINO's own, on a reshaped copy) and refuse, naming the node, an output over
  :data:`MAX_TENSOR_BYTES`, constant-folded outputs over :data:`MAX_FOLDED_BYTES` plus four
  times the weights, a node whose output size only running it would tell, and a logits output
  whose shape does not fit the metadata's class count.

References:
    ONNX ``shape_inference.infer_shapes`` (``data_prop``); OpenVINO ``Model.reshape`` and
    ``get_ordered_ops``; the Python ``xml.parsers.expat`` documentation on XML
    vulnerabilities (billion laughs, external entities).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from xml.parsers import expat

from deit.config import DeiTConfig
from deit.errors import ExportError, ResourceLimitError

MAX_TENSOR_BYTES = 1 << 30  # one node's output for one image: DeiT-B/16 at 384 px needs 16 MB
MAX_FOLDED_BYTES = 256 << 20  # folded at compile time, beyond 4x the weights the file holds
MAX_XML_BYTES = 256 << 20  # an IR's graph; DeiT-B's is about 1 MB
MAX_XML_DEPTH = 64  # IRs nest about 6 deep; OpenVINO's parser crashed at 20,000
MAX_XML_ELEMENTS = 2_000_000
LOGITS = "logits"  # the logits output's name in our exports (others may follow it)

# ONNX operators whose output may be far larger than their inputs, by a tensor's values
_SIZE_FROM_VALUES = frozenset(
    {
        "Expand",
        "Tile",
        "ConstantOfShape",
        "Range",
        "Resize",
        "Upsample",
        "Pad",
        "OneHot",
        "CenterCropPad",
        "Col2Im",
        "RandomNormal",
        "RandomUniform",
    }
)
_CONTROL_FLOW = frozenset({"Loop", "Scan", "If", "SequenceMap"})
_OV_LOCATION = re.compile(r"^(Exception from \S+:\d+:?|Check '.*' failed at \S+:\d+:?)\s*$")


# --------------------------------------------------------------------------- budgets


class GraphBudget:
    """Counts what a graph's nodes would allocate for one image and refuses past the limits.

    Args:
        path: the file, for the messages.
        weights_bytes: the size of the file's weights (constant folding may copy them).
    """

    def __init__(self, path: Path, weights_bytes: int) -> None:
        self.path = path
        self.folded_limit = MAX_FOLDED_BYTES + 4 * weights_bytes
        self.folded = 0

    def add(self, node: str, op: str, nbytes: int, folded: bool) -> None:
        """One output of ``node`` (an ``op``): ``nbytes`` for one image; ``folded`` when the
        engine computes it once, from constants, while compiling."""
        where = f"{self.path}: node {node[:80]!r} ({op})"
        if nbytes > MAX_TENSOR_BYTES:
            raise ResourceLimitError(
                f"{where} would produce {nbytes:,} bytes for one image (the limit is "
                f"{MAX_TENSOR_BYTES:,}); refused"
            )
        if folded:
            self.folded += nbytes
            if self.folded > self.folded_limit:
                raise ResourceLimitError(
                    f"{where} takes what the engine computes from constants while compiling "
                    f"past {self.folded_limit:,} bytes; refused"
                )

    def unknown(self, node: str, op: str) -> None:
        """Refuse a node whose output size is known only by running it."""
        raise ResourceLimitError(
            f"{self.path}: node {node[:80]!r} ({op}) has an output whose size is not known "
            "before running (it depends on the values of a tensor); refused"
        )


def check_logits_shape(path: Path, shape: list[int | None], num_classes: int) -> None:
    """The logits output for one image must be ``(1, num_classes)``; None: not known yet."""
    if len(shape) != 2 or shape[0] not in (1, None) or shape[1] not in (num_classes, None):
        dims = " x ".join("?" if d is None else str(d) for d in shape) or "a scalar"
        raise ExportError(
            f"{path}: its logits output is {dims} for one image, but its metadata says "
            f"{num_classes} classes (expected 1 x {num_classes})"
        )


def check_logits(path: str | Path, logits: Any, images: int, num_classes: int) -> None:
    """A batch's logits must be ``(images, num_classes)``: the file's graph disagrees with its
    metadata otherwise (checked on every batch; it costs nothing)."""
    shape = tuple(logits.shape)
    if shape != (images, num_classes):
        raise ExportError(
            f"{path} returned logits of shape {shape} for {images} images, but its metadata "
            f"says {num_classes} classes"
        )


# --------------------------------------------------------------------------- ONNX


def _onnx_dims(value: Any) -> list[int | None] | None:
    """A value's dims (None per unknown or symbolic dim), None if it has no shape."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]


def _strip_large_initializers(proto: Any) -> set[str]:
    """Turn every initializer over 4 KB into a declared input of its shape (shape inference
    needs the values of small ones only: shapes, axes, scales). Returns all initializer names."""
    from onnx import helper

    graph = proto.graph
    names = {init.name for init in graph.initializer}
    inputs = {i.name for i in graph.input}
    keep = []
    for init in graph.initializer:
        if init.ByteSize() <= 4096:
            keep.append(init)
        elif init.name not in inputs:
            graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return names


def check_onnx_graph(proto: Any, path: Path, config: DeiTConfig) -> None:
    """Bound what ``proto`` (an ``onnx.ModelProto`` read without external data; modified
    here) would allocate, and check its logits output against ``config``.

    Raises:
        ResourceLimitError: a node over the limits, or of unknown output size.
        ExportError: an input or logits output that does not fit the metadata, control flow,
            or a graph shape inference rejects.
    """
    import onnx

    graph = proto.graph
    weights = path.stat().st_size
    constants = _strip_large_initializers(proto)
    real_inputs = [i for i in graph.input if i.name not in constants]
    if len(real_inputs) != 1:
        raise ExportError(f"{path} has {len(real_inputs)} inputs; a deit export has one")
    c, (h, w) = config.in_chans, config.image_hw
    shape = real_inputs[0].type.tensor_type.shape
    declared = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    if len(declared) != 4 or declared[0] not in (1, None) or declared[1:] != [c, h, w]:
        raise ExportError(
            f"{path}: its input is {declared}, but its metadata says {c} x {h} x {w} images"
        )
    shape.dim[0].dim_value = 1  # one image: every size below is per image, and static
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx raises InferenceError, ValidationError, ...
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{path}: its graph is inconsistent ({first_line[:200]})") from None
    g = inferred.graph
    values = {v.name: v for v in [*g.value_info, *g.output, *g.input]}
    folded = set(constants)
    budget = GraphBudget(path, weights)
    for node in g.node:
        name = node.name or (node.output[0] if node.output else node.op_type)
        if node.op_type in _CONTROL_FLOW or any(a.type in (5, 10) for a in node.attribute):
            raise ExportError(
                f"{path}: node {name[:80]!r} ({node.op_type}) holds a subgraph (control flow), "
                "which deit exports never do; refused"
            )
        is_folded = node.op_type == "Constant" or (
            not node.op_type.startswith("Random") and all(i in folded or not i for i in node.input)
        )
        for out in node.output:
            dims = _onnx_dims(values[out]) if out in values else None
            if dims is None or None in dims:
                if node.op_type in _SIZE_FROM_VALUES and node.domain in ("", "ai.onnx"):
                    budget.unknown(name, node.op_type)
                continue
            elem = values[out].type.tensor_type.elem_type
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize if elem else 4
            budget.add(name, node.op_type, math.prod(d or 0 for d in dims) * itemsize, is_folded)
            if is_folded:
                folded.add(out)
    outputs = {o.name: o for o in g.output}
    logits = outputs.get(LOGITS) or (g.output[0] if len(g.output) else None)
    if logits is None:
        raise ExportError(f"{path} has no output")
    dims = _onnx_dims(logits)
    check_logits_shape(path, dims if dims is not None else [None, None], config.num_classes)


# --------------------------------------------------------------------------- OpenVINO


class _Refused(Exception):
    """Raised inside expat's callbacks to stop the scan, with the error to report."""

    def __init__(self, why: str, error: type[Exception] = ExportError) -> None:
        super().__init__(why)
        self.error = error


def scan_ir_xml(path: Path) -> dict[str, str]:
    """Pre-scan an IR's ``.xml`` before OpenVINO parses it; return its ``deit`` runtime info
    as ``deit.*`` keys (what ``set_rt_info(value, ["deit", key])`` wrote).

    Raises:
        ResourceLimitError: over :data:`MAX_XML_BYTES`, :data:`MAX_XML_DEPTH` or
            :data:`MAX_XML_ELEMENTS`.
        ExportError: a DOCTYPE or entity declaration, or not XML of an IR (``<net>``).
    """
    size = path.stat().st_size
    if size > MAX_XML_BYTES:
        raise ResourceLimitError(f"{path} is {size:,} bytes (the limit is {MAX_XML_BYTES:,})")
    stack: list[str] = []
    meta: dict[str, str] = {}
    count = 0

    def start(tag: str, attrs: dict[str, str]) -> None:
        nonlocal count
        count += 1
        if count > MAX_XML_ELEMENTS:
            raise _Refused(f"holds more than {MAX_XML_ELEMENTS:,} elements", ResourceLimitError)
        if len(stack) >= MAX_XML_DEPTH:
            raise _Refused(f"nests elements more than {MAX_XML_DEPTH} deep", ResourceLimitError)
        if not stack and tag != "net":
            raise _Refused(f"is not an OpenVINO IR (its root is <{tag[:40]}>, not <net>)")
        stack.append(tag)
        if stack[:3] == ["net", "rt_info", "deit"] and len(stack) == 4 and "value" in attrs:
            meta[f"deit.{tag}"] = attrs["value"]

    def refuse_declaration(*_: Any) -> Any:
        raise _Refused("holds a DOCTYPE or entity declaration, which an IR never needs")

    parser = expat.ParserCreate()
    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: stack.pop()
    parser.StartDoctypeDeclHandler = refuse_declaration
    parser.EntityDeclHandler = refuse_declaration
    parser.ExternalEntityRefHandler = refuse_declaration
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                parser.Parse(chunk, False)
            parser.Parse(b"", True)
    except _Refused as e:
        raise e.error(f"{path} {e}; refused") from None
    except expat.ExpatError as e:
        raise ExportError(f"cannot read {path}: not an OpenVINO IR (XML error: {e})") from None
    return meta


def openvino_error_line(e: BaseException) -> str:
    """OpenVINO's multi-line message reduced to its cause: the lines that only say where in
    OpenVINO's sources it was raised ("Exception from src/...cpp:84:") are dropped."""
    lines = [line.strip() for line in str(e).splitlines()]
    cause = [line for line in lines if line and not _OV_LOCATION.match(line)]
    return "; ".join(cause)[:300] or type(e).__name__


def _ov_bytes(output: Any) -> int | None:
    """Bytes of one static output; None when its shape is not fully known."""
    shape = output.get_partial_shape()
    if shape.rank.is_dynamic or shape.is_dynamic:
        return None
    bits = output.get_element_type().bitwidth or 64
    return math.ceil(math.prod(d.get_length() for d in shape) * bits / 8)


def check_ir_graph(model: Any, path: Path, config: DeiTConfig) -> None:
    """Bound what an IR (an ``ov.Model`` just read) would allocate for one image, and check
    its input and logits output against ``config``; ``model`` itself is not changed.

    Raises:
        ResourceLimitError: a node over the limits, or of unknown output size.
        ExportError: an input or logits output that does not fit the metadata.
    """
    import openvino as ov

    if len(model.inputs) != 1:
        raise ExportError(f"{path} has {len(model.inputs)} inputs; a deit export has one")
    c, (h, w) = config.in_chans, config.image_hw
    probe = model.clone()
    try:
        probe.reshape({0: ov.PartialShape([1, c, h, w])})
    except Exception as e:  # OpenVINO raises RuntimeError subclasses
        raise ExportError(
            f"{path}: its input does not take 1 x {c} x {h} x {w} images as its metadata "
            f"says ({openvino_error_line(e)})"
        ) from None
    budget = GraphBudget(path, path.with_suffix(".bin").stat().st_size)
    folded: set[str] = set()
    for op in probe.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind == "Constant":  # its bytes are in the .bin, already read
            folded.add(op.get_name())
            continue
        sources = [i.get_source_output().get_node().get_name() for i in op.inputs()]
        is_folded = kind not in ("Parameter", "ShapeOf", "ReadValue") and all(
            s in folded for s in sources
        )
        for output in op.outputs():
            nbytes = _ov_bytes(output)
            if nbytes is None:
                budget.unknown(name, kind)
            else:
                budget.add(name, kind, nbytes, is_folded)
        if is_folded:
            folded.add(op.get_name())
    outputs = probe.outputs
    logits = next((o for o in outputs if LOGITS in o.get_names()), outputs[0] if outputs else None)
    if logits is None:
        raise ExportError(f"{path} has no output")
    shape = logits.get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else []
    check_logits_shape(path, dims, config.num_classes)
