"""Training and distillation: ``train(cfg) -> run_dir``, for DeiT students and plain classifiers.

Sections, top to bottom: setup (devices, processes, run directory) → data → student and
teacher → optimizer (its groups and learning-rate schedule: ``deit.train.schedule``) → the
epoch loop and the best epoch (the rule: ``deit.train.selection``; the state it mutates and its
checkpoints, exact resume included: ``deit.train.state``) → the entry point, which leaves
the export (which weights, ``model/``, its out-of-distribution statistics) to
``deit.train.exporting``. The same loop
trains a DeiT (outputs ``DeiTOutput``) and any CNN (outputs a tensor), so a teacher can be
trained first with the same command. Recipe defaults: ``deit.train.runconfig``; formulas:
the paper and facebookresearch/deit ``main.py``; the how-to: ``docs/training.md``.

Run directory layout: ``config.json`` (resolved config), ``metrics.jsonl`` (one JSON object per
log interval and per epoch), ``train.log``, ``last.pt`` / ``best.pt`` (atomic training
checkpoints, ``torch.load(weights_only=True)``-safe), ``model/`` (the exported student),
``tb/`` (TensorBoard, when installed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deit.model import DeiT
from deit.runtime import atomic_write, autocast, resolve_device
from deit.train.data import BadSample, Data, DeviceBatches, build_data
from deit.train.evaluate import evaluate_batches
from deit.train.exporting import (
    chosen_weights,
    export_student,
    fit_ood_statistics,
    validate_as_exported,
)
from deit.train.finetune import describe, inherited_preprocess, resolve
from deit.train.losses import DistillationLoss
from deit.train.metrics import MetricsWriter
from deit.train.probe import linear_probe, new_rows
from deit.train.runconfig import TrainConfig, save_config
from deit.train.schedule import fit_to_time, lr_at, param_groups, total_epochs
from deit.train.selection import (
    START_MARGIN_SE,
    at_chance,
    chance_warning,
    is_better,
    start_margin,
)
from deit.train.state import State, atomic_save, new_ema, read_resume_state, resume_state
from deit.train.student import build_student
from deit.train.teachers import load_teacher

__all__ = ["train"]

log = logging.getLogger("deit.train.loop")


# --------------------------------------------------------------------------- setup


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the ``torchrun`` process group if there is one; return (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_dir(cfg: TrainConfig, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    what = f"finetune-{Path(cfg.model.init).name}" if cfg.model.init else cfg.model.name
    name = cfg.run.name or f"{what}-{cfg.distill.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.out_dir) / name.replace(":", "_")


def _setup_logging(run_dir: Path, rank: int) -> None:
    """``run_dir/train.log`` receives what every ``deit.train`` module logs during the run
    (the previous run's file, in the same process, stops receiving it)."""
    package = logging.getLogger("deit.train")
    if rank != 0 or any(getattr(h, "_deit_run", None) == str(run_dir) for h in package.handlers):
        return
    for old in [h for h in package.handlers if hasattr(h, "_deit_run")]:
        package.removeHandler(old)
        old.close()
    handler = logging.FileHandler(run_dir / "train.log")
    handler._deit_run = str(run_dir)  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


# --------------------------------------------------------------------------- loop


def _mixup(cfg: TrainConfig, num_classes: int) -> Any:
    a = cfg.augment
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        prob=a.mixup_prob,
        switch_prob=a.mixup_switch_prob,
        label_smoothing=a.label_smoothing,
        num_classes=num_classes,
    )


def _batches(data: Data, device: torch.device, bad: list[Any]) -> Any:
    """(x, y) on the device from either kind of loader; bad samples go to ``bad``."""
    for batch in data.train:
        if isinstance(data.train, DeviceBatches):
            yield batch
            continue
        x, y, skipped = batch
        bad.extend(skipped)
        if len(y):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class Loop:
    """The fixed parts of a run that ``train_one_epoch`` needs."""

    cfg: TrainConfig
    data: Data
    forward: nn.Module  # possibly compiled / DDP-wrapped student
    criterion: DistillationLoss
    mixup: Any
    base_lr: float
    device: torch.device
    rank: int
    metrics: MetricsWriter


