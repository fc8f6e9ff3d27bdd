"""Side-by-side inference benchmark: deit, timm and transformers in one process, same weights.

Every contender computes the same function: one set of random weights (timm's initialisation
when timm is installed) is loaded into each implementation. Each measurement reports
throughput at a batch size, median and p99 latency of one batch, peak accelerator memory, and
the largest absolute logit difference from an fp32 eager reference on the same input.

    deit bench --device cpu --batch 1 --batch 32
    deit bench --device cuda --dtype bf16 --batch 1024 --mode eager --mode compile --json

Peers that aren't installed are skipped with a note on stderr.
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from deit.checkpoints import as_loaded
from deit.config import VARIANTS, DeiTConfig
from deit.model import DeiT
from deit.onnx_model import OnnxRunner
from deit.runtime import DTYPES, autocast, quantize_int8, resolve_device
from deit.saving import save_model
from deit.transforms import PreprocessConfig

IMPLS = ("deit", "timm", "hf")
# onnx: ours exported to portable ONNX; onnx-fused: ONNX Runtime's fused graph
# (deit.deploy.ort_graph); onnx-int8: that graph quantized, as `deit quantize` writes it;
# int8: ours with int8 linear layers in PyTorch (all four on the CPU).
# openvino, openvino-bf16, openvino-int8: ours as an OpenVINO IR run by its CPU plugin in fp32,
# in bf16 (INFERENCE_PRECISION_HINT), and quantized by NNCF (64 seeded random calibration
# inputs: speed only; `deit quantize --engine openvino` measures accuracy on real data).
# compile-max: torch.compile's max-autotune mode (autotuned kernels; CUDA graphs on a GPU)
MODES = (
    "eager",
    "compile",
    "compile-max",
    "int8",
    "onnx",
    "onnx-fused",
    "onnx-int8",
    "openvino",
    "openvino-bf16",
    "openvino-int8",
)
ENGINE_MODES = tuple(m for m in MODES if m.startswith(("onnx", "openvino")) or m == "int8")


@dataclass(frozen=True)
class Measurement:
    """One contender at one batch size."""

    impl: str
    mode: str
    device: str
    dtype: str
    batch: int
    img_per_s: float
    latency_ms: float  # median time of one batch
    latency_p99_ms: float
    peak_mem_mb: float | None  # accelerator memory high-water mark; None on CPU
    max_abs_logit_diff: float  # vs our fp32 eager model on the same input


@dataclass(frozen=True)
class Contender:
    impl: str
    mode: str
    forward: Callable[[Tensor], Tensor]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batches(
    fn: Callable[[], object], device: torch.device, iters: int, min_seconds: float
) -> list[float]:
    """Seconds per call, at least ``iters`` calls and ``min_seconds`` in all."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 50 * iters:
            break
    return times


def reference_weights(variant: str) -> tuple[DeiTConfig, dict[str, Tensor]]:
    """Random weights in official/timm key layout (timm's init when available)."""
    config = VARIANTS[variant]
    try:
        import timm

        model = timm.create_model(variant, pretrained=False)
    except ImportError:
        model = DeiT(config)
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_contenders(
    variant: str, device: torch.device, impls: tuple[str, ...], modes: tuple[str, ...]
) -> tuple[list[Contender], DeiT]:
    """The models to compare, plus our fp32 eager model as the numerical reference."""
    config, state = reference_weights(variant)
    ours = DeiT(config)
    ours.load_state_dict(state)
    ours = ours.eval().to(device)
    models: dict[str, nn.Module] = {"deit": ours}
    if "timm" in impls:
        try:
            import timm

            models["timm"] = timm.create_model(variant, pretrained=False)
            models["timm"].load_state_dict(state)
        except ImportError:
            print("bench: timm is not installed; skipping it", file=sys.stderr)
    if "hf" in impls:
        try:
            models["hf"] = _hf_model(ours)
        except ImportError:
            print("bench: transformers is not installed; skipping it", file=sys.stderr)
    contenders = []
    for impl in impls:
        if impl not in models:
            continue
        model = models[impl].eval().to(device)
        for mode in modes:
            if mode in ENGINE_MODES:
                if impl != "deit":
                    continue
                if device.type != "cpu":
                    raise ValueError(f"mode {mode!r} runs on the CPU only")
                if mode == "int8":
                    forward = _forward(impl, quantize_int8(ours), "eager")
                elif mode.startswith("openvino"):
                    forward = _openvino_forward(ours, mode)
                else:
                    forward = _onnx_forward(ours, mode)
                contenders.append(Contender(impl, mode, forward))
                continue
            contenders.append(Contender(impl, mode, _forward(impl, model, mode)))
    return contenders, ours


def _onnx_forward(model: DeiT, mode: str) -> Callable[[Tensor], Tensor]:
    """Our model exported to ONNX as ``mode`` says, run by ONNX Runtime."""
    from deit.deploy.export import export_onnx
    from deit.deploy.quantize import quantize_onnx

    tmp = tempfile.TemporaryDirectory(prefix="deit-bench-")  # removed with the contender
    folder = Path(tmp.name)
    path = export_onnx(model, folder / "model.onnx", dynamic_batch=True, fused=mode != "onnx")
    if mode == "onnx-int8":
        path = quantize_onnx(path, folder / "model.int8.onnx")
    runner = OnnxRunner(path, threads=torch.get_num_threads())

    def forward(x: Tensor, _keep: object = tmp) -> Tensor:
        return torch.from_numpy(runner(x))

    return forward


