"""OpenVINO, the CPU engine: IR export, NNCF int8 quantization, and their measured report.

``export_openvino`` converts the model (through :class:`~deit.deploy.export.HeadLogits`, so
the IR returns one logits tensor) with ``openvino.convert_model``, stores the labels,
preprocessing and config in the IR's runtime info, and writes ``model.xml`` + ``model.bin``
(weights kept in fp32). ``quantize_openvino`` runs NNCF's post-training quantization
(``model_type=TRANSFORMER``: attention's matrix products in int8, the numerically sensitive
parts left in float) on calibration images drawn from ``--data``, then measures agreement,
accuracy and batch-1 latency against the fp32 IR and eager PyTorch, as ``deit quantize``
does for ONNX Runtime. Reading the files back is :mod:`deit.openvino_model` (core).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from deit.checkpoints import LoadedModel, as_loaded
from deit.deploy.export import (
    compare_logits,
    cpu_eval,
    export_metadata,
    load_inputs,
)
from deit.deploy.quantize import interleaved_median_ms, load_labelled, ms, pct
from deit.errors import UsageError
from deit.model import Head, HeadLogits
from deit.ood_file import find_stats
from deit.openvino_model import (
    bf16_supported,
    compile_model,
    convert_module,
    ir_logits,
    openvino,
    set_openvino_metadata,
)
from deit.runtime import require


def _metadata(loaded: LoadedModel, head: Head) -> dict[str, str]:
    """The export metadata, keyed without the ``deit.`` prefix (it is the rt_info section)."""
    meta = export_metadata(loaded, head, dynamic_batch=True, ood=find_stats(loaded))
    return {k.removeprefix("deit."): v for k, v in meta.items()}


def _save_ir(model: Any, out: Path) -> Path:
    """Write ``out`` (``.xml``) and its ``.bin`` so that both appear together or not at all."""
    ov = openvino()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        tmp_xml = Path(tmp) / out.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(tmp_xml, out)
    return out


def convert_to_openvino(loaded: LoadedModel, head: Head = "avg") -> Any:
    """An ``ov.Model`` of ``loaded`` (logits, dynamic batch; when the model folder holds
    fitted out-of-distribution statistics, the score as a second output), with its metadata."""
    model = convert_module(cpu_eval(loaded.model), head, ood=find_stats(loaded))
    set_openvino_metadata(model, _metadata(loaded, head))
    return model


def export_openvino(
    model_or_loaded: LoadedModel | Any, out: str | Path, *, head: Head = "avg"
) -> Path:
    """Write ``model_or_loaded`` as an OpenVINO IR (``out`` ``.xml`` plus its ``.bin``)."""
    out = Path(out)
    if out.suffix != ".xml":
        raise UsageError(f"an OpenVINO IR is written as a .xml file (and its .bin), not {out}")
    return _save_ir(convert_to_openvino(as_loaded(model_or_loaded), head), out)


@contextlib.contextmanager
def _quiet_cuda_probe() -> Iterator[None]:
    """NNCF imports ``torch.utils.cpp_extension``, which warns "No CUDA runtime is found" on a
    CPU machine with a CUDA toolkit: not ours to say. Only that logger, only for the import."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    disabled, logger.disabled = logger.disabled, True
    try:
        import torch.utils.cpp_extension  # noqa: F401  # its probe runs once, at import

        yield
    finally:
        logger.disabled = disabled


def quantize_ir(model: Any, calibration: Tensor) -> Any:
    """NNCF post-training int8 of an ``ov.Model``, calibrated on ``calibration`` (N, C, H, W)."""
    with _quiet_cuda_probe():
        nncf = require("nncf", "nncf", "openvino")
    items = [b.numpy() for b in calibration.split(1)]
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is for results
        return nncf.quantize(
            model,
            nncf.Dataset(items),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(items),
        )


