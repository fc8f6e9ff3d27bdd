"""Tests for deit.transforms: parity with transformers (PIL backend), official DeiT and timm,
every PIL mode; and for deit.images' loader failures."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from deit import box_resize as resizing
from deit.errors import ImageLoadError
from deit.images import DEFAULT_MAX_PIXELS, load_image
from deit.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    center_crop_array,
    crop_offset,
    has_light_background,
    preprocess,
    preprocess_image,
    resize_and_crop,
    resized_size,
    to_mode,
)

from .conftest import SAMPLE_IMAGES

TOL = 1e-6


IMAGES = SAMPLE_IMAGES


def _photo_paths() -> list[Path]:
    return sorted(p for p in IMAGES.glob("*") if p.suffix in (".png", ".jpg"))


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {p.name: load_image(p) for p in _photo_paths()}


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return load_image(IMAGES / "chelsea.png").convert("RGB")


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- transformers

LEGACY = {
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "DeiTFeatureExtractor",
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
    "resample": 3,
}
HUB_FILES = {  # as the Hub stores them
    "tiny-distilled-224": {**LEGACY, "size": 224, "crop_size": 224},
    "small-distilled-224": {**LEGACY, "size": 256, "crop_size": 224},
    "base-distilled-384": {**LEGACY, "size": 438, "crop_size": 384},
    "vit-style-224": {
        "do_normalize": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": 224,
    },
}


def _hf_processor(tmp_path: Path, processor_config: dict, **kwargs):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor_config))
    model_type = "deit" if "DeiT" in json.dumps(processor_config) else "vit"
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    proc = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil", **kwargs)
    assert proc.backend == "pil"
    return proc


def _hf_run(proc, img: Image.Image) -> torch.Tensor:
    return proc(images=img, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("name", sorted(HUB_FILES))
def test_matches_transformers_on_photos(name, photos, tmp_path):
    proc = _hf_processor(tmp_path, HUB_FILES[name])
    cfg = PreprocessConfig.from_hf(HUB_FILES[name])
    for photo, img in photos.items():
        ours = preprocess(img, cfg)[0]
        assert _maxdiff(ours, _hf_run(proc, img.convert("RGB"))) <= TOL, photo


def test_from_hf_fields():
    tiny = PreprocessConfig.from_hf(HUB_FILES["tiny-distilled-224"])
    assert (tiny.resize_mode, tiny.resize_size) == ("squash", (224, 224))
    assert tiny.crop_size == (224, 224)
    assert (tiny.interpolation, tiny.crop_rounding) == ("bicubic", "floor")
    vit = PreprocessConfig.from_hf(HUB_FILES["vit-style-224"])
    assert (vit.crop_size, vit.interpolation, vit.mean) == (None, "bilinear", (0.5, 0.5, 0.5))
    assert vit.input_size == (224, 224)
    v5 = PreprocessConfig.from_hf(
        {
            "image_processor_type": "DeiTImageProcessor",
            "size": {"shortest_edge": 256},
            "do_normalize": False,
            "do_rescale": False,
        }
    )
    assert (v5.resize_mode, v5.resize_size, v5.crop_size) == ("shorter", 256, (224, 224))
    assert (v5.mean, v5.std, v5.rescale_factor) == ((0.0,) * 3, (1.0,) * 3, 1.0)
    assert PreprocessConfig.from_hf({"do_resize": False}).resize_mode == "none"
    with pytest.raises(ValueError, match="unsupported size"):
        PreprocessConfig.from_hf({"size": {"shortest_edge": 224, "longest_edge": 512}})


def _mode_variants(rgb: Image.Image) -> dict[str, tuple[Image.Image, Image.Image | None]]:
    """mode name -> (image in that mode, the RGB image HF should get, None = HF converts)."""
    gray = np.asarray(rgb.convert("L"))
    alpha = Image.fromarray(
        np.tile(np.linspace(0, 255, rgb.width).astype(np.uint8), (rgb.height, 1))
    )
    gray_rgb = Image.fromarray(gray).convert("RGB")
    rgba, la = rgb.copy(), rgb.convert("L")
    rgba.putalpha(alpha)
    la.putalpha(alpha)
    p_trns = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    p_trns.info["transparency"] = 0
    return {
        "RGB": (rgb, None),
        "L": (rgb.convert("L"), None),
        "1": (rgb.convert("1"), None),
        "P": (rgb.convert("P", palette=Image.Palette.ADAPTIVE), None),
        "P+trns": (p_trns, None),
        "RGBA": (rgba, None),
        "LA": (la, None),
        "PA": (rgba.convert("PA"), None),
        "CMYK": (rgb.convert("CMYK"), None),
        "YCbCr": (rgb.convert("YCbCr"), None),
        # high bit depths: HF clips them; the expected 8-bit image is written out by hand
        "I;16": (Image.fromarray(gray.astype(np.uint16) * 257), gray_rgb),
        "I": (Image.fromarray(gray.astype(np.int32) * 257), gray_rgb),
        "I<=255": (Image.fromarray(gray.astype(np.int32)), gray_rgb),
        "F": (Image.fromarray(gray.astype(np.float32) / 255), gray_rgb),
    }


def test_every_mode_matches_transformers(chelsea, tmp_path):
    proc = _hf_processor(tmp_path, HUB_FILES["small-distilled-224"], do_convert_rgb=True)
    cfg = PreprocessConfig.from_hf(HUB_FILES["small-distilled-224"])
    gray_cfg = dataclasses.replace(cfg, channels=1, mean=(0.5,), std=(0.5,))
    for name, (img, expected_rgb) in _mode_variants(chelsea).items():
        assert img.mode == name.split("+")[0].split("<")[0], name
        ours = preprocess_image(img, cfg)
        # do_convert_rgb: PIL's convert("RGB"), transparency composited on white (as ours)
        assert _maxdiff(ours, _hf_run(proc, expected_rgb or img)) <= TOL, name
        assert preprocess_image(img, gray_cfg).shape == (1, 224, 224), name


def test_to_mode_composites_on_white_and_scales_16_bit():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_mode(clear, 3).getpixel((0, 0)) == (255, 255, 255)
    assert to_mode(clear, 1).getpixel((0, 0)) == 255
    deep = Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    assert np.asarray(to_mode(deep, 1)).tolist() == [[0, 1, 128, 255]]
    assert to_mode(Image.new("F", (1, 1), 0.5), 1).getpixel((0, 0)) == 128
    assert to_mode(Image.new("F", (1, 1), 300.0), 1).getpixel((0, 0)) == 255


def test_to_hf_loads_in_transformers_and_matches(photos, tmp_path):
    floor_card = dataclasses.replace(PreprocessConfig.model_card(), crop_rounding="floor")
    for i, cfg in enumerate(
        [
            PreprocessConfig.from_hf(HUB_FILES["base-distilled-384"]),
            PreprocessConfig.from_hf(HUB_FILES["vit-style-224"]),
            floor_card,
        ]
    ):
        hf_dict = cfg.to_hf(exact=True)
        proc = _hf_processor(tmp_path / str(i), hf_dict)
        assert type(proc).__name__ == "DeiTImageProcessorPil"
        assert dataclasses.replace(PreprocessConfig.from_hf(hf_dict), source=cfg.source) == cfg
        for photo, img in photos.items():
            assert _maxdiff(preprocess(img, cfg)[0], _hf_run(proc, img)) <= TOL, (i, photo)


def test_to_hf_refuses_what_transformers_cannot_do():
    card = PreprocessConfig.model_card()
    assert card.to_hf()["size"] == {"shortest_edge": 256}  # approximate crop offsets allowed
    with pytest.raises(ValueError, match="floors center-crop"):
        card.to_hf(exact=True)
    squash = PreprocessConfig(resize_mode="squash", resize_size=256, crop_rounding="round")
    assert squash.to_hf(exact=True)["size"] == {"height": 256, "width": 256}  # margin 32: same
    with pytest.raises(ValueError, match="grayscale"):
        PreprocessConfig(channels=1, mean=(0.5,), std=(0.5,)).to_hf()
    with pytest.raises(ValueError, match="invert"):
        PreprocessConfig(invert_light_background=True).to_hf()


# --------------------------------------------------------------------------- official, timm


@pytest.mark.parametrize("img_size", [224, 384])
def test_matches_official_eval_transform(img_size, photos):
    T = pytest.importorskip("torchvision.transforms")
    reference = T.Compose(
        [
            T.Resize(int(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    cfg = PreprocessConfig.official(img_size)
    assert cfg.resize_size == {224: 256, 384: 438}[img_size]
    for photo, img in photos.items():
        assert _maxdiff(preprocess(img, cfg)[0], reference(img.convert("RGB"))) <= TOL, photo


@pytest.mark.parametrize(
    ("name", "img_size", "crop_pct", "resize"),
    [
        ("deit_tiny_patch16_224.fb_in1k", 224, 0.9, 248),
        ("deit_base_patch16_384.fb_in1k", 384, 1.0, 384),
    ],
)
def test_matches_timm_eval_transform(name, img_size, crop_pct, resize, photos):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    data_cfg = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    reference = create_transform(**data_cfg)
    assert data_cfg["crop_pct"] == crop_pct and f"size={resize}," in repr(reference)
    cfg = PreprocessConfig.timm(img_size, crop_pct=crop_pct)
    assert cfg.resize_size == resize
    for photo, img in photos.items():
        assert _maxdiff(preprocess(img, cfg)[0], reference(img.convert("RGB"))) <= TOL, photo


def test_center_crop_matches_torchvision_and_transformers():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    hf_crop = pytest.importorskip("transformers.image_transforms").center_crop
    rng = np.random.default_rng(0)
    for h, w, ch, cw in [
        (7, 9, 4, 4),
        (10, 13, 6, 6),
        (5, 5, 8, 9),
        (4, 11, 7, 4),
        (9, 6, 2, 9),
        (27, 28, 28, 28),
        (28, 27, 28, 28),
        (9, 9, 10, 8),  # one pixel short: pads, not slices
    ]:
        arr = rng.integers(1, 255, (h, w, 3), dtype=np.uint8)
        ours = center_crop_array(arr, (ch, cw), "round")
        tv = np.asarray(tvf.center_crop(Image.fromarray(arr), [ch, cw]))
        assert np.array_equal(ours, tv), (h, w, ch, cw)
        hf = hf_crop(arr.transpose(2, 0, 1), (ch, cw), input_data_format="channels_first")
        assert np.array_equal(center_crop_array(arr, (ch, cw), "floor"), hf.transpose(1, 2, 0))


# --------------------------------------------------------------------------- loading


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(64)))
        + chunk(b"IEND", b"")
    )


def _jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello, not an image\n")
    jpeg = _jpeg_bytes(Image.effect_noise((300, 200), 60).convert("RGB"), quality=95)
    cases = {
        "file not found": tmp_path / "missing.png",
        "not a file": tmp_path,
        "empty file": tmp_path / "empty.jpg",
        "not an image file": tmp_path / "notes.txt",
        "truncated or corrupt": jpeg[: len(jpeg) // 2],
        "image too large": _png_header(20_000, 20_000),  # PIL's own DecompressionBombError
    }
    for reason, source in cases.items():
        with pytest.raises(ImageLoadError, match=reason):
            load_image(source)
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(io.BytesIO(b""))
    with pytest.raises(ImageLoadError):
        load_image(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # corrupt after the signature
    with pytest.raises(ImageLoadError, match="unsupported input type"):
        load_image(12345)  # type: ignore[arg-type]


def test_pixel_limit(tmp_path):
    img = Image.new("RGB", (451, 300))
    with pytest.raises(ImageLoadError, match="451x300 pixels exceeds limit of 1000"):
        load_image(_jpeg_bytes(img), max_pixels=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        with pytest.raises(ImageLoadError, match="image too large"):
            load_image(_png_header(10_000, 10_000))  # 1e8 > DEFAULT_MAX_PIXELS
        with pytest.raises(ImageLoadError, match="truncated or corrupt"):
            load_image(_png_header(10_000, 10_000), max_pixels=None)  # passes the size check
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # global PIL setting untouched


def test_animated_gif_gives_first_frame():
    path = IMAGES / "no_time_for_that_tiny.gif"
    with Image.open(path) as gif:
        assert gif.n_frames > 1
        first = gif.convert("RGB")
        gif.seek(1)
        second = gif.convert("RGB")
    img = load_image(path)
    assert not getattr(img, "is_animated", False)
    assert np.array_equal(np.asarray(to_mode(img)), np.asarray(first))
    assert not np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_webp_give_first_frame(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (16, 16), c) for c in [(250, 0, 0), (0, 0, 250), (0, 250, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], lossless=True)
    img = load_image(buf.getvalue())
    r, g, b = to_mode(img).getpixel((8, 8))
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    loaded = load_image(_jpeg_bytes(img, exif=exif.tobytes(), quality=95))
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_array_and_tensor_inputs():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    cfg = PreprocessConfig(crop_size=(32, 32), resize_size=40)
    expected = preprocess(Image.fromarray(hwc), cfg)
    inputs = [
        hwc,
        hwc.astype(np.float32) / 255,
        torch.from_numpy(hwc).permute(2, 0, 1),
        torch.from_numpy(hwc).permute(2, 0, 1).double() / 255,
        _jpeg_bytes(Image.fromarray(hwc), quality=100),
    ]
    for x in inputs[:4]:
        assert _maxdiff(preprocess(x, cfg), expected) == 0.0, type(x)
    assert preprocess(inputs, cfg).shape == (5, 3, 32, 32)
    gray = hwc[..., 0]
    assert load_image(gray).mode == "L"
    assert load_image(torch.from_numpy(gray)).mode == "L"
    assert load_image(gray[..., None]).mode == "L"
    assert load_image(np.dstack([hwc, gray])).mode == "RGBA"
    assert preprocess(np.stack([hwc, hwc]), cfg).shape == (2, 3, 32, 32)  # BHWC batch
    for bad, reason in [
        (hwc.astype(np.float32), r"\[0, 1\]"),
        (hwc.astype(np.int64), "dtype"),
        (np.zeros((4, 4, 2), np.uint8), "HW or HWC"),
        (torch.zeros(5, 4, 4), "CHW"),
    ]:
        with pytest.raises(ImageLoadError, match=reason):
            load_image(bad)


def test_file_inputs_agree(tmp_path):
    img = Image.effect_noise((64, 48), 40).convert("RGB")
    path = tmp_path / "x.png"
    img.save(path)
    cfg = PreprocessConfig(resize_size=40, crop_size=(32, 32))
    batch = preprocess(
        [path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes()), img], cfg
    )
    assert all(torch.equal(batch[0], b) for b in batch)


def test_invert_light_background():
    white = Image.new("L", (28, 28), 255)
    white.paste(0, (8, 8, 20, 20))  # a dark item on white, like a product photo
    dark = Image.new("L", (28, 28), 0)
    dark.paste(255, (8, 8, 20, 20))  # Fashion-MNIST style: light item on black
    assert has_light_background(white) and not has_light_background(dark)
    cfg = PreprocessConfig(
        resize_mode="none",
        crop_size=None,
        channels=1,
        mean=(0.5,),
        std=(0.5,),
        invert_light_background=True,
    )
    assert torch.equal(preprocess_image(white, cfg), preprocess_image(dark, cfg))
    assert preprocess_image(white.convert("RGB"), cfg)[0, 0, 0] == -1.0


# --------------------------------------------------------------------------- config


def test_config_round_trip_and_validation():
    gray = PreprocessConfig(channels=1, mean=(0.2,), std=(0.3,), invert_light_background=True)
    for cfg in [
        PreprocessConfig.model_card(),
        PreprocessConfig.official(384),
        PreprocessConfig.timm(224),
        PreprocessConfig.from_hf(HUB_FILES["vit-style-224"]),
        gray,
    ]:
        d = json.loads(json.dumps(cfg.to_dict()))
        assert PreprocessConfig.from_dict(d) == cfg
    assert PreprocessConfig.model_card().input_size == (224, 224)
    assert PreprocessConfig.official(384).resize_size == 438
    assert PreprocessConfig.timm(384, crop_pct=1.0).resize_size == 384
    with pytest.raises(ValueError, match="bogus, extra"):
        PreprocessConfig.from_dict({**PreprocessConfig().to_dict(), "extra": 1, "bogus": 2})
    bad = [
        {"interpolation": "cubic"},
        {"mean": (0.5,)},
        {"resize_mode": "squish"},
        {"resize_size": (256, 256)},
        {"channels": 2},
        {"crop_rounding": "ceil"},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            PreprocessConfig(**kwargs)
    with pytest.raises(ValueError, match="depends on the image"):
        _ = PreprocessConfig(crop_size=None).input_size


def test_preprocess_batch_errors():
    cfg = PreprocessConfig(crop_size=None, resize_size=16)
    with pytest.raises(ValueError, match="no images"):
        preprocess([], cfg)
    with pytest.raises(ValueError, match="different sizes"):
        preprocess([Image.new("RGB", (32, 16)), Image.new("RGB", (16, 16))], cfg)


def test_fast_decode_is_close(tmp_path):
    base = np.asarray(Image.radial_gradient("L").resize((1600, 1200)).convert("RGB"))
    data = _jpeg_bytes(Image.fromarray(base), quality=90)
    exact = preprocess(data, PreprocessConfig.model_card())
    fast = preprocess(data, PreprocessConfig.model_card(), fast_decode=True)
    assert load_image(data, fast_decode=True).size == (800, 600)  # decoded at 1/2 scale
    assert float((exact - fast).abs().mean()) < 0.02


def test_concurrent_loads_leave_warning_filters_alone():
    from concurrent.futures import ThreadPoolExecutor

    before = list(warnings.filters)
    sources = [_png_header(10_000, 10_000), _jpeg_bytes(Image.new("RGB", (64, 48)))] * 40

    def attempt(source: bytes) -> str:
        try:
            return load_image(source).mode
        except ImageLoadError as err:
            return str(err)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, sources))
    assert results[1] == "RGB" and results[0].startswith("image too large")
    assert warnings.filters == before


def test_longer_side_resize_letterboxes() -> None:
    """``longer`` + a crop of the same size pads the short side with black, aspect kept."""
    cfg = PreprocessConfig(
        resize_mode="longer",
        resize_size=28,
        crop_size=28,
        channels=1,
        mean=(0.0,),
        std=(1.0,),
        interpolation="bilinear",
    )
    wide = Image.new("L", (40, 20), color=255)
    out = preprocess_image(wide, cfg)[0]
    assert out.shape == (28, 28)
    assert torch.all(out[7:21] == 1.0) and torch.all(out[:7] == 0) and torch.all(out[21:] == 0)
    same = Image.fromarray(np.arange(784, dtype=np.uint8).reshape(28, 28) % 251)
    assert torch.equal(
        preprocess_image(same, cfg)[0] * 255, torch.from_numpy(np.array(same)).float()
    )
    with pytest.raises(ValueError, match="letterbox"):
        cfg.to_hf()
    for size in [(994, 961), (961, 994), (29, 28)]:  # a side resized to 27: one row of padding
        nearly_square = Image.new("L", size, color=255)
        out = preprocess_image(nearly_square, cfg)[0]
        assert out.shape == (28, 28), size
        assert out.sum() == 27 * 28, size


SQUASH_64_CROP_56 = PreprocessConfig(resize_mode="squash", resize_size=(64, 64), crop_size=(56, 56))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_resize_and_crop_computes_the_crop_alone_bit_for_bit(mode):
    """The crop-only resize (source box, row bands on threads) equals resize-all-then-crop."""
    rng = np.random.default_rng(1)
    fast = 0
    cases = 0
    filters = [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS]
    for i in range(60):
        width, height = (int(v) for v in rng.integers(20, 700, 2))
        resample = filters[i % 3]
        cfg = dataclasses.replace(
            PreprocessConfig.official(56) if i % 2 else SQUASH_64_CROP_56,
            interpolation={3: "bicubic", 2: "bilinear", 1: "lanczos"}[int(resample)],
            channels=3 if mode == "RGB" else 1,
            mean=IMAGENET_MEAN[: 3 if mode == "RGB" else 1],
            std=IMAGENET_STD[: 3 if mode == "RGB" else 1],
        )
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(
            mode
        )
        new_w, new_h = resized_size(width, height, cfg)
        (ch, cw), rounding = cfg.crop_size, cfg.crop_rounding
        whole = np.asarray(img.resize((new_w, new_h), resample))
        want = center_crop_array(whole, (ch, cw), rounding)
        np.testing.assert_array_equal(resize_and_crop(img, cfg), want)
        top, left = crop_offset(new_h, ch, rounding), crop_offset(new_w, cw, rounding)
        if top < 0 or left < 0:
            continue
        for bands in (1, 2, 3):
            cases += 1
            got = resizing.box_resize(img, (new_w, new_h), (left, top, cw, ch), resample, bands)
            if got is not None:
                fast += 1
                np.testing.assert_array_equal(got, want)
    assert cases > 100 and fast > cases // 2, (fast, cases)  # the fast path is the common one


def test_large_images_resize_in_bands(monkeypatch):
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 450, 3), np.uint8))
    monkeypatch.setattr(resizing, "BAND_MIN_PIXELS", 0)
    monkeypatch.setattr(resizing.os, "cpu_count", lambda: 3)
    assert resizing.bands(img) == 3
    assert resizing.bands(img, alone=False) == 1  # another resize is using the cores
    cfg = PreprocessConfig(resize_mode="squash", resize_size=(256, 256))  # crop 224
    want = np.asarray(img.resize((256, 256), Image.Resampling.BICUBIC))[16:240, 16:240]
    np.testing.assert_array_equal(resize_and_crop(img, cfg), want)
    assert resizing.box_resize_is_exact()
