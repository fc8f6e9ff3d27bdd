"""Prediction: load a model once, classify many images.

Example:
    >>> from deit import Classifier
    >>> clf = Classifier.from_pretrained("fashion-mnist")
    >>> clf.predict(["shoe.png", "shirt.jpg"], top_k=3)[0][0].label
    'Ankle boot'
"""

from __future__ import annotations

import copy
import glob
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deit.checkpoints import DEFAULT_MODEL, LoadedModel, load_model
from deit.onnx_model import load_onnx
from deit.runtime import DTYPES, PRECISIONS, quantize_int8, resolve_device
from deit.transforms import (
    IMAGE_EXTENSIONS,
    ImageLike,
    ImageLoadError,
    load_image,
    preprocess,
    preprocess_image,
)


@dataclass(frozen=True)
class Prediction:
    """One class and its probability."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class FileResult:
    """The outcome for one input file: its top-k predictions, or why it failed."""

    path: str
    predictions: list[Prediction]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "predictions": [asdict(p) for p in self.predictions],
            "error": self.error,
        }


def load_any(source: str | Path = DEFAULT_MODEL, **load_kwargs: Any) -> LoadedModel:
    """:func:`deit.checkpoints.load_model`, or for an ``.onnx`` file of ``deit export`` /
    ``deit quantize`` :func:`deit.onnx_model.load_onnx` (the file carries its own settings)."""
    if str(source).endswith(".onnx"):
        unused = {k: v for k, v in load_kwargs.items() if v not in (None, "auto")}
        if unused:
            raise ValueError(f"an ONNX file carries its own settings; drop {sorted(unused)}")
        return load_onnx(source)
    return load_model(source, **load_kwargs)


def expand_paths(inputs: Iterable[str | Path]) -> list[str]:
    """Files as given, folders searched recursively for images, globs expanded (sorted).

    A name that matches nothing is kept, so that it is reported as an error later.
    """
    out: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out.extend(
                sorted(
                    str(f)
                    for f in p.rglob("*")
                    if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                )
            )
        elif not p.exists() and glob.has_magic(str(item)):
            matches = sorted(glob.glob(str(p), recursive=True))
            out.extend(matches or [str(item)])
        else:
            out.append(str(item))
    return out


def prepare_model(
    model: nn.Module, device: torch.device, precision: str = "fp32", compile: bool = False
) -> nn.Module:
    """``model`` ready for inference on ``device``, in ``precision``, optionally compiled.

    ``bf16``/``fp16`` cast a copy of the weights (inputs are cast to match); ``int8`` runs
    the linear layers of a copy in int8 on the CPU (:func:`quantize_int8`); ``fp32`` moves
    ``model`` itself. ``compile`` applies ``torch.compile``, which fuses the element-wise work
    around the matrix products; on CUDA it also captures CUDA graphs (mode ``max-autotune``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError("precision int8 runs on the CPU only; on a GPU use bf16 or fp16")
        model = quantize_int8(model)
    elif precision != "fp32":  # a copy: the fp32 model stays the reference (and explains)
        model = copy.deepcopy(model).to(device=device, dtype=DTYPES[precision]).eval()
    else:
        model = model.to(device).eval()
    if compile:
        model = torch.compile(model, mode="max-autotune" if device.type == "cuda" else None)
    return model


class Classifier:
    """A loaded model with its preprocessing and labels, ready to classify images.

    ``precision`` (``fp32``, ``bf16``, ``fp16`` or CPU-only ``int8``) and ``compile`` pick a
    faster path (see :func:`prepare_model`); the fp32 eager model is the reference.
    ``fast_decode`` lets large JPEGs decode at reduced size (faster, approximate; see
    :func:`deit.transforms.load_image`).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "auto",
        *,
        precision: str = "fp32",
        compile: bool = False,
        fast_decode: bool = False,
    ) -> None:
        self.loaded = loaded
        self.device = resolve_device(device)
        self.precision = precision
        self.fast_decode = fast_decode
        as_exported = self.device.type == "cpu" and precision == "fp32" and not compile
        if loaded.format == "onnx" and not as_exported:
            raise ValueError(
                "an ONNX model runs as exported, on the CPU: drop --device/--precision/--compile "
                "(for int8, pass the file `deit quantize` wrote)"
            )
        self.model = prepare_model(loaded.model, self.device, precision, compile)
        self.input_dtype = DTYPES.get(precision, torch.float32)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = DEFAULT_MODEL,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        compile: bool = False,
        fast_decode: bool = False,
        **load_kwargs: Any,
    ) -> Classifier:
        """Load any checkpoint :func:`deit.checkpoints.load_model` reads, or an ``.onnx`` file
        of ``deit export``/``deit quantize`` (run by ONNX Runtime on the CPU, with the labels
        and preprocessing stored in the file)."""
        loaded = load_any(source, **load_kwargs)
        if loaded.format == "onnx" and str(device) == "auto":
            device = "cpu"
        return cls(loaded, device, precision=precision, compile=compile, fast_decode=fast_decode)

    @property
    def labels(self) -> list[str]:
        return self.loaded.labels

    @torch.inference_mode()
    def logits(self, pixel_values: Tensor) -> Tensor:
        """Inference logits (B, classes) of preprocessed images (B, C, H, W)."""
        x = pixel_values.to(self.device, self.input_dtype, non_blocking=True)
        return self.model(x).logits.float().cpu()

    def topk(self, logits: Tensor, top_k: int = 5) -> list[list[Prediction]]:
        """Softmax probabilities' top-k for each row of ``logits``."""
        k = max(1, min(top_k, logits.shape[-1]))
        scores, indices = logits.softmax(dim=-1).topk(k, dim=-1)
        return [
            [Prediction(int(i), self.labels[int(i)], float(s)) for s, i in zip(srow, irow)]
            for srow, irow in zip(scores.tolist(), indices.tolist())
        ]

    def predict(
        self, images: ImageLike | Sequence[ImageLike], top_k: int = 5, batch_size: int = 32
    ) -> list[list[Prediction]]:
        """Classify images (paths, PIL images, arrays or tensors); one list per image.

        Raises:
            ImageLoadError: an input can't be read as an image.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        results: list[list[Prediction]] = []
        for start in range(0, len(images), batch_size):
            batch = preprocess(
                list(images[start : start + batch_size]),
                self.loaded.preprocess,
                fast_decode=self.fast_decode,
            )
            results.extend(self.topk(self.logits(batch), top_k))
        return results

    def _load(self, path: str) -> Tensor | str:
        """Preprocessed tensor of one file, or the reason it can't be read."""
        try:
            img = load_image(path, fast_decode=self.fast_decode)
            return preprocess_image(img, self.loaded.preprocess)
        except ImageLoadError as e:
            return str(e)
        except OSError as e:  # e.g. permission denied, a directory passed as a file
            return f"cannot read file: {e.strerror or e}"

    def predict_files(
        self,
        paths: Sequence[str],
        *,
        top_k: int = 5,
        batch_size: int = 32,
        workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[FileResult]:
        """Classify files in order, decoding in a thread pool; bad files yield an error.

        Results come back in input order as soon as each batch is done. At most two batches
        are decoded ahead, so memory stays bounded however many paths are given.
        """
        from tqdm import tqdm

        workers = workers or min(8, os.cpu_count() or 1)
        bar = tqdm(total=len(paths), unit="img", disable=not progress, leave=False)
        pool = ThreadPoolExecutor(max_workers=workers)
        ahead: deque[Future[Tensor | str]] = deque()
        todo = iter(paths)
        try:
            batch: list[tuple[str, Tensor]] = []
            for path in paths:
                while len(ahead) < 2 * batch_size and (nxt := next(todo, None)) is not None:
                    ahead.append(pool.submit(self._load, nxt))
                item = ahead.popleft().result()
                if isinstance(item, str):
                    yield from self._flush(batch, top_k, bar)
                    batch = []
                    bar.update(1)
                    yield FileResult(path, [], item)
                    continue
                batch.append((path, item))
                if len(batch) == batch_size:
                    yield from self._flush(batch, top_k, bar)
                    batch = []
            yield from self._flush(batch, top_k, bar)
        finally:  # also when the caller stops early
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _flush(self, batch: list[tuple[str, Tensor]], top_k: int, bar: Any) -> Iterator[FileResult]:
        if not batch:
            return
        pixels = torch.stack([t for _, t in batch])
        if self.device.type == "cuda":  # page-locked, so the copy overlaps with the host
            pixels = pixels.pin_memory()
        logits = self.logits(pixels)
        for (path, _), preds in zip(batch, self.topk(logits, top_k)):
            bar.update(1)
            yield FileResult(path, preds)
