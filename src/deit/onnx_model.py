"""Exported ``.onnx`` files as models: the runner every ONNX path shares, and the loader.

``deit export`` and ``deit quantize`` write ONNX files that carry their labels,
preprocessing and config as ``deit.*`` metadata. This module reads them back: it is one more
input format beside :mod:`deit.checkpoints`, so a ``Classifier`` (and ``deit predict``,
``serve``, ``eval``) runs them like any checkpoint. Writing them is :mod:`deit.deploy`'s job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deit.checkpoints import LoadedModel
from deit.config import DeiTConfig
from deit.errors import ExportError
from deit.graph_limits import check_logits, check_onnx_graph
from deit.model import DeiT, DeiTOutput
from deit.runtime import require
from deit.transforms import PreprocessConfig

REQUIRED_METADATA = ("deit.config", "deit.labels", "deit.preprocess")


class OnnxRunner:
    """An ONNX Runtime CPU session over one file, fed with torch tensors.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (default: ONNX Runtime's choice).
        fixed_batch: the file takes one image at a time (``deit export`` without
            ``--dynamic-batch``), so batches are run image by image.
    """

    def __init__(
        self, path: str | Path, threads: int | None = None, *, fixed_batch: bool = False
    ) -> None:
        ort = require("onnxruntime", "onnxruntime", "export")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ONNX Runtime raises its own exception types for bad graphs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"ONNX Runtime cannot run {path}: {first}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.fixed_batch = fixed_batch

    def feed(self, pixel_values: Tensor) -> dict[str, np.ndarray]:
        """The session's input dict for one batch (a float32 CPU copy)."""
        return {self.input_name: pixel_values.detach().to("cpu", torch.float32).numpy()}

    def __call__(self, pixel_values: Tensor, batch_size: int | None = None) -> np.ndarray:
        """Logits (N, classes) for ``pixel_values`` (N, C, H, W), in chunks of ``batch_size``."""
        return self.run_all(pixel_values, batch_size)[0]

    def run_all(self, pixel_values: Tensor, batch_size: int | None = None) -> list[np.ndarray]:
        """Every output of the graph (logits first; then ``ood_score`` when exported with
        fitted statistics), for ``pixel_values`` in chunks of ``batch_size``."""
        size = 1 if self.fixed_batch else batch_size or len(pixel_values) or 1
        chunks = [self.session.run(None, self.feed(b)) for b in pixel_values.split(size)]
        return [np.concatenate(outs) for outs in zip(*chunks, strict=True)]


class OnnxModel(nn.Module):
    """An ``.onnx`` file of ``deit export``/``deit quantize``, run by ONNX Runtime on the CPU.

    Called like :class:`~deit.model.DeiT` for inference: it returns a :class:`DeiTOutput`
    whose ``logits`` are the file's (the head chosen at export); the per-head logits are not
    in the file, so ``cls_logits`` repeats ``logits`` and ``dist_logits`` is ``None``.
    """

    def __init__(
        self, path: str | Path, config: DeiTConfig, dynamic_batch: bool, threads: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.path = str(path)
        self.dynamic_batch = dynamic_batch
        self.runner = OnnxRunner(path, threads, fixed_batch=not dynamic_batch)

    def forward(self, pixel_values: Tensor) -> DeiTOutput:
        logits = torch.from_numpy(self.runner(pixel_values))
        check_logits(self.path, logits, len(pixel_values), self.config.num_classes)
        return DeiTOutput(logits=logits, cls_logits=logits, dist_logits=None)

    def scored(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits and the graph's out-of-distribution score (None if it has no second output)."""
        outs = self.runner.run_all(pixel_values)
        check_logits(self.path, outs[0], len(pixel_values), self.config.num_classes)
        score = torch.from_numpy(outs[1]).float().reshape(-1) if len(outs) > 1 else None
        return torch.from_numpy(outs[0]), score


def read_onnx(path: str | Path) -> Any:
    """An ``.onnx`` file's ``ModelProto``, without its external data (never read)."""
    onnx = require("onnx", "onnx", "export")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ExportError(f"cannot read {path}: not an ONNX model ({type(e).__name__})") from e


def onnx_metadata(proto: Any) -> dict[str, str]:
    """The ``deit.*`` metadata of a ``ModelProto`` ({} if none)."""
    return {p.key: p.value for p in proto.metadata_props if p.key.startswith("deit.")}


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``deit.*`` metadata of an ``.onnx`` file ({} if none); nothing is run."""
    return onnx_metadata(read_onnx(path))


def load_onnx(path: str | Path, threads: int | None = None, *, engine: bool = True) -> LoadedModel:
    """An exported ``.onnx`` file with its labels and preprocessing, ready for a ``Classifier``
    (``engine=False``: its metadata only, see :func:`shapes_only`).

    The graph is checked before ONNX Runtime compiles it (:func:`check_onnx_graph`): what its
    nodes would allocate is bounded, and its logits output must fit the metadata.

    Raises:
        ExportError: The file is missing, unreadable, carries no ``deit.*`` metadata, or its
            graph does not fit it.
        ResourceLimitError: a graph that would allocate past the limits.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    proto = read_onnx(path)
    meta = onnx_metadata(proto)
    config, preprocess, labels = exported_settings(meta, path, "`deit export` or `deit quantize`")
    dynamic = meta.get("deit.dynamic_batch", "false") == "true"
    if engine:
        check_onnx_graph(proto, path, config)
    del proto  # ONNX Runtime reads the file itself
    model = OnnxModel(path, config, dynamic, threads) if engine else shapes_only(config)
    return LoadedModel(
        model=model,  # type: ignore[arg-type]
        config=config,
        preprocess=preprocess,
        labels=labels,
        source=str(path),
        format="onnx",
        metadata={k: v for k, v in meta.items() if k not in ("deit.labels", "deit.config")},
    )


def shapes_only(config: DeiTConfig) -> DeiT:
    """The DeiT an exported file's metadata describes, on the meta device: its parameters'
    shapes (what ``deit info`` counts) and no memory; nothing of the file is compiled."""
    with torch.device("meta"):
        return DeiT(config)


def exported_settings(
    meta: dict[str, str], path: Path, writer: str
) -> tuple[DeiTConfig, PreprocessConfig, list[str]]:
    """The config, preprocessing and labels an exported file (ONNX, OpenVINO) carries in its
    ``deit.*`` metadata, checked like a checkpoint's: one label per class.

    Raises:
        ExportError: missing or malformed metadata (``writer`` says what writes it).
    """
    if not set(REQUIRED_METADATA) <= set(meta):
        raise ExportError(
            f"{path} has no deit metadata: export it with {writer} to run it with labels "
            "and preprocessing"
        )
    try:
        config = DeiTConfig.from_dict(json.loads(meta["deit.config"]))
        preprocess = PreprocessConfig.from_dict(json.loads(meta["deit.preprocess"]))
        labels: Any = json.loads(meta["deit.labels"])
    except (ValueError, TypeError, KeyError) as e:
        raise ExportError(f"{path}: malformed deit metadata: {e}") from e
    if not isinstance(labels, list) or len(labels) != config.num_classes:
        count = len(labels) if isinstance(labels, list) else "no list of"
        raise ExportError(
            f"{path}: its metadata has {count} labels for {config.num_classes} classes"
        )
    return config, preprocess, [str(label) for label in labels]
