"""Prediction: load a model once, classify many images.

Example:
    >>> from deit import Classifier
    >>> clf = Classifier.from_pretrained("fashion-mnist")
    >>> clf.predict(["shoe.png", "shirt.jpg"], top_k=3)[0][0].label
    'Ankle boot'
"""

from __future__ import annotations

import copy
import fnmatch
import glob
import logging
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
from deit.errors import ImageLoadError, MissingDependencyError, NonFiniteOutputError, UsageError
from deit.images import IMAGE_EXTENSIONS, ImageLike, load_image
from deit.onnx_model import load_onnx
from deit.ood import UNCALIBRATED, Calibration, OODResult, msp_score
from deit.ood_file import exported_calibration, find_stats
from deit.openvino_model import OpenVinoModel, load_openvino
from deit.runtime import DTYPES, PRECISIONS, quantize_int8, resolve_device
from deit.transforms import preprocess, preprocess_image

log = logging.getLogger("deit.inference")


@dataclass(frozen=True)
class Prediction:
    """One class and its probability."""

    index: int
    label: str
    score: float


class Predictions(list[Prediction]):
    """One image's top-k :class:`Prediction` list, with its out-of-distribution verdict
    ``ood`` (:class:`deit.ood.OODResult`: score, unusual, method)."""

    def __init__(self, predictions: Iterable[Prediction], ood: OODResult) -> None:
        super().__init__(predictions)
        self.ood = ood


@dataclass(frozen=True)
class FileResult:
    """The outcome for one input file: its top-k predictions, or why it failed."""

    path: str
    predictions: list[Prediction]
    error: str | None = None
    ood: OODResult | None = None  # None for a file that failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "predictions": [asdict(p) for p in self.predictions],
            "ood": self.ood.to_dict() if self.ood is not None else None,
            "error": self.error,
        }


EXPORTED_SUFFIXES = {".onnx": "ONNX", ".xml": "OpenVINO"}  # files that carry their settings
NON_FINITE = "not a finite number (NaN or infinity: corrupt weights, or an overflow)"


def finite_rows(logits: Tensor) -> list[bool]:
    """Whether each row of ``logits`` is finite: a NaN is an error, never a ``nan%`` score."""
    return [bool(ok) for ok in torch.isfinite(logits).all(dim=-1).tolist()]


def load_any(
    source: str | Path = DEFAULT_MODEL, *, engine: bool = True, **load_kwargs: Any
) -> LoadedModel:
    """:func:`deit.checkpoints.load_model`, or for a file of ``deit export`` / ``deit quantize``
    its engine's loader: :func:`deit.onnx_model.load_onnx` for ``.onnx``,
    :func:`deit.openvino_model.load_openvino` for an OpenVINO ``.xml`` (such files carry their
    own labels and preprocessing). ``engine=False`` reads an exported file's metadata only:
    nothing is compiled, and its model is the DeiT of its config on the meta device."""
    suffix = Path(str(source)).suffix.lower()
    if suffix in EXPORTED_SUFFIXES:
        unused = {k: v for k, v in load_kwargs.items() if v not in (None, "auto")}
        if unused:
            raise UsageError(
                f"an exported {EXPORTED_SUFFIXES[suffix]} file carries its own settings; "
                f"drop {sorted(unused)}"
            )
        if suffix == ".onnx":
            return load_onnx(source, engine=engine)
        return load_openvino(source, engine=engine)
    return load_model(source, **load_kwargs)


MAX_EXPANDED_PATHS = 1_000_000  # files one folder or glob may expand to
MAX_WALKED_DIRS = 1_000_000  # folders one folder or glob may search


