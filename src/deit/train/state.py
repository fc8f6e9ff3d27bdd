"""Training state and its checkpoints: what ``last.pt`` holds and how a run resumes from it.

:class:`State` is everything the loop mutates; :meth:`State.state_dict` is what ``last.pt``
holds (tensors and primitives only, ``torch.load(weights_only=True)``-safe), written by
:func:`atomic_save`; :func:`read_resume_state` and :func:`resume_state` bring it back with a
one-line error that names what differs when it does not fit the run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from deit.errors import TrainingError
from deit.runtime import atomic_path, ensure_free_space, tensor_bytes
from deit.train.runconfig import TrainConfig

__all__ = ["State", "atomic_save", "new_ema", "read_resume_state", "resume_state"]


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary sibling, then rename over ``path``.

    A checkpoint that would not fit is refused before writing (PyTorch's zip writer can
    abort the process on a full disk): :class:`~deit.runtime.DiskFullError`, and the
    previous ``path`` is kept.
    """
    ensure_free_space(path, tensor_bytes(obj) * 21 // 20)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states, as tensors and primitives only."""
    np_state: Any = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


@dataclass
class State:
    """Everything the loop mutates; what a checkpoint restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    total_epochs: int = 0  # the schedule's length (cfg.schedule.epochs unless fitted to time)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    best_loss: float = math.inf  # its validation loss (breaks ties in top-1)
    best_epoch: int = -1  # the epoch whose weights best.pt holds (0: the initial model)
    at_chance: int = 0  # consecutive evaluations at chance level (not saved)

    def state_dict(self, cfg: TrainConfig) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step, "epoch": self.epoch},
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "best_top1": self.best_top1,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "total_epochs": self.total_epochs,
            "rng": rng_state(),
            "config": cfg.to_dict(),
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            KeyError: an entry is missing (not a ``last.pt`` of this loop).
            RuntimeError, ValueError: the weights or optimizer state are of another model.
        """
        missing = [k for k in ("model", "optimizer", "scaler", "ema", "rng") if k not in ckpt]
        if missing:
            raise KeyError(f"no {', '.join(missing)} entry")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.step, self.best_top1 = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
        self.total_epochs = ckpt["total_epochs"]
        self.best_epoch = int(ckpt.get("best_epoch", -1))
        self.best_loss = float(ckpt.get("best_loss", math.inf))
        set_rng_state(ckpt["rng"])


@torch.no_grad()
def new_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters and floating buffers.

    PyTorch's ``AveragedModel`` with its EMA update: ``ema = decay·ema + (1 − decay)·model``
    after each optimizer step (the first update copies the model). ``ema.module`` is the
    averaged network; its state dict (with ``n_averaged``) resumes exactly.
    """
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    return ema.eval().requires_grad_(False)


def start_afresh(path: Path) -> str:
    """What to do about an unusable ``last.pt`` (the end of a resume error)."""
    return f"delete {path} to start this run over, or start a new run with another --out (run.name)"


def read_resume_state(path: Path, device: torch.device) -> dict[str, Any]:
    """The training checkpoint ``path`` (``last.pt``), or a one-line :class:`TrainingError`."""
    if path.stat().st_size == 0:
        raise TrainingError(f"cannot resume: {path} is empty (0 bytes); {start_afresh(path)}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, garbage, or not written by this loop
        raise TrainingError(
            f"cannot resume: {path} is not a readable training checkpoint (truncated or "
            f"corrupt: {type(e).__name__}); {start_afresh(path)}"
        ) from e
    if not isinstance(ckpt, dict):
        raise TrainingError(
            f"cannot resume: {path} holds a {type(ckpt).__name__}, not a training checkpoint; "
            f"{start_afresh(path)}"
        )
    return ckpt


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def resume_state(st: State, ckpt: dict[str, Any], path: Path, cfg: TrainConfig) -> None:
    """Restore ``st`` from ``ckpt``; a mismatch is a one-line :class:`TrainingError` that names
    the settings that differ from the run's."""
    try:
        st.load(ckpt)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        saved, now = _flat(ckpt.get("config", {})), _flat(cfg.to_dict())
        differ = [k for k in now if k in saved and saved[k] != now[k]]
        detail = str(e.args[0] if isinstance(e, KeyError) and e.args else e).splitlines()
        reason = (detail[0] if detail else type(e).__name__).rstrip(":. ")
        if "loading state_dict" in reason:  # torch's multi-line list of keys and shapes
            reason = "its weights are of another architecture"
        changed = (
            f"; settings changed since it was saved: {', '.join(differ[:8])}"
            + (f" (and {len(differ) - 8} more)" if len(differ) > 8 else "")
            + ": resume with the run's own settings (its config.json)"
            if differ
            else ""
        )
        raise TrainingError(
            f"cannot resume from {path}: it does not fit this run ({reason}){changed}; or "
            f"{start_afresh(path)}"
        ) from e