def train_one_epoch(loop: Loop, st: State) -> dict[str, Any]:
    """One pass over the training data; returns the epoch's training metrics."""
    cfg, dev = loop.cfg, loop.device
    loop.forward.train()
    for source in (loop.data.train, getattr(loop.data.train, "sampler", None)):
        set_epoch = getattr(source, "set_epoch", None)  # DeviceBatches, RepeatAugSampler
        if set_epoch is not None:
            set_epoch(st.epoch)
    steps = len(loop.data.train)
    if steps == 0:
        raise ValueError(
            f"no full training batch: {cfg.data.batch_size} images per batch per process, "
            "more than the training set has; lower data.batch_size"
        )
    loss_sum, bad_step = torch.zeros((), device=dev), torch.full((), -1, device=dev)
    seen, t0 = 0, time.perf_counter()
    bad: list[BadSample] = []
    bar = _progress(steps, st.epoch, cfg, loop.rank)
    for i, (x, y) in enumerate(_batches(loop.data, dev, bad)):
        lr, heads_only = _set_lr(loop, st, st.epoch + i / steps)
        loss, n = _step(loop, st, x, y, heads_only)
        d = loss.detach().float()
        bad_step = torch.where((~torch.isfinite(d)) & (bad_step < 0), st.step, bad_step)
        loss_sum += d
        seen += n
        st.step += 1
        if bar is not None:
            bar.update(1)
        if (i + 1) % cfg.run.log_every == 0 or i + 1 == steps:
            _check_finite(bad_step, st.epoch)
            rate = seen * _world() / (time.perf_counter() - t0)
            loop.metrics.write(
                {
                    "kind": "train",
                    "epoch": st.epoch,
                    "step": st.step,
                    "lr": lr,
                    "heads_only": heads_only,
                    "loss": d.item(),
                    "img_per_s": rate,
                }
            )
            if bar is not None:
                bar.set_postfix(loss=f"{d.item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        if cfg.run.max_steps and st.step >= cfg.run.max_steps:
            break
    _check_finite(bad_step, st.epoch)
    if bar is not None:
        bar.close()
    if seen == 0:
        raise ValueError(f"epoch {st.epoch}: no training image could be read")
    if bad:
        log.warning(
            "epoch %d: skipped %d unreadable images, e.g. %s (%s)",
            st.epoch,
            len(bad),
            bad[0].path,
            bad[0].reason,
        )
    elapsed = time.perf_counter() - t0
    return {
        "train_loss": (loss_sum / max(i + 1, 1)).item(),
        "epoch_time": elapsed,
        "img_per_s": seen * _world() / elapsed,
        "bad_samples": len(bad),
        "lr": lr,
    }


def _set_lr(loop: Loop, st: State, t: float) -> tuple[float, bool]:
    """Set every group's rate at epoch position ``t``; return the base one and whether only
    the heads train: during the head warm-up the base lr, then the schedule over the rest."""
    head_phase = loop.cfg.schedule.head_warmup_epochs
    heads_only = t < head_phase
    lr = (
        loop.base_lr
        if heads_only
        else lr_at(t - head_phase, loop.cfg, loop.base_lr, st.total_epochs - head_phase)
    )
    for group in st.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr, heads_only


def _step(loop: Loop, st: State, x: Tensor, y: Tensor, heads_only: bool) -> tuple[Tensor, int]:
    """One optimizer step on the batch ``(x, y)``: its loss and how many images it used
    (mixup pairs images, so an odd batch drops its last one)."""
    cfg = loop.cfg
    targets = y
    if loop.mixup is not None:
        if len(y) % 2:
            x, y = x[:-1], y[:-1]
        x, targets = loop.mixup(x, y)
    with autocast(loop.device, cfg.run.precision):
        loss = loop.criterion(x, loop.forward(x), targets)
    st.optimizer.zero_grad(set_to_none=True)
    st.scaler.scale(loss).backward()
    if heads_only:  # no gradient: AdamW skips these parameters (no moments, no decay)
        for group in st.optimizer.param_groups:
            if not group.get("head"):
                for p in group["params"]:
                    p.grad = None
    if cfg.optim.clip_grad > 0:
        st.scaler.unscale_(st.optimizer)
        nn.utils.clip_grad_norm_(st.model.parameters(), cfg.optim.clip_grad)
    st.scaler.step(st.optimizer)
    st.scaler.update()
    if st.ema is not None:
        st.ema.update_parameters(st.model)
    return loss, len(y)


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_finite(bad_step: Tensor, epoch: int) -> None:
    step = int(bad_step.item())
    if step >= 0:
        raise FloatingPointError(
            f"loss became NaN/inf at epoch {epoch}, step {step}; lower the learning rate, use "
            "bf16 instead of fp16, or set optim.clip_grad"
        )


def _progress(steps: int, epoch: int, cfg: TrainConfig, rank: int) -> Any:
    if not cfg.run.progress or rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch}", leave=False, mininterval=1.0)


