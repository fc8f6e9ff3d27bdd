"""Int8 ONNX models for the CPU, with an accuracy and speed report.

:func:`quantize_model` exports the fp32 ONNX graph (:func:`deit.deploy.export.export_onnx`, dynamic
batch; ONNX Runtime's fused graph of :mod:`deit.deploy.ort_graph` unless ``fused=False``), checks
it against eager PyTorch, then applies ONNX Runtime's dynamic quantization to the
``MatMul``/``Gemm`` weights and the fused ``Attention`` (int8 weights; activations quantized
per batch at run time, so no calibration data is needed). The report compares the int8
model with the fp32 one on real images: top-1 agreement, and with labelled data
(Fashion-MNIST, or an image folder whose sub-folders are class names) the top-1 accuracy of
both; plus batch-1 latency of both under ONNX Runtime (and eager PyTorch for reference) on
this machine's CPU.

Example:
    >>> report = quantize_model("fashion-mnist", "fmnist.int8.onnx", data="fashion-mnist:test")
    >>> report.agreement, report.fp32_top1, report.int8_top1
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deit.checkpoints import LoadedModel, as_loaded
from deit.deploy.export import (
    OUTPUT_NAME,
    add_onnx_metadata,
    compare_logits,
    cpu_eval,
    export_onnx,
    load_inputs,
    read_metadata,
    verify_export,
)
from deit.errors import UsageError
from deit.model import Head, HeadLogits
from deit.onnx_model import OnnxRunner
from deit.ood import OUTPUT_NAME as OOD_OUTPUT
from deit.runtime import quantize_int8, require
from deit.train.data import ImageFolder, match_class_folders
from deit.train.fashion_mnist import load_fashion_mnist
from deit.transforms import preprocess_image


@dataclass
class QuantReport:
    """What ``deit quantize`` measured. Accuracies are fractions; times are milliseconds."""

    path: str
    fp32_mb: float
    int8_mb: float
    data: str
    num_samples: int
    agreement: float
    max_abs_diff: float
    fp32_top1: float | None
    int8_top1: float | None
    fp32_ms: float | None
    int8_ms: float | None
    torch_ms: float | None
    # PyTorch's int8 path (``--precision int8`` of predict/serve) on the same images
    torch_int8_agreement: float
    torch_int8_top1: float | None
    torch_int8_ms: float | None
    threads: int
    per_channel: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _no_preprocess_hint() -> Iterator[None]:
    """Hide ONNX Runtime's root-logger hint to run its graph pre-processing first.

    The hint is about static quantization; for this graph it changes neither the outputs nor
    the speed of the dynamically quantized model (measured), so it would only be noise.
    """

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def score_only_nodes(model: Any) -> list[str]:
    """The nodes of an exported graph that feed its ``ood_score`` output and not its logits:
    the out-of-distribution score's own products, which stay float (int8 whitening matrices
    would wreck the distances). Empty for a graph without the score."""
    producers = {out: node for node in model.graph.node for out in node.output}

    def ancestors(output: str) -> set[str]:
        seen: set[str] = set()
        todo = [output]
        while todo:
            node = producers.get(todo.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.extend(node.input)
        return seen

    return sorted(ancestors(OOD_OUTPUT) - ancestors(OUTPUT_NAME))


def quantize_onnx(fp32_path: str | Path, out: str | Path, *, per_channel: bool = False) -> Path:
    """Dynamic int8 quantization of the ``MatMul``/``Gemm`` weights and of ONNX Runtime's fused
    ``Attention`` (its q/k/v projection; ``QAttention``), the out-of-distribution score's own
    nodes excepted (:func:`score_only_nodes`); keeps the ``deit.*`` metadata."""
    onnx = require("onnx", "onnx", "export")
    require("onnxruntime", "onnxruntime", "export")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _no_preprocess_hint():
        quantize_dynamic(
            str(fp32_path),
            str(out),
            op_types_to_quantize=["MatMul", "Gemm", "Attention"],
            nodes_to_exclude=score_only_nodes(onnx.load(str(fp32_path))),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            # Shape inference stops at contrib operators; what follows them is float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    meta = read_metadata(fp32_path)
    add_onnx_metadata(out, {**meta, "deit.quantization": "dynamic int8 (MatMul, Gemm, Attention)"})
    return out


def load_labelled(
    spec: str, loaded: LoadedModel, limit: int | None, root: str | Path | None = None
) -> tuple[Tensor, Tensor, str]:
    """Preprocessed images and labels of ``fashion-mnist[:test|train]`` or an image folder.

    Images go through the model's own preprocessing, as ``deit predict`` would apply it. An
    image folder's sub-folders are matched to the model's labels by name when they all are
    label names (``deit.train.data.match_class_folders``); otherwise their sorted order is taken as
    class indices. ``limit`` takes a seeded random sample of a folder's images (the first
    ``limit`` of Fashion-MNIST's, which are in no class order). Unreadable files are skipped.
    """
    from PIL import Image

    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1 (or None for all), not {limit}")
    cfg = loaded.preprocess
    if spec.split(":")[0] == "fashion-mnist":
        split = spec.partition(":")[2] or "test"
        images, labels = load_fashion_mnist(split, root)
        images, labels = images[:limit], labels[:limit]
        pixels = [preprocess_image(Image.fromarray(im[0].numpy(), "L"), cfg) for im in images]
        return torch.stack(pixels), labels, f"fashion-mnist:{split}"
    classes = match_class_folders(spec, loaded.labels)
    dataset = ImageFolder(spec, transform=lambda im: preprocess_image(im, cfg), classes=classes)
    order: Sequence[int] = range(len(dataset))
    if limit is not None and limit < len(dataset):  # a seeded sample of every class
        gen = torch.Generator().manual_seed(0)
        order = torch.randperm(len(dataset), generator=gen)[:limit].tolist()
    xs, ys = [], []
    for i in order:
        item = dataset[int(i)]
        if isinstance(item, tuple):
            xs.append(item[0])
            ys.append(item[1])
    if not xs:
        raise UsageError(f"no readable images in {spec}")
    if max(ys) >= loaded.config.num_classes:
        raise UsageError(f"{spec} has more classes than the model ({loaded.config.num_classes})")
    return torch.stack(xs), torch.tensor(ys), str(spec)


def onnx_logits(path: str | Path, pixels: Tensor, batch_size: int = 64) -> np.ndarray:
    """Logits of a dynamic-batch ONNX model on ``pixels`` (N, C, H, W)."""
    return OnnxRunner(path)(pixels, batch_size)


def time_batch1(
    paths: dict[str, str | Path],
    sample: Tensor,
    *,
    runs: int = 100,
    threads: int | None = None,
    torch_models: dict[str, torch.nn.Module] | None = None,
) -> dict[str, float]:
    """Median batch-1 latency (ms) of ONNX files (and PyTorch models), runs interleaved.

    Interleaving spreads any background load on a shared machine over all candidates alike.
    """
    runners = {k: OnnxRunner(p, threads) for k, p in paths.items()}
    x = sample[:1].contiguous()
    feeds = {k: r.feed(x) for k, r in runners.items()}
    calls: dict[str, Any] = {
        k: (lambda s=r.session, f=feeds[k]: s.run(None, f)) for k, r in runners.items()
    }
    for k, m in (torch_models or {}).items():
        calls[k] = lambda m=m: m(x)
    return interleaved_median_ms(calls, runs, threads)


def interleaved_median_ms(
    calls: dict[str, Callable[[], object]], runs: int, threads: int | None = None
) -> dict[str, float]:
    """Median latency (ms) of each call over ``runs`` rounds after 5 warm-up rounds, the calls
    taking turns within each round (PyTorch on ``threads`` threads meanwhile)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for i in range(runs + 5):
                for k, call in calls.items():
                    t = time.perf_counter()
                    call()
                    if i >= 5:
                        times[k].append(1000 * (time.perf_counter() - t))
    finally:
        torch.set_num_threads(old_threads)
    return {k: statistics.median(v) for k, v in times.items()}


