"""`deit bench`: every contender runs the same weights; the JSON lines have the promised keys."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deit.bench import run_bench
from deit.cli import main

pytest.importorskip("timm")
pytest.importorskip("transformers")

KEYS = {"impl", "mode", "device", "dtype", "batch", "img_per_s", "latency_ms", "max_abs_logit_diff"}


def test_all_contenders_compute_the_same_function() -> None:
    results = list(run_bench("deit_tiny_patch16_224", batches=(2,), iters=1, min_seconds=0))
    assert [m.impl for m in results] == ["deit", "timm", "hf"]
    for m in results:
        assert m.max_abs_logit_diff < 1e-4, m
        assert m.img_per_s > 0 and m.latency_p99_ms >= m.latency_ms > 0
        assert m.peak_mem_mb is None  # CPU


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench",
            "--model",
            "deit_tiny_distilled_patch16_224",
            "--batch",
            "1",
            "--impl",
            "deit",
            "--impl",
            "timm",
            "--iters",
            "1",
            "--min-seconds",
            "0",
            "--json",
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [r["impl"] for r in rows] == ["deit", "timm"]
    assert all(set(r) >= KEYS and r["batch"] == 1 and r["dtype"] == "fp32" for r in rows)


def test_bad_arguments() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            list(run_bench(device="cuda"))
    with pytest.raises(ValueError, match="unknown dtype"):
        list(run_bench(dtype="int3"))
    with pytest.raises(ValueError, match="unknown device 'foo'"):
        list(run_bench(device="foo"))


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--iters", "-1"], ["--threads", "x"]])
def test_bad_counts_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from deit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", *argv])
    assert info.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_onnx_runtime_modes() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    results = list(
        run_bench(
            "deit_tiny_patch16_224",
            batches=(2,),
            impls=("deit", "timm"),
            modes=("onnx", "onnx-fused", "onnx-int8"),
            iters=1,
            min_seconds=0,
        )
    )
    assert [(m.impl, m.mode) for m in results] == [
        ("deit", "onnx"),
        ("deit", "onnx-fused"),
        ("deit", "onnx-int8"),
    ]
    assert results[0].max_abs_logit_diff < 1e-4 and results[1].max_abs_logit_diff < 1e-4  # fp32
    with pytest.raises(ValueError, match="use --dtype fp32"):
        list(run_bench(dtype="bf16", modes=("onnx",)))


def test_pytorch_int8_mode() -> None:
    results = list(
        run_bench(
            "deit_tiny_patch16_224",
            batches=(1,),
            impls=("deit", "timm"),
            modes=("int8",),
            iters=1,
            min_seconds=0,
        )
    )
    assert [(m.impl, m.mode) for m in results] == [("deit", "int8")]  # peers have no int8 mode
    assert 0 < results[0].max_abs_logit_diff < 0.5  # quantized, but the same function
    with pytest.raises(ValueError, match="use --dtype fp32"):
        list(run_bench(dtype="bf16", modes=("int8",)))


def test_rounds_report_the_median_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """--rounds measures every contender once per round and keeps its median round."""
    from deit import bench

    latencies = iter([5.0, 1.0, 3.0, 9.0, 2.0, 4.0])  # rounds x (deit, timm)
    real = bench.measure

    def fake(contender, *args, **kwargs):  # type: ignore[no-untyped-def]
        m = real(contender, *args, **kwargs)
        return dataclasses.replace(m, latency_ms=next(latencies))

    monkeypatch.setattr(bench, "measure", fake)
    results = list(
        run_bench(
            "deit_tiny_patch16_224",
            batches=(1,),
            impls=("deit", "timm"),
            iters=1,
            min_seconds=0,
            rounds=3,
        )
    )
    assert [(m.impl, m.latency_ms) for m in results] == [("deit", 3.0), ("timm", 4.0)]
