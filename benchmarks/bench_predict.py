"""End-to-end CPU prediction: `deit` vs a transformers pipeline vs timm, same weights, same images.

Each contender decodes the image files, preprocesses them and runs DeiT-tiny-distilled
(random weights written by transformers, converted for timm, so all three compute the same
function); ours also as the ONNX Runtime files `deit export --ort-fused` and `deit quantize`
write. Reported: images per second over the whole set (best of ``--repeats`` rounds, the
contenders in turn within a round), after one warm-up pass, and the agreement of top-1
predictions with our fp32 eager model.

    python benchmarks/bench_predict.py --images tests/fixtures/images --copies 8 --threads 2

Results are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("tests/fixtures/images"))
    parser.add_argument("--copies", type=int, default=8, help="times each image is repeated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm
    import transformers
    from PIL import Image

    from deit.checkpoints import read_state_dict
    from deit.deploy.export import export_onnx
    from deit.deploy.quantize import quantize_onnx
    from deit.hf_keys import hf_to_timm
    from deit.inference import Classifier, expand_paths

    paths = expand_paths([args.images]) * args.copies
    tmp = Path(tempfile.mkdtemp())
    config = transformers.DeiTConfig(
        hidden_size=192, num_attention_heads=3, intermediate_size=768, num_labels=1000
    )
    transformers.DeiTForImageClassificationWithTeacher(config).save_pretrained(tmp / "hf")
    processor = transformers.DeiTImageProcessor(
        size={"height": 256, "width": 256},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(tmp / "hf")

    ours = Classifier.from_pretrained(tmp / "hf", device="cpu")
    fused = export_onnx(ours.loaded, tmp / "fused.onnx", dynamic_batch=True, fused=True)
    int8 = quantize_onnx(fused, tmp / "int8.onnx")

    def run(clf: Classifier) -> Callable[[], list[int]]:
        def predict() -> list[int]:
            results = clf.predict_files(paths, top_k=1, batch_size=args.batch_size)
            return [r.predictions[0].index for r in results]

        return predict

    pipe = transformers.pipeline("image-classification", model=str(tmp / "hf"), device="cpu")

    def run_hf() -> list[int]:
        out = pipe(paths, batch_size=args.batch_size, top_k=1)
        return [pipe.model.config.label2id[o[0]["label"]] for o in out]

    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    state, _ = read_state_dict(tmp / "hf" / "model.safetensors")
    model.load_state_dict(hf_to_timm(state))
    for m in model.modules():  # transformers' checkpoint uses LayerNorm eps 1e-12
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-12
    data_cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_cfg)

    @torch.inference_mode()
    def run_timm() -> list[int]:
        preds: list[int] = []
        for i in range(0, len(paths), args.batch_size):
            batch = torch.stack(
                [transform(Image.open(p).convert("RGB")) for p in paths[i : i + args.batch_size]]
            )
            preds.extend(model(batch).argmax(-1).tolist())
        return preds

    contenders = {
        "deit": run(ours),
        "deit onnx-fused": run(Classifier.from_pretrained(fused)),
        "deit onnx-int8": run(Classifier.from_pretrained(int8)),
        "hf": run_hf,
        "timm": run_timm,
    }
    best = dict.fromkeys(contenders, float("inf"))
    preds: dict[str, list[int]] = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for impl, fn in contenders.items():
            start = time.perf_counter()
            preds[impl] = fn()
            if rep:
                best[impl] = min(best[impl], time.perf_counter() - start)
    rows = []
    for impl in contenders:
        agree = sum(a == b for a, b in zip(preds[impl], preds["deit"])) / len(paths)
        rows.append(
            {
                "impl": impl,
                "images": len(paths),
                "seconds": round(best[impl], 3),
                "img_per_s": round(len(paths) / best[impl], 1),
                "top1_agreement": agree,
            }
        )
    speed = {row["impl"]: row["img_per_s"] for row in rows}
    for row in rows:
        row["vs_hf"] = round(row["img_per_s"] / speed["hf"], 2)
        row["vs_timm"] = round(row["img_per_s"] / speed["timm"], 2)
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
    }
    if args.json:
        for row in rows:
            print(json.dumps({**row, **env}))
        return
    print(f"{len(paths)} images, batch {args.batch_size}, {env}")
    for row in rows:
        print(
            f"{row['impl']:>15}: {row['img_per_s']:8.1f} img/s  ({row['seconds']:.2f} s)  "
            f"{row['vs_hf']:.2f}x transformers  {row['vs_timm']:.2f}x timm  "
            f"top-1 agreement {row['top1_agreement']:.0%}"
        )


if __name__ == "__main__":
    main()