def _evaluate(loop: Loop, model: nn.Module) -> dict[str, float]:
    report = evaluate_batches(
        model,
        loop.data.val,
        device=loop.device,
        precision=loop.cfg.run.precision,
        num_classes=loop.data.num_classes,
    )
    record = {f"val_{k}": v for k, v in report.items() if isinstance(v, float)}
    record["val_samples"] = float(report["num_samples"])
    return record


# --------------------------------------------------------------------------- entry point


def train(
    cfg: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    train_data: torch.utils.data.Dataset | None = None,
    val_data: torch.utils.data.Dataset | None = None,
    labels: list[str] | None = None,
) -> Path:
    """Train (and distill) a model as ``cfg`` says; return the run directory.

    Args:
        cfg: the resolved run configuration.
        out_dir: run directory (default ``cfg.run.out_dir / cfg.run.name``).
        resume: continue from ``out_dir/last.pt`` when it exists.
        train_data, val_data: any datasets yielding ``(PIL image or tensor, label)`` to use
            instead of ``cfg.data`` (see ``deit.train.data``); ``labels`` names their classes.

    Returns:
        The run directory; the trained model is in ``run_dir/model``.
    """
    cfg.validate()
    loaded = resolve(cfg, train_data, labels)  # fine-tuning defaults, data config, schedule
    owns_group = not torch.distributed.is_initialized()
    rank, world, dev = setup_distributed(cfg.run.device)
    seed_everything(cfg.run.seed + rank)
    torch.backends.cudnn.benchmark = not cfg.run.deterministic
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_dir = _run_dir(cfg, out_dir)
    last = run_dir / "last.pt"
    if last.is_file() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run ({last.name}): --resume continues it; "
            "another --out starts afresh"
        )
    # Read before anything in the run directory changes: an unusable last.pt stops here.
    ckpt = read_resume_state(last, dev) if resume and last.is_file() else None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None:  # a fresh start: no curves of an earlier, unsaved attempt
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        _setup_logging(run_dir, rank)
        for text in cfg.notes:
            log.info("config: %s", text)
    if train_data is None and cfg.data.dataset in ("hf", "webdataset"):
        from deit.train.sources import build_source_data  # datasets / webdataset (deit[data])

        data = build_source_data(cfg, dev, rank, world)
    else:
        data = build_data(cfg, dev, rank, world, train_data, val_data, labels)
    parent = inherited_preprocess(loaded.preprocess, data.spec) if loaded is not None else None
    if parent is not None:
        validate_as_exported(data, parent)
    model, arch = build_student(cfg, data.num_classes, data.spec, log, data.labels, loaded)
    cfg.student = _describe(cfg, model, arch)
    if rank == 0 and ckpt is None:
        atomic_write(run_dir / "config.json", lambda tmp: save_config(cfg, tmp))
    model.to(dev)
    loop, st = _prepare(cfg, data, model, dev, rank, world, run_dir)
    if ckpt is not None:
        resume_state(st, ckpt, last, cfg)
        if rank == 0:  # only now: a resume that fails leaves the run's config.json alone
            atomic_write(run_dir / "config.json", lambda tmp: save_config(cfg, tmp))
        log.info("resumed from %s at epoch %d, step %d", last, st.epoch, st.step)
    else:
        if resume:
            log.warning("--resume: no %s yet, so this run starts from the beginning", last)
        _before_training(loop, st, run_dir, loaded)
    with _compile_fallback(cfg.run.compile):
        _run_epochs(loop, st, run_dir)
    if rank == 0:
        model = chosen_weights(cfg, st, run_dir)  # the best epoch's, with run.export=best
        out = export_student(cfg, model, st, run_dir, data, arch, parent)
        if arch == "deit":
            fit_ood_statistics(cfg, out)
    loop.metrics.close()
    if world > 1:
        torch.distributed.barrier()  # the export is on disk before any rank returns
        if owns_group:
            torch.distributed.destroy_process_group()
    return run_dir


