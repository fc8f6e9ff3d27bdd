"""Bounded load test of ``deit serve`` on loopback: latency, throughput, batching, bad uploads.

Starts the server in a subprocess (or uses ``--url``, which must be a loopback address), then
sends ``--requests`` classify requests from ``--concurrency`` concurrent clients (httpx, async).
Every ``--bad-every``-th request is a bad upload instead, alternately larger than the server's
upload limit and not an image; those must get 413/415 while the good ones keep succeeding.
Stops after ``--requests`` or ``--max-seconds``, whichever comes first. ``--huge-every N``
also makes every N-th request a batch of 32 small PNGs that each decode to 3000x3000 (far
over the default per-request pixel limit): those must get 413/503 without slowing the rest.

    python benchmarks/load_test.py --random-model --requests 2000 --concurrency 32

``--random-model`` serves a random DeiT-tiny-distilled shaped like the embedded Fashion-MNIST
model (28 px, 4 px patches, 1 channel, 10 classes) so the numbers can be measured before that
model ships; ``--model fashion-mnist`` serves the real one. Results are in docs/deploy.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_random_model(folder: Path) -> Path:
    """A random DeiT-tiny-distilled in the embedded Fashion-MNIST model's shape."""
    import torch

    from deit.config import DeiTConfig
    from deit.model import DeiT
    from deit.saving import save_model
    from deit.transforms import PreprocessConfig

    torch.manual_seed(0)
    config = DeiTConfig(
        img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=12, num_heads=3, num_classes=10
    )
    pre = PreprocessConfig(
        resize_mode="squash",
        resize_size=(28, 28),
        crop_size=None,
        channels=1,
        mean=(0.286,),
        std=(0.353,),
        invert_light_background=True,
    )
    return save_model(
        DeiT(config), folder, labels=[f"class {i}" for i in range(10)], preprocess=pre
    )


def start_server(model: str, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "deit.deploy.serve",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--log-level",
        "warning",
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    return subprocess.Popen(cmd)


def huge_png() -> bytes:
    """A 15 KB PNG that decodes to 3000x3000 grey pixels."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 128).save(buf, "PNG")
    return buf.getvalue()


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"server at {url} not ready after {timeout:.0f} s")


async def run_load(
    url: str, images: list[tuple[str, bytes]], args: argparse.Namespace, upload_limit: int
) -> dict[str, Any]:
    import httpx

    oversized = os.urandom(upload_limit + (1 << 20))
    huge = huge_png() if args.huge_every else b""
    latencies: list[float] = []
    errors: list[str] = []
    bad: dict[str, Any] = {"sent": 0, "rejected_4xx": 0, "unexpected": []}
    next_index = 0
    deadline = time.monotonic() + args.max_seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < args.requests and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            if args.huge_every and i % args.huge_every == args.huge_every - 1:
                bad["sent"] += 1
                files = [("files", (f"huge{j}.png", huge)) for j in range(32)]
                try:
                    r = await client.post("/v1/classify/batch", files=files)
                    if r.status_code in (413, 503):
                        bad["rejected_4xx"] += 1
                    else:
                        bad["unexpected"].append(r.status_code)
                except httpx.HTTPError as e:
                    bad["unexpected"].append(type(e).__name__)
                continue
            if args.bad_every and i % args.bad_every == args.bad_every - 1:
                bad["sent"] += 1
                body = oversized if (i // args.bad_every) % 2 == 0 else b"this is not an image"
                try:
                    r = await client.post("/v1/classify", files={"file": ("bad.jpg", body)})
                    if r.status_code in (413, 415):
                        bad["rejected_4xx"] += 1
                    else:
                        bad["unexpected"].append(r.status_code)
                except httpx.HTTPError as e:
                    bad["unexpected"].append(type(e).__name__)
                continue
            name, data = images[i % len(images)]
            start = time.perf_counter()
            try:
                r = await client.post("/v1/classify", files={"file": (name, data)})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(f"{r.status_code}: {r.text[:100]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        stats = (await client.get("/healthz")).json()["batching"]
    ms = sorted(1000 * x for x in latencies)
    pct = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")  # noqa: E731
    return {
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "bad_uploads": bad,
        "seconds": elapsed,
        "throughput_rps": len(latencies) / elapsed,
        "latency_ms": {
            "p50": pct(0.50),
            "p90": pct(0.90),
            "p99": pct(0.99),
            "mean": statistics.fmean(ms) if ms else float("nan"),
        },
        "server_batching": stats,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model to serve (any deit source)")
    src.add_argument(
        "--random-model",
        action="store_true",
        help="serve a random DeiT-tiny-distilled in the Fashion-MNIST model's shape",
    )
    src.add_argument("--url", help="an already running server (loopback only)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--bad-every", type=int, default=100, help="every N-th request is a bad upload")
    p.add_argument(
        "--huge-every",
        type=int,
        default=0,
        help="every N-th request is a batch of 32 PNGs decoding to 3000x3000 (413/503 expected)",
    )
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--threads", type=int, help="the server's PyTorch threads (default: all)")
    p.add_argument("--images", nargs="+", help="images to send (default: the package samples)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.requests > 100_000 or args.concurrency > 256:
        p.error("keep it bounded: at most 100000 requests and 256 clients")

    from deit.deploy.export import sample_images

    paths = [Path(x) for x in args.images] if args.images else sample_images()
    images = [(x.name, x.read_bytes()) for x in paths]
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url = args.url.rstrip("/")
            if urlparse(url).hostname not in LOOPBACK:
                p.error("--url must be a loopback address (127.0.0.1, localhost or ::1)")
        else:
            model = str(save_random_model(Path(tmp) / "model")) if args.random_model else args.model
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(model, port, args)
        try:
            wait_ready(url, proc)
            import httpx

            info = httpx.get(f"{url}/v1/model", timeout=10).json()
            limit = int(info["limits"]["max_upload_mb"] * 1024 * 1024)
            report = asyncio.run(run_load(url, images, args, limit))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    report["model"] = {k: info[k] for k in ("source", "parameters", "device")}
    report["model"]["config"] = info["config"]
    report["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    report["settings"] = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "server_threads": args.threads,
        "bad_every": args.bad_every,
        "huge_every": args.huge_every,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        lat, bad, batching = report["latency_ms"], report["bad_uploads"], report["server_batching"]
        print(
            f"{report['ok']} ok, {report['errors']} errors in {report['seconds']:.1f} s: "
            f"{report['throughput_rps']:.1f} req/s; latency p50 {lat['p50']:.1f} ms, "
            f"p99 {lat['p99']:.1f} ms"
        )
        print(
            f"bad uploads: {bad['sent']} sent, {bad['rejected_4xx']} rejected with 413/415/503, "
            f"unexpected: {bad['unexpected']}"
        )
        print(
            f"server batches: {batching['batches']}, mean size {batching['mean_batch']:.1f}, "
            f"largest {batching['largest_batch']}"
        )
    return 1 if report["errors"] or report["bad_uploads"]["unexpected"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
