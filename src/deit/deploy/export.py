"""Export a DeiT classifier to ONNX or ``torch.export`` and check the result on real images.

Both exporters trace a small wrapper, :class:`HeadLogits`, that returns one logits tensor for
the chosen head: ``avg`` (the mean of the class and distillation heads, what inference uses),
``cls`` or ``dist``. The exported file carries the model's labels, preprocessing, config and
head as metadata (ONNX ``metadata_props``; an extra file ``deit.json`` in a ``.pt2`` archive),
so it can be used without the original checkpoint.

ONNX goes through PyTorch's ``torch.export``-based exporter (``torch.onnx.export(...,
dynamo=True)``, which needs ``onnxscript``): it is the default since PyTorch 2.9, while the
TorchScript-based exporter warns that it is deprecated and will be removed. The fused
``scaled_dot_product_attention`` exports as plain ``MatMul``/``Softmax`` nodes, so the model
needs no special export path. The exporter's native opset is 18; lower opsets are reached by
ONNX's version converter. ``fused=True`` (``deit export --ort-fused``) writes instead the
graph of :mod:`deit.deploy.ort_graph`, built node by node around ONNX Runtime's fused ``Attention``:
faster there, and runnable in ONNX Runtime only.

:func:`verify_export` runs the exported file (ONNX Runtime, or ``torch.export.load``) on real
images preprocessed with the model's own :class:`~deit.transforms.PreprocessConfig` and compares
the logits with eager PyTorch.

Example:
    >>> from deit.deploy.export import export_onnx, verify_export
    >>> loaded = load_model("fashion-mnist")
    >>> path = export_onnx(loaded, "fmnist.onnx", dynamic_batch=True)
    >>> verify_export(path, loaded).max_abs_diff < 1e-4
    True
"""

from __future__ import annotations

import copy
import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from deit.checkpoints import LoadedModel, as_loaded
from deit.deploy.ort_graph import OPSET as ORT_OPSET
from deit.deploy.ort_graph import build_ort_graph
from deit.errors import CheckpointError, ExportError, ImageLoadError, UnsafeFileError
from deit.images import ImageLike
from deit.model import DeiT, Head, HeadLogits
from deit.onnx_model import OnnxRunner, read_onnx_metadata
from deit.ood import METADATA_KEY as OOD_METADATA
from deit.ood import OUTPUT_NAME as OOD_OUTPUT
from deit.ood import OODStats, ScoredLogits
from deit.ood_file import find_stats
from deit.openvino_model import ir_logits, read_openvino_metadata
from deit.runtime import atomic_path, ensure_free_space, require, tensor_bytes
from deit.safety import check_pt2, load_exported_module
from deit.transforms import preprocess

ExportFormat = Literal["onnx", "torch-export"]
BACKENDS = {".onnx": "onnxruntime", ".pt2": "torch.export", ".xml": "openvino"}
DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization
SAMPLES_DIR = Path(__file__).parent / "serve" / "web" / "samples"  # also the web page's
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


def sample_images() -> list[Path]:
    """The small photos and Fashion-MNIST images shipped with the package (web page demo)."""
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix in (".jpg", ".png"))


def cpu_eval(model: DeiT) -> DeiT:
    """The model in eval mode on the CPU (a copy if it lives elsewhere)."""
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    return model.eval()


def _example(loaded: LoadedModel, batch: int) -> Tensor:
    h, w = loaded.config.image_hw
    return torch.randn(batch, loaded.config.in_chans, h, w)


def export_metadata(
    loaded: LoadedModel, head: Head, dynamic_batch: bool, ood: OODStats | None = None
) -> dict[str, str]:
    """String key/values stored in exported files (labels, preprocessing, config, head; with
    ``ood``, the out-of-distribution score's method and threshold: the graph then computes
    the score as its second output, ``ood_score``)."""
    meta = {
        "deit.head": head,
        "deit.dynamic_batch": json.dumps(dynamic_batch),
        "deit.labels": json.dumps(loaded.labels, ensure_ascii=False),
        "deit.preprocess": json.dumps(loaded.preprocess.to_dict()),
        "deit.config": json.dumps(loaded.config.to_dict()),
        "deit.source": loaded.source,
    }
    if ood is not None:
        meta[OOD_METADATA] = json.dumps(ood.describe())
    return meta


