"""OpenVINO's accuracy on the sample photos: fp32, bf16 and NNCF int8 against eager PyTorch.

DeiT-tiny-distilled at 224 px with timm's random initialisation (the weights `deit bench`
measures), the 8 sample photos preprocessed as the model card says. Reported per precision:
the largest logit difference, top-1 agreement and how many photos keep the same top-5 set
(random weights leave small margins between classes, so this is a hard test). int8 is
calibrated on the same photos. The speed side is `deit bench --mode openvino...`; the trained
model's accuracy on 10,000 real images is `deit quantize --engine openvino --model
fashion-mnist ... --data fashion-mnist:test --limit 0`.

    python benchmarks/bench_openvino.py [--images tests/fixtures/images]

Results are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deit.bench import reference_weights
from deit.checkpoints import as_loaded
from deit.deploy.openvino import convert_to_openvino, quantize_ir
from deit.inference import expand_paths
from deit.model import DeiT, HeadLogits
from deit.openvino_model import bf16_supported, ir_logits
from deit.transforms import PreprocessConfig, preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("tests/fixtures/images"))
    parser.add_argument("--variant", default="deit_tiny_distilled_patch16_224")
    args = parser.parse_args()
    config, state = reference_weights(args.variant)
    model = DeiT(config).eval()
    model.load_state_dict(state)
    paths = [p for p in expand_paths([args.images]) if not p.endswith(".gif")]
    pixels = preprocess(paths, PreprocessConfig.model_card())
    with torch.no_grad():
        ref = HeadLogits(model)(pixels)
    ir = convert_to_openvino(as_loaded(model))
    runs = {"fp32": ir_logits(ir, pixels)}
    if bf16_supported():
        runs["bf16"] = ir_logits(ir, pixels, "bf16")
    runs["int8"] = ir_logits(quantize_ir(ir, pixels), pixels)
    top5 = ref.topk(5).indices.sort().values
    for name, logits in runs.items():
        got = torch.from_numpy(logits)
        row = {
            "precision": name,
            "images": len(paths),
            "max_abs_logit_diff": float((got - ref).abs().max()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "same_top5_set": int((got.topk(5).indices.sort().values == top5).all(-1).sum()),
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
