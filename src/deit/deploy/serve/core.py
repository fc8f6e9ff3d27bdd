"""The server's one inference core, shared by every route and protocol adapter.

:class:`InferenceCore` owns the limits (the upload-byte and pixel budgets of
:mod:`deit.deploy.serve.limits`), the decoding threads, the dynamic batcher and the explain
gate. Every adapter (our JSON routes, the Hugging Face convention, the Open Inference
Protocol v2 and KServe v1) reads its request under :meth:`InferenceCore.budgets`, hands the
images to :meth:`InferenceCore.classify_files` (or preprocessed pixels to
:meth:`InferenceCore.classify_pixels`) and renders the :class:`Classified` rows it gets back
in its own format.

Each :class:`Classified` row carries the image's logits and ``extras``: per-image fields that
every adapter passes through unchanged (JSON routes and KServe v1 as keys next to the
predictions, the Hugging Face list as keys of each element, v2 as extra outputs). Today that
is ``ood``, the image's out-of-distribution verdict (:mod:`deit.ood`), computed in the model
thread from the same forward pass as the logits.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

from deit.deploy.serve.batching import BatchObserver, DynamicBatcher
from deit.deploy.serve.limits import Budget, Gate, Reservation, pixel_cost
from deit.deploy.serve.settings import ServeSettings
from deit.errors import ApiError, BusyError, DeiTError, NonFiniteOutputError
from deit.explain import explain_payload, rollout_maps
from deit.images import load_image
from deit.inference import NON_FINITE, Classifier, finite_rows
from deit.transforms import preprocess_image

T = TypeVar("T")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "none")


@dataclass(frozen=True)
class Classified:
    """The model's answer for one image: its logits and the extra fields of its prediction."""

    logits: Tensor  # (classes,)
    extras: dict[str, Any] = field(default_factory=dict)


def scores(logits: Tensor, function: str = "softmax") -> Tensor:
    """``logits`` (..., classes) turned into scores: ``softmax``, ``sigmoid`` or ``none``."""
    if function == "softmax":
        return logits.float().softmax(dim=-1)
    if function == "sigmoid":
        return logits.float().sigmoid()
    if function == "none":
        return logits.float()
    raise ApiError(422, f"function_to_apply must be one of {', '.join(SCORE_FUNCTIONS)}")


def top_predictions(
    row: Classified, labels: list[str], k: int, function: str = "softmax"
) -> list[dict[str, Any]]:
    """The best ``k`` classes of one image, best first, as ``{"index", "label", "score"}``."""
    values, indices = scores(row.logits, function).topk(max(1, min(k, len(labels))))
    return [
        {"index": int(i), "label": labels[int(i)], "score": float(v)}
        for v, i in zip(values.tolist(), indices.tolist())
    ]


