"""The trained student as a run exports it: which weights, with which preprocessing, and its
out-of-distribution statistics.

``deit.train.loop.train`` calls :func:`chosen_weights`, :func:`export_student` and
:func:`fit_ood_statistics` once its epochs are done (rank 0 only), and
:func:`validate_as_exported` before they start, so that validation sees the exported model's
preprocessing. They are kept apart from the loop because they decide what is written to
``run_dir/model`` (and what inference will see), not how the model is trained; the loop
imports this module, never the other way round. ONNX / ``torch.export`` conversion of an
exported model is ``deit.deploy.export``'s.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deit.model import DeiT
from deit.saving import save_model
from deit.train.classifiers import save_classifier
from deit.train.data import Data
from deit.train.evaluate import calibrate
from deit.train.runconfig import TrainConfig
from deit.train.state import State
from deit.transforms import PreprocessConfig, preprocess_image

__all__ = [
    "OOD_FIT_LIMIT",
    "chosen_weights",
    "eval_preprocess",
    "export_student",
    "fit_ood_statistics",
    "validate_as_exported",
]

# Reaches the run's train.log through the ``deit.train`` logger (``loop._setup_logging``).
log = logging.getLogger("deit.train.exporting")


def eval_preprocess(data: Data) -> dict[str, Any]:
    """Eval preprocessing for the exported model (``deit.transforms.PreprocessConfig`` fields).

    Tensor data (Fashion-MNIST) was never resized or cropped during training: images of the
    model's size are used as they are, other images are letterboxed to it (longer side
    resized, black padding, aspect kept, as Fashion-MNIST framed its garments), and light
    backgrounds are inverted to Fashion-MNIST's black. Image
    folders get the official DeiT eval transform (shorter side to size / 0.875, center crop).
    """
    s = data.spec
    common = {
        "mean": list(s.mean),
        "std": list(s.std),
        "channels": s.in_chans,
        "source": "deit train",
    }
    if data.on_device:
        return {
            "resize_mode": "longer",
            "resize_size": s.img_size,
            "crop_size": s.img_size,
            "interpolation": "bilinear",
            "invert_light_background": True,
            **common,
        }
    return {
        "resize_mode": "shorter",
        "resize_size": int(s.img_size / data.crop_pct),
        "crop_size": s.img_size,
        "interpolation": "bicubic",
        **common,
    }


def chosen_weights(cfg: TrainConfig, st: State, run_dir: Path) -> nn.Module:
    """The weights to export: the EMA's (``run.export=ema``), the best validated epoch's
    (``best``, restored from ``best.pt`` and logged against the last epoch), or the last."""
    if cfg.run.export == "ema" and st.ema is not None:
        return st.ema.module
    best = run_dir / "best.pt"
    if cfg.run.export != "best" or not best.is_file():
        return st.model
    saved = torch.load(best, weights_only=True)
    model = copy.deepcopy(st.model)
    model.load_state_dict(saved["model"])
    epochs = [
        json.loads(x)
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"kind": "epoch"' in x
    ]
    last = epochs[-1].get("val_top1") if epochs else None
    log.info(
        "kept epoch %d of %d (val_top1 %.4g, the best of %d evaluated; the last epoch: %s): "
        "the exported model is that epoch's",
        saved["epoch"],
        st.epoch,
        saved["top1"],
        sum("val_top1" in e for e in epochs),
        f"{last:.4g}" if isinstance(last, float) else "not evaluated",
    )
    return model


def validate_as_exported(data: Data, pre: PreprocessConfig) -> None:
    """Validate image data with the exported model's preprocessing (the initial model's),
    so that the best-epoch choice is made on what inference will see.

    Reaches into the validation loader's dataset (``deit.train.data``'s transform wrapper);
    tensor data and sources without that wrapper keep their own eval transform.
    """
    dataset = getattr(data.val, "dataset", None)
    if data.on_device or dataset is None or not hasattr(dataset, "transform"):
        return
    dataset.transform = functools.partial(preprocess_image, cfg=pre)


def export_student(
    cfg: TrainConfig,
    model: nn.Module,
    st: State,
    run_dir: Path,
    data: Data,
    arch: str,
    parent: PreprocessConfig | None = None,
) -> Path:
    """Write ``model`` (the chosen weights: final / EMA / best) to ``run_dir/model``, with the
    initial model's preprocessing (``parent``, adapted to the data) when fine-tuned."""
    model = model.eval()
    pre = parent.to_dict() if parent is not None else eval_preprocess(data)
    meta = {
        "arch": arch,
        "epochs": st.epoch,
        "steps": st.step,
        "best_val_top1": st.best_top1,
        "best_epoch": st.best_epoch,
        "weights": cfg.run.export,
        "train_config": cfg.to_dict(),
    }
    out = run_dir / "model"
    if arch == "deit":
        assert isinstance(model, DeiT)
        save_model(
            model,
            out,
            labels=data.labels,
            preprocess=PreprocessConfig.from_dict(pre),
            format="deit",
            metadata=meta,
        )
    else:
        save_classifier(
            model,
            out,
            arch=arch,
            num_classes=data.num_classes,
            spec=data.spec,
            labels=data.labels,
            preprocess=pre,
            metadata=meta,
        )
    log.info("exported the %s weights to %s", cfg.run.export, out)
    return out


OOD_FIT_LIMIT = 20_000  # training images the out-of-distribution statistics are fitted on


def fit_ood_statistics(cfg: TrainConfig, model_dir: Path) -> Path | None:
    """Fit the exported student's out-of-distribution statistics (:mod:`deit.ood`) and save
    them beside its weights, so that its predictions say when an image is unlike the training
    data.

    The training images are read without augmentation, through the exported model's own
    preprocessing (what inference will see), up to :data:`OOD_FIT_LIMIT` of them; the threshold
    accepts 95% of the validation images (of a seeded 10% of the training images when there is
    no validation folder). Streamed sources (``hf``, ``webdataset``) are left to
    ``deit calibrate``, which the log says.
    """
    d = cfg.data
    fit_on: str | None
    held_out: str | None
    if d.dataset == "fashion-mnist":
        fit_on, held_out = "fashion-mnist:train", "fashion-mnist:test"
        if d.train_subset:
            fit_on = f"fashion-mnist:train[:{d.train_subset}]"
        if d.val_subset:
            held_out = f"fashion-mnist:test[:{d.val_subset}]"
        root = d.path or None
    elif d.dataset == "imagefolder" and d.path:
        fit_on, held_out, root = d.path, d.val_path or None, None
    else:
        log.info(
            "out-of-distribution statistics: not fitted on streamed or in-memory data; run "
            "`deit calibrate --model %s --data ...` to fit them",
            model_dir,
        )
        return None
    stats, folder = calibrate(
        model_dir,
        fit_on,
        val_data=held_out,
        limit=OOD_FIT_LIMIT,
        batch_size=d.eval_batch_size or 2 * d.batch_size,
        device=cfg.run.device,
        data_root=root,
        seed=cfg.run.seed,
    )
    log.info(
        "out-of-distribution statistics (%s, threshold %.4g) saved with %s: %s",
        stats.method,
        stats.threshold,
        folder,
        stats.info.get("data", ""),
    )
    return folder