def add_onnx_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Set ``metadata_props`` of an ONNX file in place (weights stay in the file)."""
    onnx = require("onnx", "onnx", "export")
    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``deit.*`` metadata of an exported ``.onnx``, ``.pt2`` or OpenVINO ``.xml`` file
    ({} if none)."""
    path = Path(path)
    if path.suffix == ".xml":
        return read_openvino_metadata(path)
    if path.suffix != ".pt2":
        return read_onnx_metadata(path)
    _check_pt2(path)
    with zipfile.ZipFile(path) as z:  # the extra file, read without loading the program
        entry = next((n for n in z.namelist() if n.partition("/")[2] == "extra/deit.json"), None)
        text = z.read(entry).decode("utf-8", "replace") if entry else ""
    try:
        meta = json.loads(text or "{}")
    except ValueError as e:
        raise ExportError(f"{path}: malformed deit metadata (extra/deit.json): {e}") from e
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: malformed deit metadata (extra/deit.json is not an object)")
    return meta


def _check_pt2(path: Path) -> None:
    """Refuse a ``.pt2`` that loading would run code from (:func:`deit.safety.check_pt2`)."""
    try:
        check_pt2(path)
    except UnsafeFileError:
        raise
    except CheckpointError as e:  # a zip that isn't one, or another program's archive
        raise ExportError(str(e)) from e


def _prepare(
    model_or_loaded: LoadedModel | DeiT | Any, out: str | Path, head: Head, dynamic_batch: bool
) -> tuple[LoadedModel, HeadLogits, Path, Tensor, dict[str, Any] | None]:
    """What both exporters need: the model, its head wrapper, the output path, an example
    input and the dynamic-shape spec (a symbolic batch dimension, or none)."""
    loaded = as_loaded(model_or_loaded)
    wrapper = HeadLogits(cpu_eval(loaded.model), head).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = _example(loaded, 2 if dynamic_batch else 1)
    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    return loaded, wrapper, out, example, dynamic


def _scored(wrapper: HeadLogits, ood: OODStats | None) -> torch.nn.Module:
    """The module to trace: the head's logits, and the fitted score when there is one."""
    if ood is None:
        return wrapper
    return ScoredLogits(wrapper.model, ood, wrapper.head).eval()


