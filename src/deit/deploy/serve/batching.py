"""Dynamic batching: one model call for the images of many concurrent requests.

Each request submits one preprocessed image and awaits its row of the model's answer. A
single worker task takes the first queued image, then keeps taking more until it has
``max_batch`` or ``max_wait_ms`` have passed since the first, stacks them, runs the model once
in its own thread (so the event loop stays free) and resolves each request's future with its
row. An optional ``observe`` callback sees each batch's size, how long each image queued and
how long the model took (the server's Prometheus metrics).
Under light load a request waits at most ``max_wait_ms``; under heavy load batches fill
without waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from deit.errors import BusyError

R = TypeVar("R")
#: ``observe(batch_size, seconds each image queued, seconds the model took)``
BatchObserver = Callable[[int, list[float], float], None]


@dataclass
class BatchStats:
    """Counters of the batching worker."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    inference_ms: float = 0.0
    failures: int = 0

    def record(self, size: int, seconds: float) -> None:
        self.requests += size
        self.batches += 1
        self.largest_batch = max(self.largest_batch, size)
        self.batch_sizes[size] += 1
        self.inference_ms += 1000 * seconds

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        d["mean_batch"] = self.requests / self.batches if self.batches else 0.0
        return d


class DynamicBatcher(Generic[R]):
    """Gathers single images from concurrent requests into batches for one model call.

    Args:
        infer: (B, C, H, W) -> B rows (a logits tensor, or one result object per image; an
            exception object as a row fails that image alone); called in ``executor``.
        executor: Where ``infer`` runs; give it one thread so the model is never called
            concurrently.
        max_batch: Largest batch.
        max_wait_ms: How long the first image of a batch waits for company.
        max_queue: Images queued beyond this are refused with :class:`BusyError`.
        observe: Called after each successful batch (see :data:`BatchObserver`).
    """

    def __init__(
        self,
        infer: Callable[[Tensor], Sequence[R | BaseException]],
        executor: Executor,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        observe: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_ms >= 0")
        self.infer, self.executor, self.observe = infer, executor, observe
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue[_Item[R]] = asyncio.Queue(max_queue)
        self.stats = BatchStats()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the worker; images still queued fail with :class:`BusyError`."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while not self.queue.empty():
            fut = self.queue.get_nowait().future
            if not fut.done():
                fut.set_exception(BusyError("shutting down"))

    async def submit(self, pixels: Tensor) -> R:
        """The row (e.g. logits (classes,)) of one preprocessed image (C, H, W).

        Raises:
            BusyError: The queue is full or the worker is not running.
            Exception: Whatever the model raised for this image's batch.
        """
        if self._task is None or self._task.done():
            raise BusyError("the batching worker is not running")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Item(pixels, fut, time.perf_counter()))
        except asyncio.QueueFull:
            raise BusyError(f"{self.queue.maxsize} images already queued") from None
        return await fut

    async def _gather(self) -> list[_Item[R]]:
        """The next batch: block for one image, then take more until full or timed out."""
        items = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(items) < self.max_batch:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [it for it in await self._gather() if not it.future.done()]  # skip cancelled
            if not items:
                continue
            start = time.perf_counter()
            try:
                batch = torch.stack([it.pixels for it in items])
                rows = await loop.run_in_executor(self.executor, self.infer, batch)
            except Exception as e:  # fail this batch's requests, keep the worker alive
                self.stats.failures += 1
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            seconds = time.perf_counter() - start
            self.stats.record(len(items), seconds)
            if self.observe is not None:
                self.observe(len(items), [start - it.queued_at for it in items], seconds)
            for row, it in zip(rows, items):
                if it.future.done():
                    continue
                if isinstance(row, BaseException):  # this image alone failed
                    it.future.set_exception(row)
                else:
                    it.future.set_result(row)


@dataclass
class _Item(Generic[R]):
    """A queued image, the future its request awaits, and when it was queued."""

    pixels: Tensor
    future: asyncio.Future[R]
    queued_at: float
