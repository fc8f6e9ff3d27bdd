"""`deit predict --engine ray` against plain `deit predict`: the distributed engine's overhead.

Both classify the same image files with the same model, as whole commands (start-up, Ray's
local cluster, decoding and writing included), in alternating rounds; reported: wall seconds,
images per second and the ratio. By default the 1,000 first Fashion-MNIST test images written
as PNG files and the embedded model.

    python benchmarks/bench_ray.py [--images N] [--rounds 2]

Results are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from deit.train.fashion_mnist import load_fashion_mnist


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deit", *argv], check=False, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="fashion-mnist")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        images, _ = load_fashion_mnist("test")
        for i, im in enumerate(images[: args.images]):
            Image.fromarray(im[0].numpy(), "L").save(folder / f"{i:05d}.png")
        plain = ["predict", "-m", args.model, "--device", "cpu", "--json", str(folder)]
        ray = [
            "predict",
            "-m",
            args.model,
            "--engine",
            "ray",
            "--out",
            f"{tmp}/o.jsonl",
            str(folder),
        ]
        times: dict[str, list[float]] = {"plain": [], "ray": []}
        for _ in range(args.rounds):
            times["plain"].append(timed(plain))
            times["ray"].append(timed(ray))
        for name, seconds in times.items():
            best = min(seconds)
            print(f"{name:>6}: {best:6.1f} s  {args.images / best:7.1f} img/s  (rounds {seconds})")
        print(f"ray / plain wall time: {min(times['ray']) / min(times['plain']):.2f}")


if __name__ == "__main__":
    main()