def _walk_images(folder: str) -> list[str]:
    """Image files under ``folder``, recursively; a symlinked folder is searched once."""
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop (loop -> .), or a second link to the same folder
            dirnames.clear()
            continue
        seen.add(real)
        if len(seen) > MAX_WALKED_DIRS:
            raise UsageError(f"{folder} holds more than {MAX_WALKED_DIRS} folders: narrow it")
        dirnames.sort()
        found.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if Path(f).suffix.lower() in IMAGE_EXTENSIONS
            and os.path.isfile(os.path.join(dirpath, f))
        )
        if len(found) > MAX_EXPANDED_PATHS:
            raise UsageError(f"{folder} holds more than {MAX_EXPANDED_PATHS} images: narrow it")
    return sorted(found)


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, sorted, without its endless symlink loops.

    Like :mod:`glob`, ``**`` matches any number of folders (symlinked ones included) and
    wildcards skip hidden names unless they start with a dot; unlike it, a folder is searched
    once per position in the pattern, so ``loop -> .`` links neither repeat matches nor make
    the search exponential, and the search is bounded.
    """
    parts = list(Path(pattern).parts)
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = str(Path(*parts[:first])) if first else ""
    rest = parts[first:]
    out: list[str] = []
    seen: set[tuple[str, int]] = set()

    def entries(folder: str) -> list[str]:
        try:
            return sorted(os.listdir(folder or "."))
        except OSError:
            return []

    def visit(folder: str, i: int) -> None:
        key = (os.path.realpath(folder or "."), i)
        if key in seen:
            return
        seen.add(key)
        if len(seen) > MAX_WALKED_DIRS or len(out) > MAX_EXPANDED_PATHS:
            raise UsageError(f"{pattern!r} matches too much (over {MAX_EXPANDED_PATHS}): narrow it")
        part, last = rest[i], i == len(rest) - 1
        if part == "**":
            if last:  # like glob: everything below, folders included
                out.extend(os.path.join(folder, n) for n in entries(folder) if n[0] != ".")
            else:
                visit(folder, i + 1)  # zero folders
            for name in entries(folder):
                sub = os.path.join(folder, name)
                if name[0] != "." and os.path.isdir(sub):
                    visit(sub, i)
            return
        if glob.has_magic(part):
            names = [
                n
                for n in entries(folder)
                if fnmatch.fnmatchcase(n, part) and (n[0] != "." or part[0] == ".")
            ]
        else:
            names = [part] if os.path.lexists(os.path.join(folder, part)) else []
        for name in names:
            path = os.path.join(folder, name)
            if last:
                out.append(path)
            elif os.path.isdir(path):
                visit(path, i + 1)

    visit(base, 0)
    return sorted(out)


def expand_paths(inputs: Iterable[str | Path]) -> list[str]:
    """Files as given, folders searched recursively for images, globs expanded (sorted).

    A name that matches nothing is kept, so that it is reported as an error later. Each file
    is listed once (by its real path), however many links or patterns lead to it; symlinked
    folders are followed, but never round a loop.

    Raises:
        UsageError: an empty path (which would otherwise mean the current folder), or a
            folder or glob that expands to more than :data:`MAX_EXPANDED_PATHS` files.
    """
    out: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        if not str(item).strip():
            raise UsageError("empty input path: give image files, folders or globs")
        p = Path(item).expanduser()
        if p.is_dir():
            found = _walk_images(str(p))
        elif not p.exists() and glob.has_magic(str(item)):
            found = _glob(str(p)) or [str(item)]
        else:
            found = [str(item)]
        for path in found:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                out.append(path)
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
        compiled = torch.compile(model, mode="max-autotune" if device.type == "cuda" else None)
        return compiled  # type: ignore[return-value]  # an OptimizedModule: still an nn.Module
    return model


class Classifier:
    """A loaded model with its preprocessing and labels, ready to classify images.

    ``precision`` (``fp32``, ``bf16``, ``fp16`` or CPU-only ``int8``) and ``compile`` pick a
    faster path (see :func:`prepare_model`); the fp32 eager model is the reference.
    ``fast_decode`` lets large JPEGs decode at reduced size (faster, approximate; see
    :func:`deit.images.load_image`). ``fast`` runs a PyTorch checkpoint on the CPU through
    OpenVINO when it is installed and its logits match (fp32: within 1e-4; ``bf16`` only when
    asked for), else PyTorch; ``engine`` says which runs.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: str | torch.device = "auto",
        *,
        precision: str = "fp32",
        compile: bool = False,
        fast_decode: bool = False,
        fast: bool = False,
    ) -> None:
        self.loaded = loaded
        self.device = resolve_device(device)
        self.precision = precision
        self.fast_decode = fast_decode
        on_cpu = self.device.type == "cpu" and not compile
        self.input_dtype = DTYPES.get(precision, torch.float32)
        self.engine: str = f"pytorch {precision}"
        # The out-of-distribution score: fitted statistics beside the weights, the score an
        # exported file computes in its graph, or the uncalibrated max softmax.
        self.ood_stats = find_stats(loaded)
        exported = exported_calibration(loaded)
        self.calibration: Calibration = (
            exported or (self.ood_stats.calibration if self.ood_stats else None) or UNCALIBRATED
        )
        self._ood_scorer = self.ood_stats.scorer() if self.ood_stats else None
        if loaded.format == "onnx" and not (on_cpu and precision == "fp32"):
            raise UsageError(
                "an ONNX model runs as exported, on the CPU: drop --device/--precision/--compile "
                "(for int8, pass the file `deit quantize` wrote)"
            )
        if loaded.format == "openvino":
            if not on_cpu or precision not in ("fp32", "bf16"):
                raise UsageError(
                    "an OpenVINO model runs on the CPU in fp32 or bf16 (int8: the file "
                    "`deit quantize --engine openvino` wrote): drop --device/--compile"
                )
            assert isinstance(loaded.model, OpenVinoModel)
            self.model: nn.Module = loaded.model.with_precision(precision)
            self.input_dtype, self.engine = torch.float32, f"openvino {precision}"
            return
        if loaded.format == "onnx":
            self.engine = "onnxruntime"
        if fast and on_cpu and loaded.format != "onnx" and precision in ("fp32", "bf16"):
            self.model = self._fastest_cpu_engine(precision)
            return
        self.model = prepare_model(loaded.model, self.device, precision, compile)

    def _fastest_cpu_engine(self, precision: str) -> nn.Module:
        """OpenVINO when installed and its logits match eager PyTorch (fp32: within 1e-4 on a
        probe batch), else PyTorch; ``self.engine`` says which ran."""
        reference = self.loaded.model.cpu().eval()
        try:
            model = OpenVinoModel.from_module(reference, precision, ood=self.ood_stats)
        except MissingDependencyError:
            log.info("--fast: OpenVINO is not installed (pip install openvino); using PyTorch")
            return prepare_model(reference, self.device, precision)
        h, w = self.loaded.config.image_hw
        probe = torch.randn(
            4, self.loaded.config.in_chans, h, w, generator=torch.Generator().manual_seed(0)
        )
        with torch.inference_mode():
            diff = (model(probe).logits - reference(probe).logits).abs().max().item()
        if precision == "fp32" and diff > 1e-4:
            log.warning("--fast: OpenVINO differs from PyTorch by %.2g; using PyTorch", diff)
            return prepare_model(reference, self.device, precision)
        self.engine = f"openvino {precision}"
        return model

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = DEFAULT_MODEL,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        compile: bool = False,
        fast_decode: bool = False,
        fast: bool = False,
        **load_kwargs: Any,
    ) -> Classifier:
        """Load any checkpoint :func:`deit.checkpoints.load_model` reads, or an ``.onnx`` file
        of ``deit export``/``deit quantize`` (run by ONNX Runtime on the CPU, with the labels
        and preprocessing stored in the file)."""
        loaded = load_any(source, **load_kwargs)
        if loaded.format in ("onnx", "openvino") and str(device) == "auto":
            device = "cpu"
        return cls(
            loaded, device, precision=precision, compile=compile, fast_decode=fast_decode, fast=fast
        )

    @property
    def labels(self) -> list[str]:
        return self.loaded.labels

    @torch.inference_mode()
    def logits(self, pixel_values: Tensor) -> Tensor:
        """Inference logits (B, classes) of preprocessed images (B, C, H, W)."""
        x = pixel_values.to(self.device, self.input_dtype, non_blocking=True)
        return self.model(x).logits.float().cpu()

    @torch.inference_mode()
    def logits_and_ood(self, pixel_values: Tensor) -> tuple[Tensor, list[OODResult]]:
        """Inference logits (B, classes) and each image's out-of-distribution verdict, from
        one forward pass (the fitted score costs two small matrix products more)."""
        x = pixel_values.to(self.device, self.input_dtype, non_blocking=True)
        scored = getattr(self.model, "scored", None)  # exported files and --fast OpenVINO
        if scored is not None:
            logits, score = scored(x)
            if score is None or self.calibration is UNCALIBRATED:
                score = msp_score(logits)
        elif self.ood_stats is not None and self._ood_scorer is not None:
            taps = self.ood_stats.taps
            out = self.model(x, output_blocks=taps.blocks)
            logits = out.logits.float().cpu()
            score = self._ood_scorer(taps.features(out).cpu())
        else:
            logits = self.model(x).logits.float().cpu()
            score = msp_score(logits)
        return logits, self.calibration.verdicts(score)

    def topk(self, logits: Tensor, top_k: int = 5) -> list[list[Prediction]]:
        """Softmax probabilities' top-k for each row of ``logits``."""
        k = max(1, min(top_k, logits.shape[-1]))
        scores, indices = logits.softmax(dim=-1).topk(k, dim=-1)
        return [
            [Prediction(int(i), self.labels[int(i)], float(s)) for s, i in zip(srow, irow)]
            for srow, irow in zip(scores.tolist(), indices.tolist())
        ]

    def _results(self, pixel_values: Tensor, top_k: int) -> list[Predictions]:
        logits, ood = self.logits_and_ood(pixel_values)
        bad = [i for i, ok in enumerate(finite_rows(logits)) if not ok]
        if bad:
            raise NonFiniteOutputError(
                f"the model's output for image {bad[0]} of the batch is {NON_FINITE}"
            )
        return [Predictions(p, o) for p, o in zip(self.topk(logits, top_k), ood, strict=True)]

    def predict(
        self, images: ImageLike | Sequence[ImageLike], top_k: int = 5, batch_size: int = 32
    ) -> list[Predictions]:
        """Classify images (paths, PIL images, arrays or tensors); one list per image, best
        first, whose ``ood`` says how unlike the training data the image is.

        Raises:
            ImageLoadError: an input can't be read as an image.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]  # type: ignore[list-item]  # one image, not a sequence
        results: list[Predictions] = []
        for start in range(0, len(images), batch_size):
            batch = preprocess(
                list(images[start : start + batch_size]),
                self.loaded.preprocess,
                fast_decode=self.fast_decode,
            )
            results.extend(self._results(batch, top_k))
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
        except MemoryError:  # this image alone: the others of its batch are still answered
            return "out of memory while preprocessing this image"

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
        logits, ood = self.logits_and_ood(pixels)
        rows = zip(batch, self.topk(logits, top_k), ood, finite_rows(logits), strict=True)
        for (path, _), preds, verdict, finite in rows:
            bar.update(1)
            if not finite:  # this image alone: the others of its batch are still answered
                yield FileResult(path, [], f"the model's output is {NON_FINITE}")
                continue
            yield FileResult(path, preds, ood=verdict)
