"""``deit bench``: ours vs timm vs transformers, on the same weights and inputs."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from deit.bench import IMPLS, MODES, run_bench
from deit.cli._args import at_least
from deit.config import VARIANTS
from deit.runtime import DTYPES

NAME = "bench"
HELP = "deit vs timm vs transformers: throughput, latency, memory, logit error"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="deit_tiny_distilled_patch16_224", choices=sorted(VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=at_least(1), action="append", help="batch size (repeatable)")
    p.add_argument("--impl", action="append", choices=IMPLS, help="default: all")
    p.add_argument("--mode", action="append", choices=MODES, help="default: eager")
    p.add_argument("--iters", type=at_least(1), default=10, help="timed batches (at least)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds (at least)")
    p.add_argument(
        "--rounds",
        type=at_least(1),
        default=1,
        help="measure all contenders this many times in turn, report the median round",
    )
    p.add_argument("--threads", type=at_least(1), help="CPU threads for torch")
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_bench(
        args.model,
        device=args.device,
        dtype=args.dtype,
        batches=tuple(args.batch or (1, 32)),
        impls=tuple(args.impl or IMPLS),
        modes=tuple(args.mode or ("eager",)),
        iters=args.iters,
        min_seconds=args.min_seconds,
        rounds=args.rounds,
    )
    if not args.json:
        print(
            f"{'impl':>5} {'mode':>8} {'batch':>6} {'img/s':>10} {'median ms':>10} "
            f"{'p99 ms':>9} {'peak MiB':>9} {'max |Δlogit|':>13}"
        )
    for m in results:
        if args.json:
            print(json.dumps(asdict(m)), flush=True)
            continue
        peak = f"{m.peak_mem_mb:9.0f}" if m.peak_mem_mb is not None else f"{'-':>9}"
        print(
            f"{m.impl:>5} {m.mode:>8} {m.batch:>6} {m.img_per_s:10.1f} "
            f"{m.latency_ms:10.2f} {m.latency_p99_ms:9.2f} {peak} "
            f"{m.max_abs_logit_diff:13.2e}",
            flush=True,
        )
    return 0
