"""OpenVINO IR files (``deit export --format openvino``) as models, run on the CPU.

An IR is ``model.xml`` (the graph) plus ``model.bin`` (the weights): data only, nothing in it
runs as Python. ``deit export`` stores the labels, preprocessing and config in the IR's runtime
info under ``deit``, so a ``Classifier`` (and ``deit predict``, ``serve``, ``eval``) runs the
file like any checkpoint. OpenVINO compiles it for this CPU; ``precision="bf16"`` asks it to
compute in bfloat16 where the CPU has the instructions (AVX-512 BF16, AMX), and an IR that
``deit quantize --engine openvino`` wrote computes its matrix products in int8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deit.checkpoints import LoadedModel
from deit.config import DeiTConfig
from deit.errors import ExportError, UsageError
from deit.graph_limits import check_ir_graph, check_logits, openvino_error_line, scan_ir_xml
from deit.model import DeiT, DeiTOutput, Head, HeadLogits
from deit.onnx_model import REQUIRED_METADATA, exported_settings, shapes_only
from deit.ood import OUTPUT_NAME as OOD_OUTPUT
from deit.ood import OODStats, ScoredLogits
from deit.runtime import require

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # our names -> INFERENCE_PRECISION_HINT
METADATA_KEYS = (
    "config",
    "labels",
    "preprocess",
    "head",
    "source",
    "dynamic_batch",
    "quantization",
    "ood",
)


def openvino() -> Any:
    """The ``openvino`` module, or an error saying how to install it."""
    return require("openvino", "openvino", "openvino")


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively on this machine."""
    caps = openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in caps