def export_onnx(
    model_or_loaded: LoadedModel | DeiT | Any,
    out: str | Path,
    *,
    head: Head = "avg",
    dynamic_batch: bool = False,
    opset: int | None = None,
    fused: bool = False,
    with_ood: bool = True,
) -> Path:
    """Write an ONNX model (one file, weights inside) with input ``pixel_values``.

    Args:
        model_or_loaded: A :class:`LoadedModel`, ``Classifier``, ``DeiT`` or a checkpoint source.
        out: The ``.onnx`` file to write.
        head: Which logits the graph returns: ``avg``, ``cls`` or ``dist``.
        dynamic_batch: A symbolic batch dimension; otherwise the batch size is fixed to 1.
        opset: ONNX opset (default 18, the exporter's own; lower ones go through a converter;
            the fused graph is opset 20).
        fused: Write the graph for ONNX Runtime with its fused ``Attention`` operator
            (:mod:`deit.deploy.ort_graph`): faster there, but it runs in ONNX Runtime only.
        with_ood: when the model folder holds fitted statistics (``ood.safetensors``), add
            the score as a second output, ``ood_score`` (logits stay the first).

    Returns:
        The written path.

    Raises:
        ExportError: The exporter failed, or the opset is not possible.
        ImportError: ``onnx`` or ``onnxscript`` is missing.
        DiskFullError: The file does not fit on its disk (nothing is left behind).
    """
    onnx = require("onnx", "onnx", "export")
    if fused:
        if opset not in (None, ORT_OPSET):
            raise ExportError(f"the fused ONNX Runtime graph is opset {ORT_OPSET}, not {opset}")
        loaded, wrapper, out, _, _ = _prepare(model_or_loaded, out, head, dynamic_batch)
        ood = find_stats(loaded) if with_ood else None
        graph = build_ort_graph(wrapper.model, head, dynamic_batch, ood)
        ensure_free_space(out, tensor_bytes(wrapper) * 21 // 20)  # weights + graph
        with atomic_path(out, suffix=".onnx") as tmp:  # a failed write leaves nothing
            onnx.save(graph, str(tmp))
            meta = export_metadata(loaded, head, dynamic_batch, ood)
            add_onnx_metadata(tmp, {**meta, "deit.graph": "onnxruntime"})
        return out
    opset = DEFAULT_OPSET if opset is None else opset
    require("onnxscript", "onnxscript", "export")
    if opset < MIN_OPSET:
        raise ExportError(
            f"DeiT's ONNX graph needs opset {MIN_OPSET} or later (LayerNormalization), not {opset}"
        )
    loaded, wrapper, out, example, dynamic = _prepare(model_or_loaded, out, head, dynamic_batch)
    ood = find_stats(loaded) if with_ood else None
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                _scored(wrapper, ood),
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME] + ([OOD_OUTPUT] if ood is not None else []),
                dynamic_shapes=dynamic,
                external_data=False,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many error types
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    ensure_free_space(out, tensor_bytes(wrapper) * 21 // 20)  # weights + graph
    # Written to a temporary sibling, renamed into place once complete and checked: a full
    # disk or a failed check leaves nothing (not a truncated .onnx).
    with atomic_path(out, suffix=".onnx") as tmp:
        program.save(str(tmp), external_data=False)  # type: ignore[union-attr]
        # The exporter falls back to its own opset when a down-conversion fails: never pass
        # that off.
        written = {o.domain: o.version for o in onnx.load(str(tmp)).opset_import}.get("", opset)
        if written != opset:
            raise ExportError(
                f"the exporter could not convert to opset {opset} (it wrote {written})"
            )
        add_onnx_metadata(tmp, export_metadata(loaded, head, dynamic_batch, ood))
    return out


def export_torch(
    model_or_loaded: LoadedModel | DeiT | Any,
    out: str | Path,
    *,
    head: Head = "avg",
    dynamic_batch: bool = False,
) -> Path:
    """Write a ``torch.export`` program (``.pt2``, via ``torch.export.save``).

    Load it with ``torch.export.load(path).module()``; the metadata is the extra file
    ``deit.json`` (see :func:`read_metadata`).

    Raises:
        ExportError: ``torch.export`` failed.
        DiskFullError: The file would not fit on its disk (checked before writing, as
            PyTorch's writer aborts the process on a full disk); nothing is left behind.
    """
    loaded, wrapper, out, example, dynamic = _prepare(model_or_loaded, out, head, dynamic_batch)
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic)
    except Exception as e:
        raise ExportError(f"torch.export failed: {type(e).__name__}: {e}") from e
    meta = json.dumps(export_metadata(loaded, head, dynamic_batch))
    # PyTorch's zip writer aborts the whole process (std::terminate) when the disk fills
    # up, so a file that will not fit is refused before anything is written.
    ensure_free_space(out, tensor_bytes(wrapper) * 21 // 20 + len(meta))  # + graph
    with atomic_path(out, suffix=".pt2") as tmp:
        torch.export.save(program, str(tmp), extra_files={"deit.json": meta})
    return out


@dataclass
class VerifyReport:
    """Exported vs eager logits on the same preprocessed images."""

    path: str
    backend: str
    head: str
    num_images: int
    batch_size: int
    max_abs_diff: float
    top1_agreement: float
    tolerance: float
    passed: bool
    images: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_inputs(
    loaded: LoadedModel, images: Sequence[ImageLike] | None = None
) -> tuple[Tensor, list[str]]:
    """Preprocessed batch of ``images`` (default: the package's samples) and their names."""
    items: Sequence[ImageLike] = images if images else sample_images()
    names = [str(x) if isinstance(x, (str, Path)) else f"<{type(x).__name__}>" for x in items]
    pixels = []
    for item, name in zip(items, names, strict=True):
        try:
            pixels.append(preprocess(item, loaded.preprocess))
        except ImageLoadError as e:
            raise ImageLoadError(f"{name}: {e}") from e
    return torch.cat(pixels), names


def run_exported(path: str | Path, pixel_values: Tensor, *, dynamic_batch: bool) -> np.ndarray:
    """Logits of an exported ``.onnx``/``.pt2``/``.xml`` file; a fixed-batch file runs image by
    image."""
    path = Path(path)
    if path.suffix == ".xml":
        return ir_logits(path, pixel_values)
    if path.suffix == ".pt2":
        _check_pt2(path)
        module = load_exported_module(path, hint="")  # checked: loading runs no code
        batches = pixel_values.split(len(pixel_values) if dynamic_batch else 1)
        with torch.no_grad():
            return torch.cat([module(b) for b in batches]).numpy()
    return OnnxRunner(path, fixed_batch=not dynamic_batch)(pixel_values)


def compare_logits(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(max abs difference, fraction of rows whose argmax agrees)."""
    diff = float(np.abs(reference - other).max()) if reference.size else 0.0
    agree = float((reference.argmax(-1) == other.argmax(-1)).mean()) if len(reference) else 1.0
    return diff, agree


def verify_export(
    path: str | Path,
    loaded: LoadedModel | DeiT | Any,
    images: Sequence[ImageLike] | None = None,
    *,
    head: Head | None = None,
    tolerance: float = 1e-4,
    raise_on_failure: bool = True,
) -> VerifyReport:
    """Run an exported model and eager PyTorch on the same real images and compare.

    Args:
        path: An ``.onnx`` (ONNX Runtime, CPU) or ``.pt2`` (``torch.export.load``) file.
        loaded: The model it was exported from.
        images: Image paths/objects; default the package's sample photos.
        head: The exported head; default what the file's metadata says.
        tolerance: Largest allowed absolute logit difference (1e-4 suits fp32).
        raise_on_failure: Raise :class:`ExportError` when the difference exceeds ``tolerance``.

    Returns:
        The report (maximum absolute difference, top-1 agreement, ...).
    """
    loaded = as_loaded(loaded)
    meta = read_metadata(path)
    head = head or meta.get("deit.head", "avg")  # type: ignore[assignment]
    dynamic = json.loads(meta.get("deit.dynamic_batch", "false"))
    pixels, names = load_inputs(loaded, images)
    with torch.no_grad():
        reference = HeadLogits(cpu_eval(loaded.model), head)(pixels).numpy()  # type: ignore[arg-type]
    got = run_exported(path, pixels, dynamic_batch=dynamic)
    diff, agree = compare_logits(reference, got)
    report = VerifyReport(
        path=str(path),
        backend=BACKENDS.get(Path(path).suffix, "onnxruntime"),
        head=str(head),
        num_images=len(pixels),
        batch_size=len(pixels) if dynamic else 1,
        max_abs_diff=diff,
        top1_agreement=agree,
        tolerance=tolerance,
        passed=diff <= tolerance,
        images=names,
    )
    if raise_on_failure and not report.passed:
        raise ExportError(
            f"{path}: max abs logit difference {diff:.3g} exceeds tolerance {tolerance:g} "
            f"(top-1 agreement {agree:.1%})"
        )
    return report


# --------------------------------------------------------------------------- CLI


def format_report(report: VerifyReport) -> str:
    status = "OK" if report.passed else "FAILED"
    return (
        f"{status}: {report.backend} vs eager PyTorch, head {report.head}, "
        f"{report.num_images} images (batch {report.batch_size}): max abs logit diff "
        f"{report.max_abs_diff:.3g} (tolerance {report.tolerance:g}), "
        f"top-1 agreement {report.top1_agreement:.1%}"
    )
