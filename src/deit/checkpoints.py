"""Checkpoints: detect the format, infer the architecture, load strictly (writing them:
:mod:`deit.saving`).

Formats read:
    official  a ``torch.save``d dict with the weights under ``"model"`` (facebookresearch/deit)
    timm      a bare state dict (``.pth``/``.bin``/``.safetensors``), optionally next to a timm
              ``config.json`` holding ``architecture`` and ``pretrained_cfg``
    hf        a transformers directory: ``config.json`` + ``model.safetensors`` or
              ``pytorch_model.bin`` (+ ``preprocessor_config.json``); DeiT models, and the
              plain checkpoints the Hub stores as ViT models
    deit      this project's directory: ``config.json`` (``"format": "deit"``) and
              ``model.safetensors``
and sources that :mod:`deit.hub` resolves: embedded models, variant names and Hub ids
(``facebook/deit-tiny-distilled-patch16-224``), which it downloads into the local cache.

The model uses the official/timm key names, so only transformers checkpoints are renamed, by
:mod:`deit.hf_keys` (keys and ``config.json``, both directions). Nothing executes code from a
file: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from deit.config import DeiTConfig
from deit.errors import CheckpointError, UnsafeFileError
from deit.hf_keys import config_from_hf, hf_to_timm
from deit.hub import WEIGHT_FILES, download, resolve_source
from deit.labels import imagenet_labels, read_label_file
from deit.model import DeiT, resize_pos_embed
from deit.safety import torch_file_pickles, unsafe_globals
from deit.transforms import PreprocessConfig

StateDict = dict[str, Tensor]
# onnx and openvino: exported files, read by deit.onnx_model and deit.openvino_model
Format = Literal["official", "timm", "hf", "deit", "onnx", "openvino"]
PreprocessChoice = Literal["auto", "model-card", "official", "timm"]

DEFAULT_MODEL = "facebook/deit-tiny-distilled-patch16-224"
# config.json "format" of the CNN classifiers (teachers) that deit.train.teachers saves
CLASSIFIER_FORMAT = "deit-classifier"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Official training checkpoints keep their argparse.Namespace of arguments beside the weights:
# that one plain class is allowed on top of torch's weights-only set, nothing executable.
_ALLOWED_GLOBALS = ("argparse.Namespace",)


@dataclass
class LoadedModel:
    """A model ready for inference, with what it needs to be used correctly."""

    model: DeiT
    config: DeiTConfig
    preprocess: PreprocessConfig
    labels: list[str]
    source: str
    format: Format
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading files


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing, broken or non-object file names itself."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def read_state_dict(path: str | Path) -> tuple[StateDict, Format]:
    """Read the tensors of a weights file; report ``official`` if they sit under ``"model"``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix.lower() == ".pt2":
        raise CheckpointError(
            f"{path} is a torch.export program (deit export --format torch-export), which "
            "predict, info, serve and convert do not load: give them the model it was exported "
            "from, or an .onnx export (deit export --format onnx)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            # Official training checkpoints keep their argparse.Namespace of arguments beside
            # the weights; allow that one plain class, nothing executable.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or unsafe file: say which, never run it
        unsafe = _unsafe_global(path, e)
        if unsafe:
            raise UnsafeFileError(
                f"{path} holds pickled Python objects (GLOBAL {unsafe}), which could run code; "
                "refused: save the weights with safetensors or torch.save(model.state_dict())"
            ) from None
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise CheckpointError(
                f"{path} is not a checkpoint: expected weights ({', '.join(WEIGHT_SUFFIXES)}), "
                "a model directory or (deit predict, info, serve) an exported .onnx file"
            ) from e
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch or safetensors weights file "
            f"(corrupt, or another format: {type(e).__name__})"
        ) from e
    fmt: Format = "timm"
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj, fmt = obj["model"], "official"
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    # Wrappers added by DistributedDataParallel and torch.compile.
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}
    return state, fmt


def _unsafe_global(path: Path, error: Exception) -> str | None:
    """The first global a refused pickle imports that ``weights_only`` loading forbids.

    Taken from torch's message when it names one (its wording changes between releases:
    "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose module x is blocked"),
    else from the file's pickle opcodes (read, never executed).
    """
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    if named:
        return named.group(1)
    if path.suffix == ".safetensors":
        return None
    try:
        for data in torch_file_pickles(path):
            found = unsafe_globals(data, _ALLOWED_GLOBALS)
            if found:
                return found[0]
    except (OSError, zipfile.BadZipFile):
        pass
    return None


