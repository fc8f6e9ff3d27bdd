"""Resizing only the pixels a center crop keeps, bit for bit what a whole resize gives.

:func:`cropped_resize` computes pixels ``(left, top, width, height)`` of
``img.resize(size, resample)`` with PIL's resize of a source box, in row bands on several threads
for large images, and only where Pillow's arithmetic makes that identical to resizing everything
and cropping (:func:`_source_interval`, :func:`_horizontal_first`); :func:`box_resize_is_exact`
checks the installed Pillow once per process. :func:`deit.transforms.resize_and_crop` uses it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

__all__ = ["BAND_MIN_PIXELS", "box_resize", "box_resize_is_exact", "cropped_resize"]

# Images of at least this many pixels are resized in row bands on several threads, when no
# other resize is running in the process (else the cores are busy already: parallel decoding
# in `deit predict`, the server's pool) and not in a DataLoader worker (one of several).
BAND_MIN_PIXELS = 1 << 20
_band_pool: tuple[int, ThreadPoolExecutor] | None = None
_band_pool_lock = threading.Lock()
_resizing = 0


@contextlib.contextmanager
def _resize_slot() -> Iterator[bool]:
    """Count running resizes; yields whether this one is the only one."""
    global _resizing
    with _band_pool_lock:
        _resizing += 1
        alone = _resizing == 1
    try:
        yield alone
    finally:
        with _band_pool_lock:
            _resizing -= 1


def bands(img: Image.Image, alone: bool = True) -> int:
    """How many row bands to resize ``img`` in: one for small images, while another resize
    runs (``alone`` False) or inside a DataLoader worker; else up to 4, one per core."""
    if not alone or img.width * img.height < BAND_MIN_PIXELS:
        return 1
    if torch.utils.data.get_worker_info() is not None:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def _pool() -> ThreadPoolExecutor:
    """This process's band threads (a forked child gets its own)."""
    global _band_pool
    with _band_pool_lock:
        if _band_pool is None or _band_pool[0] != os.getpid():
            _band_pool = (os.getpid(), ThreadPoolExecutor(4, thread_name_prefix="deit-resize"))
        return _band_pool[1]


def _source_interval(
    insize: int, outsize: int, start: int, length: int
) -> tuple[float, float] | None:
    """The source interval (one side of a PIL resize box) whose ``length`` outputs are outputs
    ``start ..`` of resizing ``insize`` pixels to ``outsize``, bit for bit; None if none is.

    Pillow's resampler (``precompute_coeffs`` in ``Resample.c``) takes the box as C floats,
    sets ``scale = (double)(in1 - in0) / length`` (the difference taken in float), centers
    output ``i`` on ``in0 + (i + 0.5) * scale`` and derives each output's taps and fixed-point
    weights from the scale and its center; a whole resize has ``in0 = 0``. Equal scales and
    centers give equal pixels for every filter, and both are checked here in the same
    arithmetic. A scale that is no float (``4032 / 341``) can't be matched this way.
    """
    scale = insize / outsize
    in0, in1 = np.float32(start * scale), np.float32((start + length) * scale)
    i = np.arange(length, dtype=np.float64) + 0.5
    if float(np.float32(in1 - in0)) / length != scale:
        return None
    if not np.array_equal(float(in0) + i * scale, (i + start) * scale):
        return None
    return float(in0), float(in1)


def _horizontal_first(width: int, height: int, out_w: int, out_h: int) -> bool:
    """Pillow's (13) choice of pass order: vertical first if the height shrinks by more than
    twice what the width does. Bands must make the same choice as the whole image, since the
    intermediate image is rounded to 8 bits between the passes."""
    return not (height - out_h > 0 and height - out_h > (width - out_w) * 2)


def box_resize(
    img: Image.Image,
    size: tuple[int, int],
    crop: tuple[int, int, int, int],
    resample: Image.Resampling,
    bands: int,
) -> np.ndarray | None:
    """Pixels ``crop`` = (left, top, width, height) of ``img.resize(size, resample)``, computing
    only the rows kept (and the columns, where the scale allows), in ``bands`` row bands on
    threads; None where that would not be bit-identical."""
    (width, height), (new_w, new_h), (left, top, cw, ch) = img.size, size, crop
    img.load()  # decode now, not in two threads at once
    xs = _source_interval(width, new_w, left, cw)
    if xs is None:  # resize all columns, crop them afterwards
        xs, out_w, x0 = (0.0, float(width)), new_w, left
    else:
        out_w, x0 = cw, 0
    order = _horizontal_first(width, height, new_w, new_h)
    cuts = [round(i * ch / bands) for i in range(bands + 1)]
    jobs = []
    for y0, y1 in itertools.pairwise(cuts):
        ys = _source_interval(height, new_h, top + y0, y1 - y0)
        if ys is None or _horizontal_first(width, height, out_w, y1 - y0) != order:
            return None
        jobs.append(((out_w, y1 - y0), (xs[0], ys[0], xs[1], ys[1])))
    # PIL releases the GIL while resampling: the bands run in parallel.
    futures = [_pool().submit(img.resize, s, resample, b) for s, b in jobs[1:]]
    parts = [img.resize(jobs[0][0], resample, box=jobs[0][1])] + [f.result() for f in futures]
    rows = np.concatenate([np.asarray(p) for p in parts])
    return rows[:, x0 : x0 + cw]


@lru_cache(maxsize=1)
def box_resize_is_exact() -> bool:
    """Check :func:`box_resize` against a whole resize on small probes, both pass orders
    included, once per process: a Pillow whose resampler differs turns the fast path off."""
    rng = np.random.default_rng(0)
    probes = [  # (width, height, resized w, h, crop w, h)
        (97, 61, 32, 32, 28, 28),  # horizontal pass first
        (23, 160, 16, 16, 14, 14),  # vertical pass first
        (150, 90, 40, 24, 20, 20),  # shorter side resized
        (130, 90, 34, 24, 20, 20),  # a scale that is no float: all columns resized
        (80, 100, 48, 40, 40, 32),  # near the order threshold (2 bands: not exact, None)
    ]
    for width, height, new_w, new_h, cw, ch in probes:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        left, top = (new_w - cw) // 2, (new_h - ch) // 2
        for resample in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR):
            whole = np.asarray(img.resize((new_w, new_h), resample))
            want = whole[top : top + ch, left : left + cw]
            for n in (1, 2):  # row bands
                got = box_resize(img, (new_w, new_h), (left, top, cw, ch), resample, n)
                if got is not None and not np.array_equal(got, want):
                    return False
    return True


def cropped_resize(
    img: Image.Image,
    size: tuple[int, int],
    crop: tuple[int, int, int, int],
    resample: Image.Resampling,
) -> np.ndarray | None:
    """:func:`box_resize` in as many row bands as the image and the process allow (one while
    another resize is running); None where that would not be bit-identical."""
    with _resize_slot() as alone:
        return box_resize(img, size, crop, resample, bands(img, alone))
