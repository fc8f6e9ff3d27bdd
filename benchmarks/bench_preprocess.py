"""Preprocessing of large JPEGs: `deit` vs the transformers and torchvision pipelines.

Every contender goes from a JPEG file to the normalized (3, 224, 224) tensor, decoding
included. ``--preset hf`` (default) is the facebook/deit-*-224 processor (bicubic resize to
256x256, center crop 224, ImageNet mean/std), against transformers' DeiTImageProcessor
(torchvision backend) and DeiTImageProcessorPil, the exact reference. ``--preset official``
is the official DeiT evaluation (shorter side to 256, center crop 224), against torchvision's
transforms on PIL images, its exact reference. Reported per contender: median milliseconds
per image (one image at a time, ``--threads`` threads available to every contender), images
per second when a set is spread over ``--threads`` threads (how `deit predict` decodes), and
the largest and mean absolute difference from the exact reference.

    python benchmarks/bench_preprocess.py --size 1920x1280 --threads 2
    python benchmarks/bench_preprocess.py --size 1920x1280 --threads 2 --preset official

Contenders: ``deit`` (exact), ``deit 1 thread`` (exact, no row bands), ``deit fast_decode``
(JPEG decoded at reduced size, opt-in, approximate) and the references. Results are recorded
in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from deit import box_resize
from deit.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, preprocess

HF_CONFIG = {
    "do_resize": True,
    "size": {"height": 256, "width": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def _median_ms(
    contenders: dict[str, Callable[[Path], torch.Tensor]], paths: list[Path], repeats: int
) -> dict[str, float]:
    """Median ms per image of each contender. Rounds of every contender on every image, so
    that a machine whose speed drifts during the run favours none of them; each contender's
    first image of a round is not timed (threads left spinning by the one before)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(repeats + 1):  # the first round warms up
        for name, fn in contenders.items():
            fn(paths[-1])
            for p in paths:
                start = time.perf_counter()
                fn(p)
                if rep:
                    times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _threaded_img_per_s(
    fn: Callable[[Path], torch.Tensor], paths: list[Path], threads: int, repeats: int
) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, paths))  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(fn, paths * 2))
            best = min(best, time.perf_counter() - start)
    return 2 * len(paths) / best


def _contenders(preset: str) -> tuple[dict[str, Callable[[Path], torch.Tensor]], str]:
    """The preset's contenders and the name of its exact reference."""
    if preset == "hf":
        import transformers

        cfg = PreprocessConfig.from_hf(HF_CONFIG)

        def hf(processor: Any) -> Callable[[Path], torch.Tensor]:
            return lambda p: processor(Image.open(p).convert("RGB"), return_tensors="pt")[
                "pixel_values"
            ][0]

        refs = {
            "transformers": hf(transformers.DeiTImageProcessor(**HF_CONFIG)),
            "transformers pil": hf(transformers.DeiTImageProcessorPil(**HF_CONFIG)),
        }
        reference = "transformers pil"
    else:
        from torchvision import transforms as tv

        cfg = PreprocessConfig.model_card()
        pipeline = tv.Compose(
            [
                tv.Resize(256, interpolation=tv.InterpolationMode.BICUBIC),
                tv.CenterCrop(224),
                tv.ToTensor(),
                tv.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        refs = {"torchvision": lambda p: pipeline(Image.open(p).convert("RGB"))}
        reference = "torchvision"

    def deit(band_min_pixels: int, fast_decode: bool = False) -> Callable[[Path], torch.Tensor]:
        def run(p: Path) -> torch.Tensor:
            # Contenders never run at the same time, so each may set the band threshold.
            box_resize.BAND_MIN_PIXELS = band_min_pixels
            return preprocess(p, cfg, fast_decode=fast_decode)[0]

        return run

    default = box_resize.BAND_MIN_PIXELS
    ours = {
        "deit": deit(default),
        "deit 1 thread": deit(1 << 62),  # no image is large enough for row bands
        "deit fast_decode": deit(default, fast_decode=True),
    }
    return {**ours, **refs}, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("tests/fixtures/images"))
    parser.add_argument("--size", default="1920x1280", help="WxH of the JPEGs made from --images")
    parser.add_argument("--preset", choices=("hf", "official"), default="hf")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    width, height = map(int, args.size.lower().split("x"))
    tmp = Path(tempfile.mkdtemp())
    paths = []
    for src in sorted(args.images.glob("*")):
        if src.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        img = Image.open(src).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        paths.append(tmp / f"{src.stem}.jpg")
        img.save(paths[-1], quality=args.quality)

    contenders, ref_name = _contenders(args.preset)
    reference = {p: contenders[ref_name](p) for p in paths}
    torch.set_num_threads(args.threads)  # one image: every contender may use the threads
    latency = _median_ms(contenders, paths, args.repeats)
    torch.set_num_threads(1)  # the threads work on different images
    rows = []
    for name, fn in contenders.items():
        diffs = [(fn(p) - reference[p]).abs() for p in paths]
        rows.append(
            {
                "impl": name,
                "preset": args.preset,
                "images": len(paths),
                "size": args.size,
                "ms_per_image": round(latency[name], 2),
                "img_per_s_threads": round(
                    _threaded_img_per_s(fn, paths, args.threads, args.repeats), 1
                ),
                "threads": args.threads,
                "max_abs_diff_vs_reference": float(max(d.max() for d in diffs)),
                "mean_abs_diff_vs_reference": float(sum(d.mean() for d in diffs) / len(diffs)),
            }
        )
    ref_ms = {r["impl"]: r["ms_per_image"] for r in rows}
    baselines = [name for name in contenders if not name.startswith("deit")]
    for row in rows:
        for name in baselines:
            row[f"speedup_vs_{name.replace(' ', '_')}"] = round(
                ref_ms[name] / row["ms_per_image"], 2
            )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{len(paths)} JPEGs of {args.size}, preset {args.preset}, reference: {ref_name}")
    head = " ".join(f"{'vs ' + n:>17}" for n in baselines)
    print(
        f"{'impl':>17} {'ms/img':>7} {head} {'img/s ' + str(args.threads) + ' thr':>12} "
        f"{'max |Δ|':>9} {'mean |Δ|':>9}"
    )
    for r in rows:
        ratios = " ".join(f"{r['speedup_vs_' + n.replace(' ', '_')]:16.2f}x" for n in baselines)
        print(
            f"{r['impl']:>17} {r['ms_per_image']:7.2f} {ratios} {r['img_per_s_threads']:12.1f} "
            f"{r['max_abs_diff_vs_reference']:9.2e} {r['mean_abs_diff_vs_reference']:9.2e}"
        )


if __name__ == "__main__":
    main()