@dataclass
class OpenVinoQuantReport:
    """What ``deit quantize --engine openvino`` measured (fractions; milliseconds)."""

    path: str
    data: str
    num_samples: int
    calibration_samples: int
    agreement: float  # int8 vs the fp32 IR, top-1
    max_abs_diff: float
    bf16_agreement: float | None  # bf16 vs fp32, top-1 (None: no bf16 on this CPU)
    fp32_top1: float | None
    int8_top1: float | None
    bf16_top1: float | None
    torch_ms: float | None
    fp32_ms: float | None
    bf16_ms: float | None
    int8_ms: float | None
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize_openvino(
    model_or_loaded: LoadedModel | Any,
    out: str | Path,
    *,
    data: str | None = None,
    data_root: str | Path | None = None,
    limit: int | None = 1000,
    calibration: int = 300,
    head: Head = "avg",
    bench_runs: int = 100,
    threads: int | None = None,
    keep_fp32: str | Path | None = None,
) -> OpenVinoQuantReport:
    """NNCF int8 IR of the model, with agreement, accuracy and speed against fp32 and bf16.

    Args:
        model_or_loaded: a :class:`LoadedModel`, ``Classifier``, ``DeiT`` or checkpoint source.
        out: the int8 ``.xml`` to write (its ``.bin`` beside it).
        data: ``fashion-mnist[:test|train]`` or a labelled image folder; its first
            ``calibration`` images calibrate, all of them (up to ``limit``) are compared.
            ``None``: the package's sample images do both.
        calibration: images NNCF calibrates on (its default subset size is 300).
        bench_runs: batch-1 timing runs per model (0 skips timing).
        threads: inference threads for timing (default: all cores).
        keep_fp32: also write the fp32 IR here.
    """
    out = Path(out)
    if out.suffix != ".xml" or (keep_fp32 and Path(keep_fp32).resolve() == out.resolve()):
        raise UsageError(f"the output must be a .xml file other than --keep-fp32, not {out}")
    if calibration < 1:
        raise UsageError(f"calibration must be at least 1 image, not {calibration}")
    loaded = as_loaded(model_or_loaded)
    if data:  # a bad --data fails here, before anything is written
        pixels, labels, name = load_labelled(data, loaded, limit, data_root)
    else:
        pixels, _ = load_inputs(loaded)
        labels, name = None, "package sample images"
    fp32 = convert_to_openvino(loaded, head)
    calib = pixels[:calibration]
    int8 = quantize_ir(fp32, calib)
    set_openvino_metadata(int8, {**_metadata(loaded, head), "quantization": "nncf int8"})
    if keep_fp32:
        _save_ir(fp32, Path(keep_fp32))
    ref, got = ir_logits(fp32, pixels), ir_logits(int8, pixels)
    diff, agree = compare_logits(ref, got)
    bf16 = ir_logits(fp32, pixels, "bf16") if bf16_supported() else None
    top1 = (
        (lambda z: float((z.argmax(-1) == labels.numpy()).mean())) if labels is not None else None
    )
    n_threads = threads or os.cpu_count() or 1
    times: dict[str, float] = {}
    if bench_runs > 0:
        x = pixels[:1].contiguous()
        eager = HeadLogits(cpu_eval(loaded.model), head)
        requests = {
            "fp32": compile_model(fp32, "fp32", n_threads).create_infer_request(),
            "int8": compile_model(int8, "fp32", n_threads).create_infer_request(),
        }
        if bf16 is not None:
            requests["bf16"] = compile_model(fp32, "bf16", n_threads).create_infer_request()
        feed = {0: x.numpy()}
        calls: dict[str, Callable[[], object]] = {
            k: functools.partial(r.infer, feed) for k, r in requests.items()
        }
        calls["torch"] = lambda: eager(x)
        times = interleaved_median_ms(calls, bench_runs, n_threads)
    path = _save_ir(int8, out)
    return OpenVinoQuantReport(
        path=str(path),
        data=name,
        num_samples=len(pixels),
        calibration_samples=len(calib),
        agreement=agree,
        max_abs_diff=diff,
        bf16_agreement=compare_logits(ref, bf16)[1] if bf16 is not None else None,
        fp32_top1=top1(ref) if top1 else None,
        int8_top1=top1(got) if top1 else None,
        bf16_top1=top1(bf16) if top1 and bf16 is not None else None,
        torch_ms=times.get("torch"),
        fp32_ms=times.get("fp32"),
        bf16_ms=times.get("bf16"),
        int8_ms=times.get("int8"),
        threads=n_threads,
    )


def format_openvino_report(r: OpenVinoQuantReport) -> str:
    """The report as a few lines of text."""
    lines = [
        f"wrote {r.path} (NNCF int8, {r.calibration_samples} calibration images)",
        f"on {r.data}, {r.num_samples} images: top-1 agreement with the fp32 IR: int8 "
        f"{pct(r.agreement)} (max abs logit diff {r.max_abs_diff:.3g}), "
        f"bf16 {pct(r.bf16_agreement)}",
        f"top-1 accuracy: fp32 {pct(r.fp32_top1)}, bf16 {pct(r.bf16_top1)}, "
        f"int8 {pct(r.int8_top1)}",
        f"batch-1 latency, median, {r.threads} threads: eager PyTorch fp32 {ms(r.torch_ms)}; "
        f"OpenVINO fp32 {ms(r.fp32_ms)}, bf16 {ms(r.bf16_ms)}, int8 {ms(r.int8_ms)}",
    ]
    if r.torch_ms and r.int8_ms:
        lines[-1] += f" (int8 {r.torch_ms / r.int8_ms:.2f}x eager)"
    return "\n".join(lines)


__all__ = [
    "OpenVinoQuantReport",
    "export_openvino",
    "format_openvino_report",
    "quantize_ir",
    "quantize_openvino",
]