def quantize_model(
    model_or_loaded: LoadedModel | Any,
    out: str | Path,
    *,
    data: str | None = None,
    data_root: str | Path | None = None,
    limit: int | None = 1000,
    head: Head = "avg",
    per_channel: bool = False,
    bench_runs: int = 100,
    threads: int | None = None,
    keep_fp32: str | Path | None = None,
    fused: bool = True,
) -> QuantReport:
    """Export, quantize to int8 and report agreement, accuracy and speed against fp32.

    Args:
        model_or_loaded: A :class:`LoadedModel`, ``Classifier``, ``DeiT`` or checkpoint source.
        out: The int8 ``.onnx`` file to write.
        data: ``fashion-mnist[:test|train]`` or an image folder (labelled: accuracies are
            reported); ``None`` compares on the package's sample images only.
        data_root: Folder of the Fashion-MNIST IDX files (default: Debian's).
        limit: Use at most this many images of ``data`` (``None``: all).
        head: Which logits the model returns (``avg``, ``cls``, ``dist``).
        per_channel: Per-output-channel weight scales (sometimes more accurate).
        bench_runs: Batch-1 timing runs per model (0 skips timing).
        threads: ONNX Runtime / PyTorch intra-op threads for timing (default: all cores).
        keep_fp32: Also keep the fp32 ONNX model at this path.
        fused: Quantize ONNX Runtime's fused graph (:mod:`deit.deploy.ort_graph`; faster, runs in
            ONNX Runtime only); ``False``: the portable export.
    """
    loaded = as_loaded(model_or_loaded)
    # Read the comparison data first: a bad --data fails before any file is written.
    if data:
        pixels, labels, name = load_labelled(data, loaded, limit, data_root)
    else:
        pixels, _ = load_inputs(loaded)
        labels, name = None, "package sample images"
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(keep_fp32) if keep_fp32 else Path(tmp) / "fp32.onnx"
        export_onnx(loaded, fp32, head=head, dynamic_batch=True, fused=fused)
        verify_export(fp32, loaded)
        int8 = quantize_onnx(fp32, out, per_channel=per_channel)
        ref, got = onnx_logits(fp32, pixels), onnx_logits(int8, pixels)
        diff, agree = compare_logits(ref, got)
        eager = HeadLogits(cpu_eval(loaded.model), head)
        eager_int8 = quantize_int8(eager)
        with torch.inference_mode():
            got_torch = torch.cat([eager_int8(b) for b in pixels.split(64)]).numpy()
        _, agree_torch = compare_logits(ref, got_torch)
        top1 = (
            (lambda z: float((z.argmax(-1) == labels.numpy()).mean()))
            if labels is not None
            else None
        )
        n_threads = threads or os.cpu_count() or 1
        times: dict[str, float] = {}
        if bench_runs > 0:
            times = time_batch1(
                {"fp32": fp32, "int8": int8},
                pixels,
                runs=bench_runs,
                threads=n_threads,
                torch_models={"torch": eager, "torch_int8": eager_int8},
            )
        return QuantReport(
            path=str(int8),
            fp32_mb=fp32.stat().st_size / 1e6,
            int8_mb=int8.stat().st_size / 1e6,
            data=name,
            num_samples=len(pixels),
            agreement=agree,
            max_abs_diff=diff,
            fp32_top1=top1(ref) if top1 else None,
            int8_top1=top1(got) if top1 else None,
            fp32_ms=times.get("fp32"),
            int8_ms=times.get("int8"),
            torch_ms=times.get("torch"),
            torch_int8_agreement=agree_torch,
            torch_int8_top1=top1(got_torch) if top1 else None,
            torch_int8_ms=times.get("torch_int8"),
            threads=n_threads,
            per_channel=per_channel,
        )


