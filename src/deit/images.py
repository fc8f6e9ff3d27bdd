"""Robust, bounded image loading: untrusted files (and arrays, tensors) to decoded PIL images.

:func:`load_image` opens paths, bytes, file objects, PIL images, arrays and tensors and decodes
them fully, in their own mode, upright per their EXIF orientation. Its inputs are often
untrusted (server uploads, dataset files), so decoding is bounded: the pixel count is checked
from the header before any pixel is decoded (``max_pixels``), decompression bombs (PIL's
warning, or a part larger than its header) are refused, empty, truncated and corrupt files raise
:class:`~deit.errors.ImageLoadError` subclasses, and unreadable EXIF keeps the stored pixels.

It is separate from :mod:`deit.transforms` (what happens to the pixels once decoded: mode,
resize, crop, normalization) so that the code handling untrusted bytes is one small module to
audit, usable without any preprocessing config; transforms imports it, never the reverse.

Runtime dependencies: torch, numpy and pillow only.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from deit.errors import EmptyImageError, ImageLoadError, ImageTooLargeError, NotAnImageError

#: Same as PIL's ``Image.MAX_IMAGE_PIXELS`` default (about 9459 x 9459 pixels).
DEFAULT_MAX_PIXELS: int = 89_478_485
_WARNINGS_LOCK = threading.Lock()

ImageLike = str | os.PathLike | bytes | IO[bytes] | Image.Image | np.ndarray | torch.Tensor


# File name extensions treated as images when a folder is listed (prediction, image folders).
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jfif .png .gif .bmp .tif .tiff .webp .ppm .pgm .pbm .ico".split()  # noqa: SIM905
)


def load_image(
    source: ImageLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    fast_decode: bool = False,
    draft_min_side: int = 512,
) -> Image.Image:
    """Open and fully decode an image, in its own mode, upright per its EXIF orientation.

    Animated files (GIF, APNG, WebP) give their first frame. Arrays and tensors are HW, HWC
    (numpy) or CHW (torch) with 1, 3 or 4 channels, uint8 or float in [0, 1] (rounded to 8 bit).

    Args:
        source: A path, bytes, a binary file object, a PIL image, an array or a tensor.
        max_pixels: Reject images with more pixels (checked from the header, before decoding);
            ``None`` for no limit of ours (PIL's own hard limit, ``2 * Image.MAX_IMAGE_PIXELS``,
            still applies).
        fast_decode: Let JPEG decoding downscale by 1/2, 1/4 or 1/8 (``Image.draft``) while
            keeping the shorter side >= ``draft_min_side``. Faster but approximate: results no
            longer match the reference pipelines exactly.
        draft_min_side: Smallest shorter side ``fast_decode`` may produce.

    Raises:
        ImageLoadError: Missing, empty, non-image, truncated, corrupt or too large inputs.
    """
    if isinstance(source, torch.Tensor):
        source = _tensor_to_hwc(source)
    if isinstance(source, np.ndarray):
        img = _array_to_image(source)
    elif isinstance(source, Image.Image):
        img = source
    else:
        img = _open(source, max_pixels)
    try:
        _decode(img, max_pixels, draft_min_side if fast_decode else None)
    except ImageLoadError:
        if img is not source:
            img.close()
        raise
    if getattr(img, "is_animated", False) and img is not source:
        first = img.copy()  # the first frame, detached from the still-open file
        img.close()
        img = first
    return _exif_upright(img)


def _decode(img: Image.Image, max_pixels: int | None, draft_min_side: int | None) -> None:
    """Check the header size, then decode all pixels (``draft_min_side``: allow JPEG draft)."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large: {width}x{height} pixels exceeds limit of {max_pixels}"
        )
    if width == 0 or height == 0:
        raise EmptyImageError("empty image (zero width or height)")
    if draft_min_side is not None and min(width, height) > draft_min_side:
        scale = draft_min_side / min(width, height)
        img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    try:
        img.load()
    except Image.DecompressionBombError as exc:  # e.g. an ICO/TIFF part larger than its header
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageLoadError(f"truncated or corrupt image: {exc}") from exc


def _open(source: str | os.PathLike | bytes | IO[bytes], max_pixels: int | None) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"{'not a file' if path.exists() else 'file not found'}: {path}")
        if path.stat().st_size == 0:
            raise EmptyImageError("empty file")
        fp: Path | IO[bytes] = path
    elif isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        try:
            data = source.read() if hasattr(source, "read") else bytes(source)
        except OSError as exc:
            raise ImageLoadError(f"cannot read input: {exc}") from exc
        if not isinstance(data, bytes):
            raise ImageLoadError("file objects must be opened in binary mode")
        if not data:
            raise EmptyImageError("empty file")
        fp = io.BytesIO(data)
    else:
        raise NotAnImageError(f"unsupported input type: {type(source).__name__}")
    try:
        with _bomb_warnings(max_pixels):
            return Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError("not an image file") from exc
    except OSError as exc:
        if exc.errno is not None:  # the OS refused, e.g. permission denied
            raise ImageLoadError(f"cannot read file: {exc.strerror}") from exc
        raise ImageLoadError(f"truncated or corrupt image: {exc}") from exc
    except Exception as exc:
        raise ImageLoadError(f"truncated or corrupt image: {exc}") from exc


@contextlib.contextmanager
def _bomb_warnings(max_pixels: int | None) -> Iterator[None]:
    """Turn PIL's decompression-bomb warning into an error unless our limit is looser.

    ``catch_warnings`` swaps the process-wide filters until exit, so the (cheap, header-only)
    section it guards is serialized: interleaved exits would leave a filter behind. PIL's own
    ``Image.MAX_IMAGE_PIXELS`` is never changed.
    """
    loose = max_pixels is None or max_pixels > (Image.MAX_IMAGE_PIXELS or 0)
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore" if loose else "error", Image.DecompressionBombWarning)
        yield


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation tag
        return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img
    except Exception:  # unreadable EXIF: keep the pixels as stored
        return img


def _tensor_to_hwc(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.ndim == 3:
        if t.shape[0] not in (1, 3, 4):
            raise ImageLoadError(
                f"tensor must be CHW with 1, 3 or 4 channels, got {tuple(t.shape)}"
            )
        t = t.permute(1, 2, 0)
    return (t if t.dtype == torch.uint8 else t.float()).numpy()


def _array_to_image(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ImageLoadError(f"array must be HW or HWC with 1, 3 or 4 channels, got {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise ImageLoadError("float image values must be in [0, 1]")
        arr = np.rint(arr.astype(np.float32) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageLoadError(f"array dtype must be uint8 or float, got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))