def compile_model(
    model: Any, precision: str = "fp32", threads: int | None = None, latency: bool = True
) -> Any:
    """``model`` (an ``ov.Model`` or a path) compiled for the CPU in ``precision``."""
    if precision not in PRECISIONS:
        raise UsageError(f"OpenVINO runs fp32 or bf16, not {precision!r}")
    if precision == "bf16" and not bf16_supported():
        raise UsageError("this CPU has no bf16 instructions (AVX-512 BF16 or AMX): use fp32")
    config = {
        "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
        "PERFORMANCE_HINT": "LATENCY" if latency else "THROUGHPUT",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    ov = openvino()
    if isinstance(model, str | Path):  # never compiled unchecked: see read_ir
        model = read_ir(model)[0]
    try:
        return ov.Core().compile_model(model, "CPU", config)
    except RuntimeError as e:
        # read_ir names a model after its file
        name = model.get_friendly_name()
        raise ExportError(f"OpenVINO cannot compile {name}: {openvino_error_line(e)}") from None


def read_ir(path: str | Path) -> tuple[Any, dict[str, str]]:
    """An IR's ``ov.Model`` and its ``deit.*`` metadata, read by OpenVINO only after its XML
    passed :func:`deit.graph_limits.scan_ir_xml`; when it carries our metadata, also bounded
    and checked against it by :func:`deit.graph_limits.check_ir_graph`.

    Raises:
        ExportError: missing ``.bin``, malformed XML, or a graph OpenVINO rejects (one line).
        ResourceLimitError: an XML or a graph over the limits.
    """
    path = Path(path)
    meta = read_openvino_metadata(path)
    try:
        model = openvino().Core().read_model(str(path))
    except RuntimeError as e:
        raise ExportError(f"cannot read {path}: {openvino_error_line(e)}") from None
    if set(REQUIRED_METADATA) <= set(meta):
        config = exported_settings(meta, path, "`deit export --format openvino`")[0]
        check_ir_graph(model, path, config)
    model.set_friendly_name(str(path))  # for messages
    return model, meta


def convert_module(model: DeiT, head: Head = "avg", ood: OODStats | None = None) -> Any:
    """An ``ov.Model`` computing ``model``'s ``head`` logits, input ``pixel_values`` with a
    dynamic batch dimension (through ``torch.export``; nothing is traced by executing code);
    with ``ood``, the fitted out-of-distribution score is a second output, ``ood_score``."""
    ov = openvino()
    wrapper: nn.Module = (
        HeadLogits(model, head) if ood is None else ScoredLogits(model, ood, head)
    ).eval()
    c, (h, w) = model.config.in_chans, model.config.image_hw
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(
            wrapper, (torch.randn(2, c, h, w),), dynamic_shapes={"pixel_values": {0: batch}}
        )
    converted = ov.convert_model(program)
    converted.reshape({0: ov.PartialShape([-1, c, h, w])})
    converted.inputs[0].get_tensor().set_names({"pixel_values"})
    converted.outputs[0].get_tensor().set_names({"logits"})
    if ood is not None:
        converted.outputs[1].get_tensor().set_names({OOD_OUTPUT})
    return converted


def ir_logits(
    model: Any, pixels: Tensor, precision: str = "fp32", batch_size: int = 64
) -> np.ndarray:
    """Logits of an IR (``ov.Model`` or path) on ``pixels``, compiled in ``precision``."""
    request = compile_model(model, precision, latency=False).create_infer_request()
    chunks = [
        np.array(request.infer({0: b.numpy()})[0], copy=True) for b in pixels.split(batch_size)
    ]
    return np.concatenate(chunks)


class OpenVinoModel(nn.Module):
    """An OpenVINO IR of ``deit export``/``deit quantize``, called like :class:`~deit.model.DeiT`.

    It returns a :class:`DeiTOutput` whose ``logits`` are the IR's (the head chosen at export);
    ``cls_logits`` repeats them and ``dist_logits`` is ``None``.
    """

    def __init__(
        self,
        source: str | Path | Any,
        config: DeiTConfig,
        precision: str = "fp32",
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.source = str(source) if isinstance(source, str | Path) else source
        self.config, self.precision, self.threads = config, precision, threads
        self.compiled = compile_model(self.source, precision, threads)
        self.request = self.compiled.create_infer_request()
        self.name = self.source if isinstance(self.source, str) else "the OpenVINO model"
        if not isinstance(self.source, str) and self.source.get_friendly_name().endswith(".xml"):
            self.name = self.source.get_friendly_name()  # read_ir names it after its file

    @classmethod
    def from_module(
        cls,
        model: DeiT,
        precision: str = "fp32",
        threads: int | None = None,
        ood: OODStats | None = None,
    ) -> OpenVinoModel:
        """``model`` (its averaged heads; with ``ood``, also the fitted score) converted in
        memory and compiled for this CPU."""
        return cls(convert_module(model, ood=ood), model.config, precision, threads)

    def with_precision(self, precision: str) -> OpenVinoModel:
        """The same network compiled for another precision (itself when it already is)."""
        if precision == self.precision:
            return self
        return OpenVinoModel(self.source, self.config, precision, self.threads)

    def run(self, pixel_values: Tensor) -> np.ndarray:
        """Logits (N, classes) as a NumPy array."""
        return np.array(self.infer(pixel_values)[0], copy=True)

    def infer(self, pixel_values: Tensor) -> Any:
        """The IR's outputs for ``pixel_values`` (N, C, H, W), its logits checked against the
        metadata's class count (:func:`deit.graph_limits.check_logits`)."""
        x = pixel_values.detach().to("cpu", torch.float32).numpy()
        try:
            result = self.request.infer({0: x})
        except RuntimeError as e:
            raise ExportError(
                f"OpenVINO cannot run {self.name}: {openvino_error_line(e)}"
            ) from None
        check_logits(self.name, result[0], len(x), self.config.num_classes)
        return result

    def forward(self, pixel_values: Tensor) -> DeiTOutput:
        logits = torch.from_numpy(self.run(pixel_values))
        return DeiTOutput(logits=logits, cls_logits=logits, dist_logits=None)

    def scored(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits and the IR's out-of-distribution score (None if it has no second output)."""
        result = self.infer(pixel_values)
        logits = torch.from_numpy(np.array(result[0], copy=True))
        if len(self.compiled.outputs) < 2:
            return logits, None
        return logits, torch.from_numpy(np.array(result[1], copy=True)).float().reshape(-1)


def set_openvino_metadata(model: Any, metadata: dict[str, str]) -> None:
    """Store ``metadata`` (string values) in an ``ov.Model``'s runtime info under ``deit``."""
    for key, value in metadata.items():
        model.set_rt_info(value, ["deit", key])


def read_openvino_metadata(path: str | Path) -> dict[str, str]:
    """The ``deit`` runtime info of an IR's ``.xml`` as ``deit.*`` keys, like an ONNX file's
    metadata ({} when there is none)."""
    path = Path(path)
    if not path.with_suffix(".bin").is_file():
        raise ExportError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing")
    meta = scan_ir_xml(path)  # read by a bounded parser; OpenVINO is not involved
    return {k: v for k, v in meta.items() if k.removeprefix("deit.") in METADATA_KEYS}


def load_openvino(
    path: str | Path, precision: str = "fp32", threads: int | None = None, *, engine: bool = True
) -> LoadedModel:
    """An IR with its labels and preprocessing, ready for a ``Classifier`` (``engine=False``:
    its metadata only, read without OpenVINO; the model is :func:`shapes_only`).

    Raises:
        ExportError: the file is missing, unreadable, or carries no ``deit`` runtime info.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"OpenVINO IR not found: {path}")
    ir, meta = read_ir(path) if engine else (None, read_openvino_metadata(path))
    config, preprocess, labels = exported_settings(meta, path, "`deit export --format openvino`")
    model = OpenVinoModel(ir, config, precision, threads) if engine else shapes_only(config)
    return LoadedModel(
        model=model,  # type: ignore[arg-type]
        config=config,
        preprocess=preprocess,
        labels=labels,
        source=str(path),
        format="openvino",
        metadata={k: v for k, v in meta.items() if k not in ("deit.labels", "deit.config")},
    )
