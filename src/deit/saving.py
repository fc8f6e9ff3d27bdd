"""Writing models: :func:`save_model` (our folder format, or one transformers loads) and
:func:`convert` (any checkpoint :mod:`deit.checkpoints` reads, written in another format).

Files are written next to their final names and renamed into place once complete: a new
folder appears whole or not at all, and a failed write (a full disk) leaves an existing
folder's previous files as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from deit.checkpoints import load_model, read_state_dict
from deit.hf_keys import config_to_hf, hf_to_timm, timm_to_hf
from deit.hub import WEIGHT_FILES, download, resolve_source
from deit.model import DeiT
from deit.runtime import atomic_dir, atomic_path
from deit.transforms import PreprocessConfig


def save_model(
    model: DeiT,
    out_dir: str | Path,
    *,
    labels: list[str],
    preprocess: PreprocessConfig,
    format: Literal["deit", "hf"] = "deit",
    dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a folder: ours (``deit``) or one that transformers loads (``hf``).

    The files are written next to their final names and renamed into place only once all
    of them are complete: a new folder appears whole or not at all, and an existing one keeps
    its previous files when writing fails (a full disk raises
    :class:`~deit.runtime.DiskFullError`).

    Args:
        dtype: store floating-point weights in this dtype, or per key (our key names; keys
            not listed stay as the model holds them); None keeps the model's dtypes.
    """
    from safetensors.torch import save_file

    config = model.config
    if len(labels) != config.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {config.num_classes} classes")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")

    def stored(key: str, v: Tensor) -> torch.dtype:
        if not v.is_floating_point() or dtype is None:
            return v.dtype
        return dtype.get(key, v.dtype) if isinstance(dtype, Mapping) else dtype

    state = {
        k: v.detach().to("cpu", stored(k, v)).contiguous() for k, v in model.state_dict().items()
    }
    processor = None
    if format == "deit":
        meta = {
            "format": "deit",
            "version": 1,
            "model": config.to_dict(),
            "labels": list(labels),
            "preprocess": preprocess.to_dict(),
            "metadata": metadata or {},
        }
    elif format == "hf":
        state = timm_to_hf(state, config)
        meta = config_to_hf(config, labels)
        processor = preprocess.to_hf()
    else:
        raise ValueError(f"unknown format {format!r}: use 'deit' or 'hf'")
    files = ["model.safetensors", "config.json"]
    files += ["preprocessor_config.json"] if processor is not None else []

    def write(paths: dict[str, Path]) -> None:
        if processor is not None:
            paths["preprocessor_config.json"].write_text(json.dumps(processor, indent=2))
        paths["config.json"].write_text(json.dumps(meta, indent=2))
        save_file(state, str(paths["model.safetensors"]), metadata={"format": "pt"})
        # safetensors 0.8 creates its files 0600 whatever the umask (safetensors issue #782);
        # give the weights the mode an ordinary new file gets, so other users can load them.
        os.chmod(paths["model.safetensors"], paths["config.json"].stat().st_mode & 0o777)

    if not out.exists() or not any(out.iterdir()):  # a new folder: it appears complete
        with atomic_dir(out) as tmp:
            write({name: tmp / name for name in files})
        return out
    with contextlib.ExitStack() as stack:  # an existing folder: each file replaced at the end
        write({name: stack.enter_context(atomic_path(out / name)) for name in files})
    return out


def _stored_dtypes(source: str | Path, revision: str | None) -> dict[str, torch.dtype]:
    """The dtype each weight of ``source`` is stored in, by our key names.

    Loading upcasts everything to fp32, so this reads the weights file once more.
    """
    resolved = resolve_source(source)
    if isinstance(resolved, str):
        resolved = download(resolved, revision)  # already in the cache
    if resolved.is_dir():
        weights = next((resolved / f for f in WEIGHT_FILES if (resolved / f).is_file()), None)
        if weights is None:
            return {}
        resolved = weights
    state, _ = read_state_dict(resolved)
    if any(k.startswith(("deit.", "vit.")) for k in state):
        state = hf_to_timm(state)
    return {k: v.dtype for k, v in state.items()}


def convert(
    source: str | Path,
    out_dir: str | Path,
    *,
    to: Literal["deit", "hf"],
    revision: str | None = None,
    dtype: Literal["fp32", "bf16", "fp16"] | None = None,
) -> Path:
    """Load any supported checkpoint and write it in another format.

    ``dtype`` stores the weights in that precision (``fp16`` halves the size, which is how the
    embedded model ships); None keeps the dtype each weight is stored in (loading computes in
    fp32, so this reads the source's weights file once more). The output folder appears
    complete or not at all: on a full disk nothing is left and a rerun can use the same name.
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(dtypes)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: convert writes a new one")
    loaded = load_model(source, revision=revision)
    metadata = {**loaded.metadata, "converted_from": str(loaded.source)}
    if dtype is not None:
        metadata["dtype"] = str(dtypes[dtype]).removeprefix("torch.")
    return save_model(
        loaded.model,
        out_dir,
        labels=loaded.labels,
        preprocess=loaded.preprocess,
        format=to,
        dtype=dtypes[dtype] if dtype else _stored_dtypes(source, revision),
        metadata=metadata,
    )