def _describe(cfg: TrainConfig, model: nn.Module, arch: str) -> str:
    """What ``cfg.student`` says: the architecture actually trained."""
    n = sum(p.numel() for p in model.parameters())
    if isinstance(model, DeiT):
        return describe(model.config, n, init=cfg.model.init, name=cfg.model.name)
    origin = f"fine-tuned from {cfg.model.init}: " if cfg.model.init else ""
    return f"{origin}{arch} ({n / 1e6:.2f}M parameters)"


def _compile_fallback(compiled: bool) -> AbstractContextManager[Any]:
    """While a compiled model trains, a compile failure falls back to eager (not process-wide)."""
    if not compiled:
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(suppress_errors=True)


def _prepare(
    cfg: TrainConfig,
    data: Data,
    model: nn.Module,
    dev: torch.device,
    rank: int,
    world: int,
    run_dir: Path,
) -> tuple[Loop, State]:
    base_lr = (
        cfg.optim.lr
        if cfg.optim.lr is not None
        else (cfg.optim.base_lr * cfg.data.batch_size * world / 512)
    )
    groups = param_groups(
        model,
        cfg.optim.weight_decay,
        cfg.optim.layer_decay,
        split_heads=cfg.schedule.head_warmup_epochs > 0,
        head_lr_scale=cfg.optim.head_lr_scale,
    )
    optimizer = torch.optim.AdamW(
        groups,
        lr=base_lr,
        betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
        eps=cfg.optim.eps,
        fused=cfg.optim.fused or None,
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.run.precision == "fp16")
    ema = new_ema(model, cfg.run.ema_decay) if cfg.run.ema else None
    teacher = _teacher(cfg, data, dev)
    criterion = DistillationLoss(
        teacher,
        cfg.distill.kind,
        cfg.distill.alpha,
        cfg.distill.tau,
        label_smoothing=cfg.augment.label_smoothing,
    )
    forward: nn.Module = model
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    if cfg.run.compile:
        forward = torch.compile(forward, mode=cfg.run.compile_mode)  # type: ignore[assignment]
    log.info(
        "student %s: %.2fM parameters (%.2fM trained), base lr %.3g, %d process(es), device %s",
        cfg.student or cfg.model.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        base_lr,
        world,
        dev,
    )
    metrics = MetricsWriter(run_dir, rank == 0)
    loop = Loop(
        cfg, data, forward, criterion, _mixup(cfg, data.num_classes), base_lr, dev, rank, metrics
    )
    return loop, State(model, optimizer, scaler, ema, total_epochs=total_epochs(cfg, data))


def _teacher(cfg: TrainConfig, data: Data, dev: torch.device) -> nn.Module | None:
    if cfg.distill.kind == "none":
        return None
    d = cfg.distill
    teacher = load_teacher(
        d.teacher,
        student=data.spec,
        num_classes=data.num_classes,
        device=dev,
        mean=d.teacher_mean,
        std=d.teacher_std,
        img_size=d.teacher_img_size,
        in_chans=d.teacher_in_chans,
        trust_code=d.trust_code,
    )
    log.info(
        "teacher %s (%s distillation, alpha %.2f, tau %.2f), input %s",
        d.teacher,
        d.kind,
        d.alpha,
        d.tau,
        teacher.spec,
    )
    return teacher