# --------------------------------------------------------------------------- architecture


def infer_config(state: StateDict, *, distilled_head: bool = True) -> DeiTConfig:
    """Work out the architecture of an official/timm state dict from its tensor shapes.

    The head count is not visible in the shapes; every published DeiT uses 64 channels per
    head, so ``num_heads = embed_dim // 64``. Other models must come with a config file.
    """
    try:
        proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
        pos = state["pos_embed"]  # (1, prefix + N, D)
        head = state["head.weight"]  # (classes, D)
        fc1 = state["blocks.0.mlp.fc1.weight"]  # (hidden, D)
    except KeyError as e:
        raise CheckpointError(f"not a DeiT state dict: key {e} is missing") from None
    ndims = {"patch_embed.proj.weight": 4, "pos_embed": 3, "head.weight": 2}
    for name, ndim in {**ndims, "blocks.0.mlp.fc1.weight": 2}.items():
        if state[name].ndim != ndim:
            shape = tuple(state[name].shape)
            raise CheckpointError(f"not a DeiT state dict: {name} has shape {shape}")
    dim, chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if dim % 64:
        raise CheckpointError(
            f"embed_dim {dim} is not a multiple of 64, so a bare weights file can't say its "
            "head count: load a model folder whose config.json gives it (deit train and deit "
            "convert write one), or build_model(DeiTConfig(..., num_heads=N), state, source)"
        )
    distilled = "dist_token" in state
    prefix = 2 if distilled else 1
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix:
        raise CheckpointError(
            f"pos_embed has {pos.shape[1] - prefix} patch rows: not a square grid"
        )
    # Depth from the block indices that hold weights, never from the largest index alone: one
    # stray key ("blocks.39999.x") must not make a 40000-block model.
    blocks: dict[int, str] = {}
    for k in state:
        if m := re.match(r"blocks\.(\d+)\.", k):
            blocks.setdefault(int(m[1]), k)
    depth = 1 + max(blocks)
    if len(blocks) != depth:
        gap = min(set(range(depth)) - set(blocks))
        stray = min(i for i in blocks if i > gap)
        raise CheckpointError(
            f"not a DeiT state dict: key {blocks[stray]!r} implies at least {stray + 1} blocks, "
            f"but block {gap} has no weights (a stray or misnumbered key)"
        )
    try:
        return DeiTConfig(
            img_size=side * patch,
            patch_size=patch,
            in_chans=chans,
            num_classes=head.shape[0],
            embed_dim=dim,
            depth=depth,
            num_heads=dim // 64,
            mlp_ratio=fc1.shape[0] / dim,
            distilled=distilled,
            distill_head=not distilled or "head_dist.weight" in state,
            qkv_bias="blocks.0.attn.qkv.bias" in state,
        )
    except ValueError as e:  # over DeiTConfig's limits
        raise CheckpointError(f"not a usable DeiT state dict: {e}") from None


def load_state_dict_strict(model: DeiT, state: StateDict, source: str = "checkpoint") -> None:
    """Load weights, failing with the names of every missing, unexpected or mis-shaped key."""
    check_state_matches(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)


