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
graph of :mod:`deit.ort_graph`, built node by node around ONNX Runtime's fused ``Attention``:
faster there, and runnable in ONNX Runtime only.

:func:`verify_export` runs the exported file (ONNX Runtime, or ``torch.export.load``) on real
images preprocessed with the model's own :class:`~deit.transforms.PreprocessConfig` and compares
the logits with eager PyTorch.

Example:
    >>> from deit.export import export_onnx, verify_export
    >>> loaded = load_model("fashion-mnist")
    >>> path = export_onnx(loaded, "fmnist.onnx", dynamic_batch=True)
    >>> verify_export(path, loaded).max_abs_diff < 1e-4
    True
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from deit.checkpoints import LoadedModel, load_model
from deit.config import DeiTConfig
from deit.inference import expand_paths
from deit.model import DeiT, DeiTOutput
from deit.ort_graph import OPSET as ORT_OPSET
from deit.ort_graph import build_ort_graph
from deit.transforms import ImageLike, ImageLoadError, PreprocessConfig, preprocess

Head = Literal["avg", "cls", "dist"]
HEADS: tuple[Head, ...] = ("avg", "cls", "dist")
ExportFormat = Literal["onnx", "torch-export"]
DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization
SAMPLES_DIR = Path(__file__).parent / "web" / "samples"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


class ExportError(ValueError):
    """An export that failed, or whose outputs differ from eager PyTorch."""


def require(module: str, package: str, extra: str) -> Any:
    """Import an optional dependency, or raise an ``ImportError`` saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for this: pip install {package} (or pip install 'deit[{extra}]')"
        ) from e


def sample_images() -> list[Path]:
    """The small photos and Fashion-MNIST images shipped with the package (web page demo)."""
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix in (".jpg", ".png"))


def as_loaded(model: LoadedModel | DeiT | Any, device: str | torch.device = "cpu") -> LoadedModel:
    """A :class:`LoadedModel` from a loaded model, a ``Classifier``, a bare ``DeiT`` or a source.

    A bare ``DeiT`` gets numbered labels and a preprocessing that squashes images to the
    model's input size (ImageNet mean/std for RGB, 0.5/0.5 for one channel).
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(getattr(model, "loaded", None), LoadedModel):  # deit.inference.Classifier
        return model.loaded
    if isinstance(model, DeiT):
        cfg = model.config
        one = cfg.in_chans == 1
        pre = PreprocessConfig(
            resize_mode="squash",
            resize_size=cfg.image_hw,
            crop_size=None,
            channels=cfg.in_chans,
            mean=(0.5,) if one else PreprocessConfig().mean,
            std=(0.5,) if one else PreprocessConfig().std,
            source="default for a bare model",
        )
        labels = [f"class {i}" for i in range(cfg.num_classes)]
        return LoadedModel(model, cfg, pre, labels, "<in-memory model>", "deit")
    if isinstance(model, (str, Path)):
        return load_model(model, device=device)
    raise TypeError(f"expected a LoadedModel, Classifier, DeiT or a source, not {type(model)}")


class HeadLogits(nn.Module):
    """Wraps a DeiT so that it returns one logits tensor (B, classes) for the chosen head."""

    def __init__(self, model: DeiT, head: Head = "avg") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
        if head == "dist" and model.head_dist is None:
            raise ValueError("head 'dist' needs a distilled model with a distillation head")
        self.model = model
        self.head = head

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.model(pixel_values)
        if self.head == "cls":
            return out.cls_logits
        if self.head == "dist":
            return out.dist_logits  # type: ignore[return-value]
        return out.logits


def cpu_eval(model: DeiT) -> DeiT:
    """The model in eval mode on the CPU (a copy if it lives elsewhere)."""
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    return model.eval()


def _example(loaded: LoadedModel, batch: int) -> Tensor:
    h, w = loaded.config.image_hw
    return torch.randn(batch, loaded.config.in_chans, h, w)


