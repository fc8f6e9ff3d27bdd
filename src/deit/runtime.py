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
import secrets
import shutil
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


_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) means the disk or quota is full.

    Besides ``OSError`` with ``ENOSPC``/``EDQUOT``, this recognises libraries that wrap the
    system error in their own exception and keep only its text (safetensors, for one).
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full(path: Path) -> DiskFullError:
    return DiskFullError(f"disk full while writing {path}; nothing was written")


def ensure_free_space(path: str | Path, needed: int) -> None:
    """Refuse up front, with :class:`DiskFullError`, an output of about ``needed`` bytes that
    would not fit where ``path`` goes.

    For writers that cannot fail cleanly on a full disk (PyTorch's zip writer aborts the
    process from a destructor); an estimate, so it leaves a margin of 1 MiB.
    """
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    if free < needed + 2**20:
        raise DiskFullError(
            f"disk full: {path} needs about {needed / 1e6:.1f} MB and {folder} has "
            f"{free / 1e6:.1f} MB free; nothing was written"
        )


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj``: a tensor, module, or nested dicts/lists/tuples of them."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, nn.Module):
        return tensor_bytes(obj.state_dict())
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _sibling_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary sibling of ``path`` to write to; renamed over ``path`` on success.

    The temporary file exists (empty) and has the mode a new file gets (or the mode of the
    file it replaces), which ``path`` has in the end even if the writer changed it;
    ``suffix`` ends its name, for writers that look at it. On any failure the temporary file
    is removed and ``path`` is left as it was (absent, or the previous version); a full disk
    is reported as :class:`DiskFullError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling_name(path, suffix)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # umask applies
            break
        except FileExistsError:
            continue
    os.close(fd)
    with contextlib.suppress(OSError):
        os.chmod(tmp, path.stat().st_mode & 0o7777)  # replacing a file: keep its mode
    mode = tmp.stat().st_mode & 0o7777
    try:
        yield tmp
        if tmp.stat().st_mode & 0o7777 != mode:  # safetensors recreates its files 0600
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e):
            raise _disk_full(path) from e
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary sibling folder of ``path`` to fill; renamed to ``path`` on success.

    ``path`` must be absent or an empty folder, so that the folder appears complete or not at
    all. On any failure the temporary folder is removed with everything in it; a full disk is
    reported as :class:`DiskFullError`.

    Raises:
        FileExistsError: ``path`` exists and is not an empty folder.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling_name(path, ".tmp")
        try:
            tmp.mkdir()  # the mode a new folder gets (mkdtemp's would be 0700)
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        if path.is_dir():
            path.rmdir()  # empty (checked above); rename onto a folder fails on some systems
        os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e):
            raise _disk_full(path) from e
        raise


def atomic_write(path: str | Path, write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        return write(tmp)
