"""Preprocessing of large JPEGs: `deit` vs the transformers DeiT image processors.

Every contender goes from a JPEG file to the normalized (3, 224, 224) tensor of the
checkpoint's processor (facebook/deit-*-224: bicubic resize to 256x256, center crop 224,
ImageNet mean/std), decoding included. Reported per contender: median milliseconds per image
(one image at a time, one thread), the same as images per second when a set of images is
spread over ``--threads`` threads (how `deit predict` decodes), and the largest and mean
absolute difference from the transformers PIL processor, the exact reference.

    python benchmarks/bench_preprocess.py --size 1920x1280 --threads 2

Contenders: ``deit`` (exact), ``deit fast_decode`` (JPEG decoded at reduced size, opt-in,
approximate), ``hf`` (transformers' default DeiTImageProcessor: torchvision backend) and
``hf pil`` (DeiTImageProcessorPil). Results are recorded in docs/performance.md.
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

import torch
from PIL import Image

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


def _median_ms(fn: Callable[[Path], torch.Tensor], paths: list[Path], repeats: int) -> float:
    for p in paths:  # warm-up
        fn(p)
    times = []
    for _ in range(repeats):
        for p in paths:
            start = time.perf_counter()
            fn(p)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("../shared/data/images"))
    parser.add_argument("--size", default="1920x1280", help="WxH of the JPEGs made from --images")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import transformers

    from deit.transforms import PreprocessConfig, preprocess

    width, height = map(int, args.size.lower().split("x"))
    tmp = Path(tempfile.mkdtemp())
    paths = []
    for src in sorted(args.images.glob("*")):
        if src.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        img = Image.open(src).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        paths.append(tmp / f"{src.stem}.jpg")
        img.save(paths[-1], quality=args.quality)

    cfg = PreprocessConfig.from_hf(HF_CONFIG)
    hf_default = transformers.DeiTImageProcessor(**HF_CONFIG)
    hf_pil = transformers.DeiTImageProcessorPil(**HF_CONFIG)

    def hf(processor: object) -> Callable[[Path], torch.Tensor]:
        return lambda p: processor(Image.open(p).convert("RGB"), return_tensors="pt")[  # type: ignore[operator]
            "pixel_values"
        ][0]

    contenders: dict[str, Callable[[Path], torch.Tensor]] = {
        "deit": lambda p: preprocess(p, cfg)[0],
        "deit fast_decode": lambda p: preprocess(p, cfg, fast_decode=True)[0],
        "hf": hf(hf_default),
        "hf pil": hf(hf_pil),
    }
    reference = {p: contenders["hf pil"](p) for p in paths}
    rows = []
    for name, fn in contenders.items():
        diffs = [(fn(p) - reference[p]).abs() for p in paths]
        rows.append(
            {
                "impl": name,
                "images": len(paths),
                "size": args.size,
                "ms_per_image": round(_median_ms(fn, paths, args.repeats), 2),
                "img_per_s_threads": round(
                    _threaded_img_per_s(fn, paths, args.threads, args.repeats), 1
                ),
                "threads": args.threads,
                "max_abs_diff_vs_hf_pil": float(max(d.max() for d in diffs)),
                "mean_abs_diff_vs_hf_pil": float(sum(d.mean() for d in diffs) / len(diffs)),
            }
        )
    hf_ms = next(r["ms_per_image"] for r in rows if r["impl"] == "hf")
    pil_ms = next(r["ms_per_image"] for r in rows if r["impl"] == "hf pil")
    for row in rows:
        row["speedup_vs_hf"] = round(hf_ms / row["ms_per_image"], 2)
        row["speedup_vs_hf_pil"] = round(pil_ms / row["ms_per_image"], 2)
    if args.json:
        for row in rows:
            print(json.dumps({**row, "transformers": transformers.__version__}))
        return
    print(f"{len(paths)} JPEGs of {args.size}, transformers {transformers.__version__}")
    print(
        f"{'impl':>17} {'ms/img':>7} {'vs hf':>6} {'vs pil':>7} "
        f"{'img/s ' + str(args.threads) + ' thr':>12} {'max |Δ|':>9} {'mean |Δ|':>9}"
    )
    for r in rows:
        print(
            f"{r['impl']:>17} {r['ms_per_image']:7.2f} {r['speedup_vs_hf']:5.2f}x "
            f"{r['speedup_vs_hf_pil']:6.2f}x {r['img_per_s_threads']:12.1f} "
            f"{r['max_abs_diff_vs_hf_pil']:9.2e} {r['mean_abs_diff_vs_hf_pil']:9.2e}"
        )


if __name__ == "__main__":
    main()