def export_metadata(loaded: LoadedModel, head: Head, dynamic_batch: bool) -> dict[str, str]:
    """String key/values stored in exported files (labels, preprocessing, config, head)."""
    return {
        "deit.head": head,
        "deit.dynamic_batch": json.dumps(dynamic_batch),
        "deit.labels": json.dumps(loaded.labels, ensure_ascii=False),
        "deit.preprocess": json.dumps(loaded.preprocess.to_dict()),
        "deit.config": json.dumps(loaded.config.to_dict()),
        "deit.source": loaded.source,
    }


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
    """The ``deit.*`` metadata of an exported ``.onnx`` or ``.pt2`` file ({} if none)."""
    path = Path(path)
    if path.suffix == ".pt2":
        extra = {"deit.json": ""}
        try:
            torch.export.load(str(path), extra_files=extra)
        except Exception as e:  # a zip that isn't one, or another program's archive
            raise ExportError(f"cannot read {path}: not a torch.export file ({e})") from e
        return json.loads(extra["deit.json"] or "{}")
    onnx = require("onnx", "onnx", "export")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ExportError(f"cannot read {path}: not an ONNX model ({type(e).__name__})") from e
    return {p.key: p.value for p in proto.metadata_props if p.key.startswith("deit.")}


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


def export_onnx(
    model_or_loaded: LoadedModel | DeiT | Any,
    out: str | Path,
    *,
    head: Head = "avg",
    dynamic_batch: bool = False,
    opset: int | None = None,
    fused: bool = False,
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
            (:mod:`deit.ort_graph`): faster there, but it runs in ONNX Runtime only.

    Returns:
        The written path.

    Raises:
        ExportError: The exporter failed, or the opset is not possible.
        ImportError: ``onnx`` or ``onnxscript`` is missing.
    """
    onnx = require("onnx", "onnx", "export")
    if fused:
        if opset not in (None, ORT_OPSET):
            raise ExportError(f"the fused ONNX Runtime graph is opset {ORT_OPSET}, not {opset}")
        loaded, wrapper, out, _, _ = _prepare(model_or_loaded, out, head, dynamic_batch)
        onnx.save(build_ort_graph(wrapper.model, head, dynamic_batch), str(out))
        add_onnx_metadata(
            out, {**export_metadata(loaded, head, dynamic_batch), "deit.graph": "onnxruntime"}
        )
        return out
    opset = DEFAULT_OPSET if opset is None else opset
    require("onnxscript", "onnxscript", "export")
    if opset < MIN_OPSET:
        raise ExportError(
            f"DeiT's ONNX graph needs opset {MIN_OPSET} or later (LayerNormalization), not {opset}"
        )
    loaded, wrapper, out, example, dynamic = _prepare(model_or_loaded, out, head, dynamic_batch)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic,
                external_data=False,
                verbose=False,
            )
            program.save(str(out), external_data=False)  # type: ignore[union-attr]
    except Exception as e:  # the exporter raises many error types
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    # The exporter falls back to its own opset when a down-conversion fails: never pass that off.
    written = {o.domain: o.version for o in onnx.load(str(out)).opset_import}.get("", opset)
    if written != opset:
        out.unlink()
        raise ExportError(f"the exporter could not convert to opset {opset} (it wrote {written})")
    add_onnx_metadata(out, export_metadata(loaded, head, dynamic_batch))
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
    """
    loaded, wrapper, out, example, dynamic = _prepare(model_or_loaded, out, head, dynamic_batch)
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic)
    except Exception as e:
        raise ExportError(f"torch.export failed: {type(e).__name__}: {e}") from e
    meta = json.dumps(export_metadata(loaded, head, dynamic_batch))
    torch.export.save(program, str(out), extra_files={"deit.json": meta})
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


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session (``threads``: intra-op threads, default ORT's)."""
    ort = require("onnxruntime", "onnxruntime", "export")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """An ``.onnx`` file of ``deit export``/``deit quantize``, run by ONNX Runtime on the CPU.

    Called like :class:`DeiT` for inference: it returns a :class:`DeiTOutput` whose
    ``logits`` are the file's (the head chosen at export); the per-head logits are not in
    the file, so ``cls_logits`` repeats ``logits`` and ``dist_logits`` is ``None``.
    """

    def __init__(
        self, path: str | Path, config: DeiTConfig, dynamic_batch: bool, threads: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.path = str(path)
        self.dynamic_batch = dynamic_batch
        self.session = onnx_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, pixel_values: Tensor) -> DeiTOutput:
        x = pixel_values.detach().to("cpu", torch.float32)
        batches = [x] if self.dynamic_batch else list(x.split(1))
        logits = torch.from_numpy(
            np.concatenate(
                [self.session.run(None, {self.input_name: b.numpy()})[0] for b in batches]
            )
        )
        return DeiTOutput(logits=logits, cls_logits=logits, dist_logits=None)


def load_onnx(path: str | Path, threads: int | None = None) -> LoadedModel:
    """An exported ``.onnx`` file with its labels and preprocessing, ready for a ``Classifier``.

    Raises:
        ExportError: The file is missing or carries no ``deit.*`` metadata (not ours).
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    meta = read_metadata(path)
    if not {"deit.config", "deit.labels", "deit.preprocess"} <= set(meta):
        raise ExportError(
            f"{path} has no deit metadata: export it with `deit export` or "
            "`deit quantize` to run it with labels and preprocessing"
        )
    config = DeiTConfig.from_dict(json.loads(meta["deit.config"]))
    dynamic = json.loads(meta.get("deit.dynamic_batch", "false"))
    return LoadedModel(
        model=OnnxModel(path, config, dynamic, threads),  # type: ignore[arg-type]
        config=config,
        preprocess=PreprocessConfig.from_dict(json.loads(meta["deit.preprocess"])),
        labels=json.loads(meta["deit.labels"]),
        source=str(path),
        format="onnx",
        metadata={k: v for k, v in meta.items() if k not in ("deit.labels", "deit.config")},
    )


def run_exported(path: str | Path, pixel_values: Tensor, *, dynamic_batch: bool) -> np.ndarray:
    """Logits of an exported ``.onnx``/``.pt2`` file; a fixed-batch file runs image by image."""
    path = Path(path)
    batches = [pixel_values] if dynamic_batch else list(pixel_values.split(1))
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
        with torch.no_grad():
            return torch.cat([module(b) for b in batches]).numpy()
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: b.numpy()})[0] for b in batches])


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
        backend="torch.export" if Path(path).suffix == ".pt2" else "onnxruntime",
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


def run_export_command(args: argparse.Namespace) -> int:
    """``deit export``: write the file, verify it, print the report (exit 1 if it differs)."""
    suffix = {"onnx": ".onnx", "torch-export": ".pt2"}[args.format]
    if Path(args.out).suffix != suffix:
        print(
            f"deit export: error: --format {args.format} writes a {suffix} file, not {args.out!r}",
            file=sys.stderr,
        )
        return 2
    images = expand_paths(args.images) if args.images else None
    try:
        loaded = load_model(
            args.model, revision=args.revision, preprocess=args.preprocess, labels=args.labels
        )
        if images is not None:
            load_inputs(loaded, images)  # a bad image fails now, before anything is written
        if args.format == "onnx":
            path = export_onnx(
                loaded,
                args.out,
                head=args.head,
                dynamic_batch=args.dynamic_batch,
                opset=args.opset,
                fused=args.ort_fused,
            )
        else:
            path = export_torch(loaded, args.out, head=args.head, dynamic_batch=args.dynamic_batch)
        report = verify_export(
            path, loaded, images, tolerance=args.tolerance, raise_on_failure=False
        )
    except (ImportError, ExportError) as e:
        print(f"deit export: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        print(format_report(report))
    return 0 if report.passed else 1


EXPORT_HELP = "export to ONNX or torch.export and verify on real images"


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``deit export``."""
    from deit.cli import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("out", help="output file (.onnx or .pt2)")
    parser.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    parser.add_argument(
        "--head", choices=HEADS, default="avg", help="logits to export (default avg)"
    )
    parser.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension")
    parser.add_argument(
        "--opset",
        type=int,
        help=f"ONNX opset (default {DEFAULT_OPSET}; {ORT_OPSET} with --ort-fused)",
    )
    parser.add_argument(
        "--ort-fused",
        action="store_true",
        help="ONNX Runtime's fused Attention operator: faster on its CPU provider, "
        "runs in ONNX Runtime only",
    )
    parser.add_argument(
        "--images", nargs="+", help="images, folders or globs to verify on (default: samples)"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def register_export(sub: argparse._SubParsersAction) -> None:
    """Add ``deit export`` to the CLI's subparsers."""
    parser = sub.add_parser("export", help=EXPORT_HELP)
    add_export_arguments(parser)
    parser.set_defaults(func=run_export_command)