def check_state_matches(
    expected: Mapping[str, Tensor], state: StateDict, source: str = "checkpoint"
) -> None:
    """Fail with the names of every missing, unexpected or mis-shaped key (nothing loaded)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = ", ".join(items[:8]) + (f", … ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def build_model(config: DeiTConfig, state: StateDict, source: str) -> DeiT:
    """A model of ``config`` holding ``state`` (fp32, eval mode).

    The keys and shapes are checked against a model built on the ``meta`` device first (no
    memory), so a configuration that claims a far larger model than the file holds is refused
    before anything is allocated.
    """
    with torch.device("meta"):
        skeleton = DeiT(config)
    check_state_matches(skeleton.state_dict(), state, source)
    model = DeiT(config)
    load_state_dict_strict(model, {k: v.float() for k, v in state.items()}, source)
    return model.eval()


# --------------------------------------------------------------------------- loading


def _default_labels(num_classes: int) -> list[str]:
    return imagenet_labels() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]


def _timm_preprocess(
    config: DeiTConfig, pretrained_cfg: Mapping[str, Any] | None
) -> PreprocessConfig:
    """timm's eval transform: from ``pretrained_cfg`` when given, else timm's DeiT defaults."""
    size = config.image_hw[0]
    cfg = dict(pretrained_cfg or {})
    crop_pct = cfg.get("crop_pct", 1.0 if size >= 384 else 0.9)
    pre = PreprocessConfig.timm(size, crop_pct=crop_pct)
    changes: dict[str, Any] = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
    if "interpolation" in cfg:
        changes["interpolation"] = cfg["interpolation"]
    return dataclasses.replace(pre, **changes) if changes else pre


def _load_dir(path: Path) -> LoadedModel:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json")
    meta = read_json(config_path)
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has neither {' nor '.join(WEIGHT_FILES)}")
    state, _ = read_state_dict(weights)
    source = str(path)
    if meta.get("format") == "deit":  # our own format
        try:
            config = DeiTConfig.from_dict(meta["model"])
            pre = PreprocessConfig.from_dict(meta["preprocess"])
            labels = list(meta["labels"])
        except KeyError as e:
            raise CheckpointError(f"{config_path} (format deit) has no {e.args[0]!r}") from e
        except (TypeError, AttributeError, ValueError) as e:  # names the field
            raise CheckpointError(f"{config_path} (format deit) is malformed: {e}") from e
        return LoadedModel(
            build_model(config, state, source),
            config,
            pre,
            labels,
            source,
            "deit",
            meta.get("metadata", {}),
        )
    if "architecture" in meta and "model_type" not in meta:  # a timm Hub directory
        config = infer_config(state)
        labels = meta.get("label_names") or _default_labels(config.num_classes)
        pre = _timm_preprocess(config, meta.get("pretrained_cfg"))
        return LoadedModel(
            build_model(config, state, source), config, pre, list(labels), source, "timm"
        )
    if meta.get("format") == CLASSIFIER_FORMAT:
        raise CheckpointError(
            f"{path} is a {meta.get('arch', 'CNN')} classifier written by deit train, not a "
            "DeiT: deit eval and distill.teacher take it; predict, export and serve take DeiTs"
        )
    if meta.get("model_type") not in ("deit", "vit"):
        raise CheckpointError(
            f"{config_path} is not a deit, timm or transformers DeiT config "
            f"(format {meta.get('format')!r}, model_type {meta.get('model_type')!r})"
        )
    try:
        config = config_from_hf(meta)
    except (KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{config_path} is not a valid transformers config: {e!r}") from e
    except ValueError as e:  # DeiTConfig's validation, which names the field
        raise CheckpointError(f"{config_path} is not a valid transformers config: {e}") from e
    id2label = meta.get("id2label") or {}
    labels = [
        id2label.get(str(i), id2label.get(i, f"class_{i}")) for i in range(config.num_classes)
    ]
    pre_path = path / "preprocessor_config.json"
    pre = (
        PreprocessConfig.from_hf(read_json(pre_path))
        if pre_path.is_file()
        else PreprocessConfig.model_card()
    )
    return LoadedModel(
        build_model(config, hf_to_timm(state), source), config, pre, labels, source, "hf"
    )


def _load_file(path: Path) -> LoadedModel:
    state, fmt = read_state_dict(path)
    if any(k.startswith(("deit.", "vit.")) for k in state):
        raise CheckpointError(
            f"{path} holds transformers weights: load its directory, "
            "which has the config.json they need"
        )
    config = infer_config(state)
    pre = (
        PreprocessConfig.official(config.image_hw[0])
        if fmt == "official"
        else _timm_preprocess(config, None)
    )
    return LoadedModel(
        build_model(config, state, str(path)),
        config,
        pre,
        _default_labels(config.num_classes),
        str(path),
        fmt,
    )


def load_model(
    source: str | Path = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    preprocess: PreprocessChoice = "auto",
    labels: str | Path | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> LoadedModel:
    """Load a DeiT checkpoint of any supported format, strictly.

    Args:
        source: a weights file, a checkpoint folder, an embedded model name
            (``fashion-mnist``), a variant name or a Hub id.
        device: where to put the model.
        revision: Hub branch, tag or commit.
        preprocess: ``auto`` uses what the checkpoint says (the transformers processor for
            HF folders, official or timm eval transforms for their files); or force
            ``model-card`` (resize 256, crop 224), ``official`` or ``timm``.
        labels: a label file (one name per line, or a JSON list) overriding the names.
        img_size: build the model for another input size: the position embedding is
            resampled (:func:`deit.model.resize_pos_embed`) and the preprocessing scaled.
    """
    resolved = resolve_source(source)
    if isinstance(resolved, str):
        resolved = download(resolved, revision)
        loaded = _load_dir(resolved)
        loaded.source = str(source)
    elif resolved.is_dir():
        loaded = _load_dir(resolved)
    else:
        loaded = _load_file(resolved)
    size = loaded.config.image_hw[0]
    if preprocess != "auto" and (
        loaded.config.in_chans != 3 or (preprocess == "model-card" and size != 224)
    ):
        raise ValueError(
            f"preprocess {preprocess!r} is an RGB ImageNet transform"
            f"{' for 224 px' if preprocess == 'model-card' else ''}; {source} takes "
            f"{loaded.config.in_chans}-channel {size} px images: use preprocess 'auto' "
            "(what the checkpoint says)"
        )
    if preprocess == "model-card":
        loaded.preprocess = PreprocessConfig.model_card()
    elif preprocess == "official":
        loaded.preprocess = PreprocessConfig.official(size)
    elif preprocess == "timm":
        loaded.preprocess = _timm_preprocess(loaded.config, None)
    if labels is not None:
        loaded.labels = read_label_file(labels, loaded.config.num_classes)
    elif len(loaded.labels) != loaded.config.num_classes:  # else IndexError per prediction
        names = resolved / "config.json" if resolved.is_dir() else resolved
        raise CheckpointError(
            f"{names} lists {len(loaded.labels)} labels but the model has "
            f"{loaded.config.num_classes} classes: fix the file or pass a label file (--labels)"
        )
    if img_size is not None:
        resize_input(loaded, img_size)
    loaded.model.to(device)
    return loaded


def as_loaded(model: LoadedModel | DeiT | Any, device: str | torch.device = "cpu") -> LoadedModel:
    """A :class:`LoadedModel` from a loaded model, a ``Classifier``, a bare ``DeiT`` or a source.

    A bare ``DeiT`` gets numbered labels and a preprocessing that squashes images to the
    model's input size (ImageNet mean/std for RGB, 0.5/0.5 for one channel).
    """
    if isinstance(model, LoadedModel):
        return model
    loaded = getattr(model, "loaded", None)  # a deit.inference.Classifier
    if isinstance(loaded, LoadedModel):
        return loaded
    if isinstance(model, DeiT):
        cfg = model.config
        one = cfg.in_chans == 1
        pre = PreprocessConfig(
            resize_mode="squash",
            resize_size=cfg.image_hw,
            crop_size=None,
            channels=cfg.in_chans,
            mean=(0.5,) if one else PreprocessConfig().mean,
            std=(0.5,) if one else PreprocessConfig().std,
            source="default for a bare model",
        )
        labels = [f"class {i}" for i in range(cfg.num_classes)]
        return LoadedModel(model, cfg, pre, labels, "<in-memory model>", "deit")
    if isinstance(model, (str, Path)):
        return load_model(model, device=device)
    raise TypeError(f"expected a LoadedModel, Classifier, DeiT or a source, not {type(model)}")


def resize_input(loaded: LoadedModel, img_size: int | tuple[int, int]) -> None:
    """Rebuild ``loaded`` for another input size, in place.

    The position embedding's patch rows are resampled bicubically (prefix rows kept), as in
    the official fine-tuning at 384 px; the preprocessing's crop becomes the new size and its
    resize is scaled by the same factor.
    """
    old = loaded.config
    new = old.replace(img_size=img_size)
    if new.image_hw == old.image_hw:
        return
    state = loaded.model.state_dict()
    state["pos_embed"] = resize_pos_embed(
        state["pos_embed"], old.num_prefix_tokens, old.grid_size, new.grid_size
    )
    loaded.model = build_model(new, state, loaded.source)
    loaded.config = new
    pre = loaded.preprocess
    scale_h, scale_w = (n / o for n, o in zip(new.image_hw, old.image_hw))
    changes: dict[str, Any] = {"crop_size": new.image_hw} if pre.crop_size is not None else {}
    if pre.resize_mode in ("shorter", "longer"):
        changes["resize_size"] = int(int(pre.resize_size) * scale_h)  # type: ignore[arg-type]  # an int in these modes; 256 → 438 at 384
    elif pre.resize_mode == "squash":
        h, w = pre.resize_size  # type: ignore[misc]
        changes["resize_size"] = (round(h * scale_h), round(w * scale_w))
    loaded.preprocess = dataclasses.replace(pre, **changes)
