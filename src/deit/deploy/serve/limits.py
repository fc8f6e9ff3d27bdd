"""Server-wide budgets shared by the requests in flight, for :mod:`deit.deploy.serve.app`.

A :class:`Budget` is an amount (upload bytes held in memory, image pixels queued for or in
decoding) that all requests draw from. A request takes what it needs through a
:class:`Reservation`; when the budget is spent it waits up to ``wait_s`` for others to give
some back, then is refused with 503 and a ``Retry-After`` header. A request that needs more
than the whole budget could never run and is refused with 413 at once.

:func:`pixel_cost` prices an image for the pixel budgets; a :class:`Gate` bounds how many
requests of one kind (attention maps) run and wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType

from deit.errors import ApiError
from deit.transforms import PreprocessConfig, preprocess_pixels

RETRY_AFTER_S = 1


class Budget:
    """``capacity`` units of ``what`` (e.g. "upload bytes") shared by concurrent requests.

    Runs on one event loop; nothing here is thread-safe (nor needs to be).
    """

    def __init__(self, capacity: int, what: str, *, wait_s: float) -> None:
        if capacity < 1 or wait_s < 0:
            raise ValueError(f"{what}: capacity must be >= 1 and wait_s >= 0")
        self.capacity, self.what, self.wait_s = int(capacity), what, wait_s
        self.used = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def hold(self) -> Reservation:
        """A reservation of nothing yet, released in full when its ``async with`` ends."""
        return Reservation(self)

    async def _take(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while self.used + n > self.capacity:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ApiError(
                    503,
                    f"server busy: {self.used} of {self.capacity} {self.what} in flight, "
                    "retry later",
                    retry_after=RETRY_AFTER_S,
                )
            waiter = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(waiter)
        self.used += n

    def _give(self, n: int) -> None:
        self.used -= n
        for waiter in self._waiters:  # everyone re-checks; whoever fits goes first
            if not waiter.done():
                waiter.set_result(None)


class Reservation:
    """What one request holds of a :class:`Budget`; use as ``async with budget.hold() as r``."""

    def __init__(self, budget: Budget) -> None:
        self.budget, self.held = budget, 0

    async def grow(self, n: int) -> None:
        """Take ``n`` more, waiting up to the budget's ``wait_s``.

        Raises:
            ApiError: 413 if what this request would hold exceeds the whole budget (it could
                never fit, however long it waited); 503 if the budget stays spent.
        """
        if n <= 0:
            return
        if self.held + n > self.budget.capacity:
            raise ApiError(
                413,
                f"this request needs more than the server's {self.budget.capacity} "
                f"{self.budget.what}",
            )
        await self.budget._take(n)
        self.held += n

    def shrink(self, n: int) -> None:
        """Give back ``n`` (at most what is held)."""
        n = max(0, min(n, self.held))
        if n:
            self.held -= n
            self.budget._give(n)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shrink(self.held)


def pixel_cost(width: int, height: int, preprocess: PreprocessConfig | None = None) -> int:
    """What one image of ``width`` x ``height`` (from its header) costs in the pixel budgets.

    The one place the server prices an image: the per-request limit and the server-wide
    decode budget count this. With the model's ``preprocess``, the cost is what preprocessing
    holds at most (decoded, resized and output pixels, :func:`deit.transforms.preprocess_pixels`),
    so a 1 x 8,192 strip is priced at what its resize to a shorter side of 256 would make,
    not at its 8,192 decoded pixels; without one (already preprocessed pixels), its area.
    """
    if preprocess is None:
        return width * height
    return preprocess_pixels(width, height, preprocess)


class Gate:
    """At most ``concurrency`` requests of one kind running and ``queue`` more waiting.

    A request is admitted (:meth:`admit`, before it reads its upload) or refused at once with
    503 and ``Retry-After`` when ``concurrency + queue`` are already admitted; admitted requests
    then take turns (:meth:`turn`) for the part that needs the gate. Attention maps
    (``/v1/explain``) go through one, so a flood of them waits here instead of in the batcher's
    model thread, where it would delay every classification.
    """

    def __init__(self, concurrency: int, queue: int, what: str) -> None:
        if concurrency < 1 or queue < 0:
            raise ValueError(f"{what}: concurrency must be >= 1 and queue >= 0")
        self.capacity, self.what = concurrency + queue, what
        self.admitted = 0
        self._turns = asyncio.Semaphore(concurrency)

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a place until the ``async with`` ends.

        Raises:
            ApiError: 503 (``Retry-After``) when every place is taken.
        """
        if self.admitted >= self.capacity:
            raise ApiError(
                503,
                f"server busy: {self.admitted} {self.what} requests in flight, retry later",
                retry_after=RETRY_AFTER_S,
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for one of the ``concurrency`` turns and hold it until the block ends."""
        async with self._turns:
            yield
