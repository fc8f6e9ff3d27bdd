"""Where and how code runs: devices, precisions, optional packages, atomic file writes.

Shared by inference, training, evaluation, deployment and the benchmarks; it imports nothing
else from the package.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import importlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import nn

from deit.errors import DeiTError, MissingDependencyError, UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = (*DTYPES, "int8")

T = TypeVar("T")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; others must be available."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but CUDA is not available")
    if dev.type == "mps" and not (torch.backends.mps.is_available()):
        raise UsageError("device 'mps' requested but MPS is not available")
    return dev


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """Mixed precision for ``bf16``/``fp16`` on ``device``; nothing for ``fp32``."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def quantize_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` whose ``nn.Linear`` layers compute in int8.

    PyTorch's dynamic quantization: weights are quantized once (per tensor), activations per
    batch at run time, so no calibration data is needed. Everything else (patch embedding,
    attention, norms) stays fp32. ``deit quantize`` measures its accuracy and speed.
    """
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8
        )


def require(module: str, package: str, extra: str) -> ModuleType:
    """Import an optional dependency, or raise an error saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{module} is needed for this: pip install {package} (or pip install 'deit[{extra}]')"
        ) from e


class DiskFullError(DeiTError, OSError):
    """An output that did not fit on its disk; nothing was left behind."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write to; renamed over ``path`` on success.

    On any failure the temporary file is removed and ``path`` is left as it was (absent, or
    the previous version); a full disk is reported as :class:`DiskFullError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full while writing {path}; nothing was written") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        return write(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling, then rename)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return Path(path)