def _openvino_forward(model: DeiT, mode: str) -> Callable[[Tensor], Tensor]:
    """Our model as an OpenVINO IR, compiled as ``mode`` says, run by OpenVINO's CPU plugin."""
    from deit.deploy.openvino import convert_to_openvino, quantize_ir
    from deit.openvino_model import compile_model

    loaded = as_loaded(model)
    ir = convert_to_openvino(loaded)
    if mode == "openvino-int8":
        gen = torch.Generator().manual_seed(0)
        h, w = model.config.image_hw
        calib = torch.randn(64, model.config.in_chans, h, w, generator=gen)
        ir = quantize_ir(ir, calib)
        mode = "openvino"
    precision = "bf16" if mode == "openvino-bf16" else "fp32"
    request = compile_model(ir, precision, torch.get_num_threads()).create_infer_request()

    def forward(x: Tensor) -> Tensor:
        return torch.from_numpy(np.array(request.infer({0: x.numpy()})[0], copy=True))

    return forward


def _hf_model(ours: DeiT) -> nn.Module:
    """The same weights in transformers, through our HF writer (LayerNorm eps kept at 1e-6)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        labels = [str(i) for i in range(ours.config.num_classes)]
        save_model(ours, Path(tmp), labels=labels, preprocess=PreprocessConfig(), format="hf")
        return transformers.AutoModelForImageClassification.from_pretrained(tmp)


def _forward(impl: str, model: nn.Module, mode: str) -> Callable[[Tensor], Tensor]:
    if impl == "deit":

        def call(x: Tensor) -> Tensor:
            return model(x).logits
    elif impl == "hf":

        def call(x: Tensor) -> Tensor:
            return model(pixel_values=x).logits
    else:
        call = model
    if mode in ("compile", "compile-max"):
        return torch.compile(call, mode="max-autotune" if mode == "compile-max" else None)
    if mode == "eager":
        return call
    raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")


@torch.inference_mode()
def measure(
    contender: Contender,
    reference: DeiT,
    *,
    batch: int,
    device: torch.device,
    dtype: str,
    iters: int = 10,
    min_seconds: float = 1.0,
) -> Measurement:
    """Throughput, latency, memory and logit error of one contender at one batch size."""
    h, w = reference.config.image_hw
    x = torch.randn(
        batch,
        reference.config.in_chans,
        h,
        w,
        device=device,
        generator=torch.Generator(device).manual_seed(0),
    )
    expected = reference(x).logits.float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> Tensor:
        with autocast(device, dtype):
            return contender.forward(x)

    got = step().float()  # the first call compiles, when asked
    # Warm-up: oneDNN and the allocators settle over the first few calls (seen: ten times
    # slower for several calls), whichever implementation happens to run first.
    _time_batches(step, device, iters=3, min_seconds=min_seconds / 2)
    times = _time_batches(step, device, iters, min_seconds)
    median = statistics.median(times)
    p99 = sorted(times)[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Measurement(
        impl=contender.impl,
        mode=contender.mode,
        device=str(device),
        dtype=dtype,
        batch=batch,
        img_per_s=batch / median,
        latency_ms=1e3 * median,
        latency_p99_ms=1e3 * p99,
        peak_mem_mb=peak,
        max_abs_logit_diff=float((got - expected).abs().max()),
    )


def run_bench(
    variant: str = "deit_tiny_distilled_patch16_224",
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    batches: tuple[int, ...] = (1, 32),
    impls: tuple[str, ...] = IMPLS,
    modes: tuple[str, ...] = ("eager",),
    iters: int = 10,
    min_seconds: float = 1.0,
    rounds: int = 1,
) -> Iterator[Measurement]:
    """Measure every contender at every batch size, yielding as results come.

    With ``rounds`` > 1 every contender is measured once per round, the rounds in turn, and
    the round with the median latency is reported: on a machine whose speed drifts (a shared
    CPU), all contenders then see the same conditions.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if dtype != "fp32" and any(m in ENGINE_MODES for m in modes):
        raise ValueError(
            "the onnx, openvino and int8 modes set their own precision: use --dtype fp32"
        )
    dev = resolve_device(device)
    contenders, reference = build_contenders(variant, dev, impls, modes)
    for batch in batches:
        run = functools.partial(
            measure,
            reference=reference,
            batch=batch,
            device=dev,
            dtype=dtype,
            iters=iters,
            min_seconds=min_seconds,
        )
        if rounds == 1:  # yield as results come
            yield from (run(c) for c in contenders)
            continue
        results = [[run(c) for c in contenders] for _ in range(rounds)]
        for i in range(len(contenders)):
            by_latency = sorted((r[i] for r in results), key=lambda m: m.latency_ms)
            yield by_latency[len(by_latency) // 2]