# --------------------------------------------------------------------------- CLI


def pct(value: float | None) -> str:
    """A fraction as a percentage for the reports, ``n/a`` when not measured."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


def ms(value: float | None) -> str:
    """Milliseconds for the reports, ``n/a`` when not measured."""
    return "n/a" if value is None else f"{value:.2f} ms"


def format_quant_report(r: QuantReport) -> str:
    lines = [
        f"wrote {r.path}: {r.int8_mb:.1f} MB int8 (fp32 {r.fp32_mb:.1f} MB)",
        f"on {r.data}, {r.num_samples} images: top-1 agreement int8 vs fp32 {pct(r.agreement)}, "
        f"max abs logit diff {r.max_abs_diff:.3g}",
        f"top-1 accuracy: fp32 {pct(r.fp32_top1)}, int8 {pct(r.int8_top1)}",
        f"batch-1 latency, median, {r.threads} threads: ONNX Runtime fp32 {ms(r.fp32_ms)}, "
        f"int8 {ms(r.int8_ms)}; eager PyTorch fp32 {ms(r.torch_ms)}",
    ]
    if r.fp32_ms and r.int8_ms:
        lines[-1] += f" (int8 speed-up {r.fp32_ms / r.int8_ms:.2f}x)"
    lines.append(
        f"PyTorch int8 (--precision int8): agreement {pct(r.torch_int8_agreement)}, "
        f"top-1 {pct(r.torch_int8_top1)}, batch-1 {ms(r.torch_int8_ms)}"
    )
    if r.torch_ms and r.torch_int8_ms:
        lines[-1] += f" (speed-up over eager fp32 {r.torch_ms / r.torch_int8_ms:.2f}x)"
    return "\n".join(lines)