def _agree_max(device: torch.device, *values: float) -> list[float]:
    """The largest of each value over all processes (the values as given in one process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _run_epochs(loop: Loop, st: State, run_dir: Path) -> None:
    cfg, start = loop.cfg, time.perf_counter()
    durations: list[float] = []
    while st.epoch < st.total_epochs:
        t0 = time.perf_counter()
        record = train_one_epoch(loop, st)
        st.epoch += 1
        now = time.perf_counter()
        elapsed, last = _agree_max(loop.device, now - start, now - t0)  # same decision on all ranks
        durations.append(last)
        stop = bool(cfg.run.max_steps and st.step >= cfg.run.max_steps)
        stop = fit_to_time(cfg, st, elapsed, durations) or stop
        final = stop or st.epoch >= st.total_epochs
        if (cfg.run.eval_every and st.epoch % cfg.run.eval_every == 0) or final:
            record.update(_evaluate(loop, st.model))
            if st.ema is not None:
                record["val_ema_top1"] = _evaluate(loop, st.ema.module)["val_top1"]
        if loop.rank == 0:
            _end_of_epoch(loop, st, run_dir, record, final)
        if stop:
            break


def _end_of_epoch(
    loop: Loop, st: State, run_dir: Path, record: dict[str, Any], final: bool
) -> None:
    cfg = loop.cfg
    top1 = record.get("val_top1", -1.0)
    if "val_top1" in record:
        _warn_at_chance(loop, st, top1)
    loss = record.get("val_loss", math.inf)
    margin = start_margin(st.best_top1, record.get("val_samples", 0.0)) if st.best_epoch == 0 else 0
    if is_better(top1, loss, st.best_top1, st.best_loss, margin):
        st.best_top1, st.best_loss, st.best_epoch = top1, loss, st.epoch
        if cfg.run.export == "best":
            atomic_save(
                {"model": st.model.state_dict(), "epoch": st.epoch, "top1": top1},
                run_dir / "best.pt",
            )
    elif top1 > st.best_top1:
        log.info(
            "epoch %d: validation top-1 %.2f%% is above the starting model's %.2f%% by less "
            "than %.2f points (%g standard errors on %d images): the starting model stays",
            st.epoch,
            100 * top1,
            100 * st.best_top1,
            100 * margin,
            START_MARGIN_SE,
            record.get("val_samples", 0),
        )
    if final or st.epoch % max(cfg.run.save_every, 1) == 0:
        atomic_save(st.state_dict(cfg), run_dir / "last.pt")
    loop.metrics.write({"kind": "epoch", "epoch": st.epoch, "step": st.step, **record})
    log.info(
        "epoch %d/%d%s: %s%s",
        st.epoch,
        st.total_epochs,
        " (before training)" if st.epoch == 0 else "",
        ", ".join(f"{k} {v:.4g}" for k, v in record.items()),
        " (best so far)" if st.best_epoch == st.epoch and top1 >= 0 else "",
    )


def _warn_at_chance(loop: Loop, st: State, top1: float) -> None:
    """Warn once validation has stayed at chance for two evaluated epochs in a row."""
    chance = 1.0 / max(loop.data.num_classes, 1)
    st.at_chance = st.at_chance + 1 if st.epoch > 0 and at_chance(top1, chance) else 0
    if st.at_chance == 2:
        steps = len(loop.data.train) if hasattr(loop.data.train, "__len__") else None
        log.warning(
            chance_warning(
                top1,
                loop.data.num_classes,
                loop.base_lr,
                steps,
                loop.cfg.data.batch_size,
                loop.data.spec.in_chans,
                loop.data.spec.img_size,
            )
        )


def _before_training(loop: Loop, st: State, run_dir: Path, loaded: Any) -> None:
    """A fresh run's start: the linear probe (LP-FT) when a fine-tuned model has new head rows
    (a model trained from scratch has only random features to probe: ``linear_probe=on``
    forces it), then, when fine-tuning (or not training at all), the starting model evaluated
    as epoch 0, so the best-epoch choice can keep it."""
    cfg, model = loop.cfg, st.model
    old = (getattr(loaded, "labels", None) or []) if cfg.model.init else None
    fresh = new_rows(loop.data.labels, old)
    probe = cfg.schedule.linear_probe
    auto = probe == "auto" and bool(cfg.model.init) and bool(fresh)
    if isinstance(model, DeiT) and (probe == "on" or auto):
        rows = fresh or list(range(loop.data.num_classes))
        result = linear_probe(model, _batches(loop.data, loop.device, []), rows)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            heads = [m for m in (model.head, model.head_dist) if m is not None]
            for p in (p for m in heads for p in m.parameters()):  # each rank fitted its shard:
                torch.distributed.broadcast(p.data, 0)  # all take rank 0's heads
        log.info("%s", result)
    elif probe == "on":
        log.warning("schedule.linear_probe=on needs a DeiT student: skipped")
    if cfg.model.init or st.total_epochs == 0:
        record = _evaluate(loop, model)
        if loop.rank == 0:
            _end_of_epoch(loop, st, run_dir, record, final=st.total_epochs == 0)


# --------------------------------------------------------------------------- CLI
