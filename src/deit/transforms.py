"""Evaluation preprocessing for DeiT: the config, and the pixels from a decoded image to a tensor.

Three reference pipelines exist for the same weights:

* official DeiT / the model card: shorter side to ``int(size / 0.875)``, center crop, bicubic;
* timm: shorter side to ``floor(size / crop_pct)`` with ``crop_pct`` 0.9 (1.0 at 384);
* transformers' ``DeiTImageProcessor``: squash to a fixed (height, width), then center crop.

:class:`PreprocessConfig` describes any of them and :func:`preprocess` reproduces each one to
float32 rounding: PIL does the resizing exactly as torchvision and transformers' PIL backend do,
and the rescale/normalize arithmetic is a 256-entry lookup table per channel computed the way both
references compute it (``float32(float64(v) * factor)``, then ``(x - mean) / std`` in float32; for
``factor = 1/255`` this equals torchvision's ``float32(v) / 255``).

Decoding files (bounded: pixel limits, decompression bombs, EXIF orientation) is
:mod:`deit.images`' :func:`~deit.images.load_image`; :func:`preprocess` calls it.

Runtime dependencies: torch, numpy and pillow only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from deit.box_resize import box_resize_is_exact, cropped_resize
from deit.errors import ConfigError, ImageTooLargeError, NotAnImageError
from deit.images import DEFAULT_MAX_PIXELS, ImageLike, load_image

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
HF_STANDARD_MEAN: tuple[float, ...] = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_*
HF_STANDARD_STD: tuple[float, ...] = (0.5, 0.5, 0.5)
#: Largest resize or crop side a PreprocessConfig may ask for (deit.config.LIMITS' image side).
MAX_SIZE: int = 8192

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PreprocessConfig:
    """Evaluation preprocessing: mode -> (invert) -> resize -> center crop -> rescale -> normalize.

    Attributes:
        resize_mode: ``"shorter"`` resizes the shorter side to ``resize_size`` keeping the aspect
            ratio (torchvision ``Resize(int)``: long side ``int(size * long / short)``);
            ``"squash"`` resizes to exactly ``resize_size`` = (height, width) (transformers);
            ``"longer"`` resizes the longer side to ``resize_size`` keeping the aspect ratio, so
            that a crop of that size pads instead of cutting (letterboxing: how Fashion-MNIST
            framed its garments); ``"none"`` skips resizing.
        resize_size: An int for ``"shorter"`` and ``"longer"``; (height, width) for ``"squash"``
            (an int means a square).
        crop_size: Center crop (height, width); ``None`` for no crop. Crops larger than the image
            pad with zeros (black before normalization), as torchvision and transformers do.
        interpolation: PIL filter name, one of :data:`INTERPOLATIONS`.
        mean: Per-channel mean, in [0, 1] units.
        std: Per-channel standard deviation.
        channels: 3 converts images to RGB, 1 to grayscale ``"L"`` (e.g. a Fashion-MNIST model).
        invert_light_background: Invert images whose border is light (see
            :func:`has_light_background`), for models trained on dark-background data.
        rescale_factor: Multiplier from 8-bit values to the units of ``mean``/``std``.
        crop_rounding: Crop offset for an odd margin: ``"round"`` = torchvision
            (``round((H - h) / 2)``, half to even; padding puts the extra pixel after the image),
            ``"floor"`` = transformers (``(H - h) // 2``; padding puts it before).
        source: Free-text provenance, e.g. ``"official"``, ``"timm"``, ``"model card"``.
    """

    resize_mode: Literal["shorter", "longer", "squash", "none"] = "shorter"
    resize_size: tuple[int, int] | int = 256
    crop_size: tuple[int, int] | None = (224, 224)
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    invert_light_background: bool = False
    rescale_factor: float = 1 / 255
    crop_rounding: Literal["round", "floor"] = "round"
    source: str = "model card"

    def __post_init__(self) -> None:
        _check_choice("resize_mode", self.resize_mode, ("shorter", "longer", "squash", "none"))
        _check_choice("interpolation", self.interpolation, tuple(INTERPOLATIONS))
        _check_choice("crop_rounding", self.crop_rounding, ("round", "floor"))
        _check_choice("channels", self.channels, (1, 3))
        size = self.resize_size
        by_side = self.resize_mode in ("shorter", "longer")
        if by_side and (not isinstance(size, int) or size <= 0):
            raise ValueError(
                f"resize_mode {self.resize_mode!r} needs a positive int size, got {size!r}"
            )
        fixed: dict[str, Any] = {
            "mean": tuple(map(float, self.mean)),
            "std": tuple(map(float, self.std)),
            "resize_size": size if by_side else _pair(size),
            "crop_size": None if self.crop_size is None else _pair(self.crop_size),
        }
        for name in ("resize_size", "crop_size"):  # 100000 px would be 9 GB per image
            sides = fixed[name] if isinstance(fixed[name], tuple) else (fixed[name],)
            if any(side is not None and side > MAX_SIZE for side in sides):
                raise ConfigError(
                    f"{name} {fixed[name]!r} is over the limit of {MAX_SIZE} px per side"
                )
        for name, value in fixed.items():
            object.__setattr__(self, name, value)
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(
                f"mean and std need {self.channels} values each, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if 0.0 in self.std:
            raise ValueError("std values must be non-zero")

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the tensors this config produces."""
        if self.crop_size is not None:
            return self.crop_size
        if self.resize_mode == "squash":
            return self.resize_size  # type: ignore[return-value]
        raise ValueError(
            f"output size of resize_mode {self.resize_mode!r} without a crop depends on the image"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); inverse of :meth:`from_dict`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys: {', '.join(unknown)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)

    @classmethod
    def model_card(cls) -> PreprocessConfig:
        """DeiT model card: shorter side 256, center crop 224, bicubic, ImageNet mean/std."""
        return cls(source="model card")

    @classmethod
    def official(cls, img_size: int, crop_pct: float = 0.875) -> PreprocessConfig:
        """Official DeiT eval: shorter side ``int(img_size / crop_pct)``, crop ``img_size``."""
        return cls(
            resize_size=int(img_size / crop_pct), crop_size=(img_size, img_size), source="official"
        )

    @classmethod
    def timm(cls, img_size: int, crop_pct: float = 0.9) -> PreprocessConfig:
        """timm eval: shorter side ``floor(img_size / crop_pct)``, crop ``img_size``."""
        return cls(
            resize_size=math.floor(img_size / crop_pct),
            crop_size=(img_size, img_size),
            source="timm",
        )

    @classmethod
    def from_hf(cls, processor_config: Mapping[str, Any]) -> PreprocessConfig:
        """Reproduce transformers' ``DeiTImageProcessor``/``ViTImageProcessor`` (PIL backend).

        Accepts legacy feature-extractor files (integer ``size``/``crop_size`` mean squares) and
        v5 files. Missing keys take the installed transformers' class defaults: DeiT (type name
        contains ``"DeiT"``) resizes to 256x256 bicubic and crops 224; otherwise ViT: 224x224
        bilinear, no crop; both use mean = std = 0.5 and rescale by 1/255.

        Args:
            processor_config: The parsed ``preprocessor_config.json``.

        Raises:
            ValueError: A size form transformers' DeiT/ViT processors don't use.
        """
        d = processor_config
        kind = str(d.get("image_processor_type") or d.get("feature_extractor_type") or "")
        deit = "DeiT" in kind
        mode, size = _hf_size(d.get("size", 256 if deit else 224))
        resample = int(d.get("resample", 3 if deit else 2))
        names = {int(v): k for k, v in INTERPOLATIONS.items()}
        if resample not in names:
            raise ValueError(f"unsupported resample value {resample}")
        crop: tuple[int, int] | None = None
        if d.get("do_center_crop", deit):
            crop_mode, crop_size = _hf_size(d.get("crop_size", 224))
            if crop_mode != "squash" or isinstance(crop_size, int):
                raise ValueError(f"crop_size must be an int or height/width, got {d['crop_size']}")
            crop = crop_size
        normalize, rescale = d.get("do_normalize", True), d.get("do_rescale", True)
        mean = _triple(d.get("image_mean", HF_STANDARD_MEAN)) if normalize else (0.0,) * 3
        std = _triple(d.get("image_std", HF_STANDARD_STD)) if normalize else (1.0,) * 3
        return cls(
            resize_mode=mode if d.get("do_resize", True) else "none",
            resize_size=size,
            crop_size=crop,
            interpolation=names[resample],
            mean=mean,
            std=std,
            rescale_factor=float(d.get("rescale_factor", 1 / 255)) if rescale else 1.0,
            crop_rounding="floor",
            source="hf preprocessor_config.json",
        )

    def to_hf(self, *, exact: bool = False) -> dict[str, Any]:
        """A v5 ``preprocessor_config.json`` dict for transformers' ``DeiTImageProcessor``.

        Transformers floors crop offsets; a ``crop_rounding="round"`` config can then differ by a
        one-pixel shift of the crop on images whose margin is 3 (mod 4). That is accepted unless
        ``exact`` is set. RGB conversion is written as ``do_convert_rgb`` (transformers also
        composites transparency on white).

        Args:
            exact: Raise unless transformers reproduces this config on every image.

        Raises:
            ValueError: Grayscale output or background inversion (transformers has neither), or
                an inexact crop when ``exact`` is set.
        """
        if self.channels != 3 or self.invert_light_background or self.resize_mode == "longer":
            raise ValueError(
                "transformers' DeiTImageProcessor can't convert to grayscale, "
                "invert backgrounds or letterbox; keep this config in deit format"
            )
        if exact and self.crop_size is not None and not self._hf_crop_is_exact():
            raise ValueError(
                "transformers floors center-crop offsets, this config rounds them "
                "(torchvision); the crop may shift by one pixel"
            )
        out: dict[str, Any] = {
            "image_processor_type": "DeiTImageProcessor",
            "do_resize": self.resize_mode != "none",
            "resample": int(INTERPOLATIONS[self.interpolation]),
            "do_center_crop": self.crop_size is not None,
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }
        if self.resize_mode == "shorter":
            out["size"] = {"shortest_edge": self.resize_size}
        elif self.resize_mode == "squash":
            out["size"] = _hw_dict(self.resize_size)
        if self.crop_size is not None:
            out["crop_size"] = _hw_dict(self.crop_size)
        return out

    def _hf_crop_is_exact(self) -> bool:
        if self.crop_rounding == "floor":
            return True
        if self.resize_mode != "squash":  # resized size depends on the image
            return False
        resize, crop = _pair(self.resize_size), _pair(self.crop_size)
        return all(
            crop_offset(n, m, "round") == crop_offset(n, m, "floor")
            for n, m in zip(resize, crop, strict=True)
        )


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _pair(value: Any) -> tuple[int, int]:
    """(height, width) from an int (square) or a pair."""
    if isinstance(value, int):
        value = (value, value)
    if len(value) != 2 or any(int(v) <= 0 for v in value):
        raise ValueError(f"sizes must be a positive int or (height, width), got {value!r}")
    return int(value[0]), int(value[1])


def _triple(value: Any) -> tuple[float, ...]:
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(value)


def _hw_dict(hw: Any) -> dict[str, int]:
    return {"height": int(hw[0]), "width": int(hw[1])}


def _hf_size(size: Any) -> tuple[Literal["shorter", "squash"], int | tuple[int, int]]:
    """(resize_mode, resize_size) of a transformers ``size`` value."""
    if isinstance(size, Mapping):
        size = {k: v for k, v in size.items() if v is not None}
        if set(size) == {"height", "width"}:
            return "squash", (int(size["height"]), int(size["width"]))
        if set(size) == {"shortest_edge"}:
            return "shorter", int(size["shortest_edge"])
        raise ValueError(f"unsupported size {dict(size)}: use height/width or shortest_edge")
    return "squash", _pair(size)


# --------------------------------------------------------------------------- pixels


def to_mode(img: Image.Image, channels: int = 3) -> Image.Image:
    """Convert any PIL mode to ``"RGB"`` (channels 3) or ``"L"`` (channels 1).

    Transparent images (an alpha band or a ``transparency`` key: RGBA, LA, PA, P/L/RGB with tRNS)
    are composited on a white background first, like transformers' ``convert_to_rgb``. 16-bit
    modes scale 0..65535 to 0..255; ``I`` is read as 16-bit if any value exceeds 255; ``F`` is
    read as [0, 1] if its maximum is <= 1, else clipped to [0, 255]. CMYK, YCbCr, 1, P and others
    use PIL's own conversions.

    Raises:
        ImageLoadError: PIL has no conversion from this mode.
    """
    target = {3: "RGB", 1: "L"}[channels]
    if img.mode in _HIGH_DEPTH_MODES:
        img = _to_8bit(img)
    try:
        if any(b in ("A", "a") for b in img.getbands()) or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        return img if img.mode == target else img.convert(target)
    except ValueError as exc:
        raise NotAnImageError(f"unsupported image mode {img.mode}: {exc}") from exc


def _to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
        out = np.clip(np.nan_to_num(arr.astype(np.float64) * scale), 0, 255)
    elif img.mode.startswith("I;16") or (arr.size and int(arr.max()) > 255):
        out = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    else:
        out = np.clip(arr, 0, 255)
    return Image.fromarray(np.rint(out).astype(np.uint8), "L")


def has_light_background(img: Image.Image) -> bool:
    """True if the image's border band is light: mean gray level > 127.

    The band is ``max(1, min(H, W) // 32)`` pixels wide on each of the four sides, measured after
    conversion to grayscale (``"L"``).
    """
    gray = np.asarray(img if img.mode == "L" else img.convert("L"))
    b = max(1, min(gray.shape) // 32)
    band = (gray[:b], gray[-b:], gray[b:-b, :b], gray[b:-b, -b:])
    total = sum(float(p.sum(dtype=np.int64)) for p in band)
    return total / max(1, sum(p.size for p in band)) > 127


def resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) of a ``width`` x ``height`` image after ``cfg``'s resize step."""
    if cfg.resize_mode == "none":
        return width, height
    if cfg.resize_mode == "squash":
        new_h, new_w = cfg.resize_size  # type: ignore[misc]
        return new_w, new_h
    if cfg.resize_mode == "longer":
        scale = cfg.resize_size / max(width, height)  # type: ignore[operator]
        return max(1, round(width * scale)), max(1, round(height * scale))
    if width <= height:  # torchvision Resize(int): long = int(size * long / short)
        return cfg.resize_size, int(cfg.resize_size * height / width)  # type: ignore[return-value,operator]
    return int(cfg.resize_size * width / height), cfg.resize_size  # type: ignore[return-value,operator]


def check_resize(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """:func:`resized_size`, refusing a resize that would make a side longer than ``MAX_SIZE``.

    Only ``"shorter"`` can: a 1 x 8,192 image (8,192 pixels) resized to a shorter side of 256
    would be 256 x 2,097,152 pixels, gigabytes before the crop. Such an image is refused
    before anything is allocated; every other resize is bounded by the config's sizes (or is
    no resize at all).

    Raises:
        ImageTooLargeError: The resized image would exceed ``MAX_SIZE`` px on a side.
    """
    new_w, new_h = resized_size(width, height, cfg)
    if (new_w, new_h) != (width, height) and max(new_w, new_h) > MAX_SIZE:
        raise ImageTooLargeError(
            f"image too elongated: {width}x{height} pixels would be resized to {new_w}x{new_h} "
            f"(limit {MAX_SIZE} px per side)"
        )
    return new_w, new_h


def preprocess_pixels(width: int, height: int, cfg: PreprocessConfig) -> int:
    """Pixels that preprocessing a ``width`` x ``height`` image with ``cfg`` holds at most.

    The sum of the decoded image, its resized copy (when the resize changes its size: the
    whole resized image, before its crop, since some resizes are not computed crop-only) and
    the output. This is what a pixel budget should count: a 1 x 8,192 image costs 8,192
    decoded pixels but 537 million once resized to a shorter side of 256. Images that
    :func:`check_resize` refuses get their full cost too (they never reach that far).
    """
    if width <= 0 or height <= 0:
        return 0
    new_w, new_h = resized_size(width, height, cfg)
    resized = 0 if (new_w, new_h) == (width, height) else new_w * new_h
    out_h, out_w = cfg.crop_size if cfg.crop_size is not None else (new_h, new_w)
    return width * height + resized + out_h * out_w


def resize_image(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize per ``cfg.resize_mode`` with the configured PIL filter (bounded, see
    :func:`check_resize`)."""
    size = check_resize(*img.size, cfg)
    if size == img.size:
        return img
    return img.resize(size, INTERPOLATIONS[cfg.interpolation])


def resize_and_crop(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """``cfg``'s resize, then its center crop: an (H, W[, C]) uint8 array.

    Where the crop lies inside the resized image, only the kept pixels are computed (PIL's
    resize of a source box), in row bands on several threads for large images. That path is
    taken only where it gives the same pixels as resizing everything and cropping (see
    :mod:`deit.box_resize`); elsewhere everything is resized, then cropped.
    """
    if cfg.crop_size is None:
        return np.asarray(resize_image(img, cfg))
    size = check_resize(*img.size, cfg)
    (ch, cw), (new_w, new_h) = cfg.crop_size, size
    top = crop_offset(new_h, ch, cfg.crop_rounding)
    left = crop_offset(new_w, cw, cfg.crop_rounding)
    resample = INTERPOLATIONS[cfg.interpolation]
    if (
        new_h >= ch
        and new_w >= cw
        and new_w != img.width
        and new_h != img.height
        and resample != Image.Resampling.NEAREST
        and box_resize_is_exact()
    ):
        out = cropped_resize(img, size, (left, top, cw, ch), resample)
        if out is not None:
            return out
    return center_crop_array(np.asarray(resize_image(img, cfg)), cfg.crop_size, cfg.crop_rounding)


def crop_offset(size: int, crop: int, rounding: Literal["round", "floor"]) -> int:
    """Start of a centered window of length ``crop`` in ``size`` (negative: zero padding first)."""
    margin = size - crop
    if margin >= 0:
        return round(margin / 2.0) if rounding == "round" else margin // 2  # half to even
    return -(-margin // 2) if rounding == "round" else -((-margin + 1) // 2)


def center_crop_array(
    arr: np.ndarray, crop_hw: tuple[int, int], rounding: Literal["round", "floor"] = "round"
) -> np.ndarray:
    """Center crop an (H, W[, C]) array, padding with zeros where the crop exceeds it."""
    (h, w), (ch, cw) = arr.shape[:2], crop_hw
    top, left = crop_offset(h, ch, rounding), crop_offset(w, cw, rounding)
    if h >= ch and w >= cw:
        return arr[top : top + ch, left : left + cw]  # a view, no copy
    out = np.zeros((ch, cw, *arr.shape[2:]), dtype=arr.dtype)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + ch, h), min(left + cw, w)
    out[y0 - top : y1 - top, x0 - left : x1 - left] = arr[y0:y1, x0:x1]
    return out


@lru_cache(maxsize=32)
def _normalize_lut(
    rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """(C, 256) float32 table: value v of channel c -> its normalized float."""
    x = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean_, std_ = np.asarray(mean, np.float32)[:, None], np.asarray(std, np.float32)[:, None]
    lut = (x[None, :] - mean_) / std_
    lut.flags.writeable = False
    return lut


def normalize_array(arr: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(H, W[, C]) uint8 -> (C, H, W) float32: ``(v * rescale_factor - mean) / std``."""
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    lut = _normalize_lut(cfg.rescale_factor, cfg.mean, cfg.std)
    out = np.empty((arr.shape[2], arr.shape[0], arr.shape[1]), dtype=np.float32)
    for c in range(arr.shape[2]):
        np.take(lut[c], arr[:, :, c], out=out[c], mode="clip")
    return out


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """One image -> (C, H, W) float32 tensor, per ``cfg``."""
    img = to_mode(img, cfg.channels)
    if cfg.invert_light_background and has_light_background(img):
        img = ImageOps.invert(img)
    return torch.from_numpy(normalize_array(resize_and_crop(img, cfg), cfg))


def preprocess(
    images: Sequence[ImageLike] | ImageLike,
    cfg: PreprocessConfig,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    fast_decode: bool = False,
) -> torch.Tensor:
    """Load and preprocess one image or a sequence of them into a (B, C, H, W) float32 batch.

    A 4-D array (BHWC) or tensor (BCHW) counts as a batch.

    Raises:
        ImageLoadError: An input can't be loaded (see :func:`load_image`).
        ValueError: No images, or outputs of different sizes (a config without a crop).
    """
    single = isinstance(
        images,
        (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor),
    ) or hasattr(images, "read")
    if single and not (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
        images = [images]  # type: ignore[list-item]
    tensors = [
        preprocess_image(load_image(x, max_pixels=max_pixels, fast_decode=fast_decode), cfg)  # type: ignore[arg-type]
        for x in images  # type: ignore[union-attr]  # a sequence once wrapped
    ]
    if not tensors:
        raise ValueError("no images to preprocess")
    if len({t.shape for t in tensors}) > 1:
        raise ValueError("images have different sizes after preprocessing; set a crop_size")
    return torch.stack(tensors)