class InferenceCore:
    """Budgets, decoding, batching and explaining for one model, apart from HTTP.

    The thread pools and the batcher exist while the app runs (:meth:`start`/:meth:`stop`,
    called by the app's lifespan). ``observe`` sees every batch (metrics).
    """

    def __init__(
        self,
        clf: Classifier,
        settings: ServeSettings,
        *,
        observe: BatchObserver | None = None,
    ) -> None:
        self.clf, self.settings = clf, settings
        self.observe = observe
        self.pools: dict[str, ThreadPoolExecutor] = {}
        wait = settings.busy_wait_s
        self.upload_budget = Budget(settings.max_inflight_upload_bytes, "upload bytes", wait_s=wait)
        self.pixel_budget = Budget(settings.max_inflight_pixels, "pixels to decode", wait_s=wait)
        self.explain_gate = Gate(
            settings.max_explain_concurrent, settings.max_explain_queue, "explain"
        )
        self.batcher: DynamicBatcher[Classified] | None = None

    @property
    def labels(self) -> list[str]:
        return self.clf.labels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the preprocessed images the model takes."""
        config = self.clf.loaded.config
        size = config.img_size
        height, width = (size, size) if isinstance(size, int) else size
        return config.in_chans, int(height), int(width)

    def start(self) -> DynamicBatcher[Classified]:
        s = self.settings
        self.pools["model"] = ThreadPoolExecutor(1, thread_name_prefix="deit-model")
        self.pools["explain"] = ThreadPoolExecutor(
            s.max_explain_concurrent, thread_name_prefix="deit-explain"
        )
        self.pools["decode"] = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="deit-io")
        self.pools["peek"] = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="deit-hdr")
        self.batcher = DynamicBatcher(
            self._infer,
            self.pools["model"],
            max_batch=s.max_batch,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            observe=self.observe,
        )
        self.batcher.start()
        return self.batcher

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    async def run_in(self, pool: str, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pools[pool], fn, *args)

    @asynccontextmanager
    async def budgets(self) -> AsyncIterator[tuple[Reservation, Reservation]]:
        """This request's reservations of the upload-byte and pixel budgets, released at the
        end of the ``async with``."""
        async with self.upload_budget.hold() as held_bytes, self.pixel_budget.hold() as held_px:
            yield held_bytes, held_px

    # ----------------------------------------------------------------------- the model thread

    def _infer(self, pixels: Tensor) -> list[Classified | DeiTError]:
        """One batch: each image's logits with its out-of-distribution verdict (``ood``), or a
        :class:`NonFiniteOutputError` for an image whose output is NaN or infinite (that image
        alone fails)."""
        logits, verdicts = self.clf.logits_and_ood(pixels)
        rows: list[Classified | DeiTError] = []
        for row, verdict, finite in zip(logits, verdicts, finite_rows(logits)):
            if finite:
                rows.append(Classified(row, {"ood": verdict.to_dict()}))
            else:
                rows.append(NonFiniteOutputError(f"the model's output is {NON_FINITE}"))
        return rows

    # ----------------------------------------------------------------------- images

    def decode(self, data: bytes) -> tuple[Any, Tensor]:
        img = load_image(
            data, max_pixels=self.settings.max_pixels, fast_decode=self.clf.fast_decode
        )
        return img, preprocess_image(img, self.clf.loaded.preprocess)

    def header_pixels(self, files: list[tuple[str, bytes]]) -> list[int]:
        """Each image's :func:`pixel_cost` from its header, without decoding; 0 for the images
        that ``load_image`` refuses from the header anyway (unreadable, over max_pixels)."""
        from PIL import Image

        costs = []
        for _, data in files:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
            except Exception:  # not an image, corrupt, or PIL's decompression-bomb check
                width = height = 0
            if width * height > self.settings.max_pixels:  # refused before decoding
                width = height = 0
            costs.append(pixel_cost(width, height, self.clf.loaded.preprocess))
        return costs

    async def reserve_pixels(self, files: list[tuple[str, bytes]], held: Reservation) -> list[int]:
        """Each file's pixels, all taken from the decode budget (413 over the request limit,
        503 if the server stays too busy); each is given back once that file is decoded."""
        costs = await self.run_in("peek", self.header_pixels, files)
        return await self._reserve(costs, held)

    async def _reserve(self, costs: list[int], held: Reservation) -> list[int]:
        total, limit = sum(costs), self.settings.max_request_pixels
        if total > limit:
            raise ApiError(
                413,
                f"the images of this request hold {total} pixels in all, more than the limit "
                f"of {limit}; send fewer or smaller images",
            )
        await held.grow(total)
        return costs

    async def classify_one(self, data: bytes, cost: int, held: Reservation) -> Classified:
        """Decode one image (its ``cost`` pixels given back once decoded) and batch it."""
        try:
            _, x = await self.run_in("decode", self.decode, data)
        finally:
            held.shrink(cost)  # decoded (or failed): its pixels are free for others
        return await self.submit(x)

    async def submit(self, x: Tensor) -> Classified:
        assert self.batcher is not None, "the app is not running"
        try:
            return await self.batcher.submit(x)
        except BusyError as e:
            raise BusyError(f"server busy ({e}), retry later") from None

    async def classify_files(
        self, files: list[tuple[str, bytes]], held: Reservation
    ) -> list[Classified | DeiTError]:
        """Each encoded image's answer, or the error that image alone met (undecodable, too
        large, ...). Errors that concern the whole request (413 over the request's pixel
        limit, 503 busy) are raised."""
        costs = await self.reserve_pixels(files, held)
        outcomes = await asyncio.gather(
            *(self.classify_one(data, cost, held) for (_, data), cost in zip(files, costs)),
            return_exceptions=True,
        )
        for out in outcomes:
            if isinstance(out, BaseException) and not isinstance(out, DeiTError):
                raise out
        return outcomes  # type: ignore[return-value]  # only Classified and DeiTError remain

    async def classify_pixels(self, pixels: np.ndarray, held: Reservation) -> list[Classified]:
        """The answers for preprocessed images (N, C, H, W) in the model's input shape."""
        shape = self.input_shape
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != shape:
            raise ApiError(
                422,
                f"pixels must have shape [N, {', '.join(map(str, shape))}], not "
                f"{list(pixels.shape)}",
            )
        if not np.isfinite(pixels).all():
            raise ApiError(422, "pixels hold NaN or infinite values")
        await self._reserve([pixel_cost(shape[2], shape[1])] * len(pixels), held)
        x = torch.tensor(pixels, dtype=torch.float32)  # a copy: the body's buffer is read-only
        return list(await asyncio.gather(*(self.submit(row) for row in x)))

    # ----------------------------------------------------------------------- attention maps

    async def explain(
        self, data: bytes, held_px: Reservation, token: Literal["cls", "dist", "both"], fmt: str
    ) -> bytes | dict[str, Any]:
        """The attention-rollout answer (PNG overlay or JSON maps) for one encoded image.

        Callers hold a place in :attr:`explain_gate` (admitted before they read the upload);
        the rollout waits for one of the gate's turns and runs in its own thread, never in the
        batcher's model thread, so attention maps don't delay classifications.
        """
        loaded = self.clf.loaded
        if loaded.format in ("onnx", "openvino"):
            raise ApiError(422, f"explain needs a PyTorch model; this server runs {loaded.format}")
        if token == "dist" and not loaded.config.distilled:
            raise ApiError(422, "this model has no distillation token")
        await self.reserve_pixels([("", data)], held_px)  # held until the answer is built
        img, pixels = await self.run_in("decode", self.decode, data)

        def run() -> dict[str, np.ndarray]:
            ref = loaded.model  # the fp32 eager model, whatever precision serves
            maps = rollout_maps(ref, pixels[None].to(next(ref.parameters()).device), token)
            return {k: v[0].numpy() for k, v in maps.items()}

        async with self.explain_gate.turn():
            maps = await self.run_in("explain", run)
        body: bytes | dict[str, Any] = await self.run_in(
            "decode", explain_payload, img, loaded.preprocess, maps, fmt
        )
        return body
