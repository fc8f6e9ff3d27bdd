"""The student a run trains: a new DeiT (or classifier), or one adapted from a checkpoint.

:func:`build_student` builds it from the run config; with ``model.init`` the weights come
from a checkpoint and :func:`finetune_state` adapts them to the data (classes, resolution,
channels, distillation token).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from deit.checkpoints import LoadedModel, load_model
from deit.config import VARIANTS, DeiTConfig
from deit.labels import label_map
from deit.model import DeiT, resize_pos_embed
from deit.train.classifiers import build_classifier, is_classifier_dir, load_classifier
from deit.train.data import InputSpec
from deit.train.finetune import freeze
from deit.train.runconfig import TrainConfig


def build_student(
    cfg: TrainConfig,
    num_classes: int,
    spec: InputSpec,
    log: logging.Logger,
    labels: Sequence[str] | None = None,
    loaded: LoadedModel | None = None,
) -> tuple[nn.Module, str]:
    """The model a run trains, and its architecture name (``"deit"`` or a classifier name).

    With ``cfg.model.init`` the architecture comes from that checkpoint (``loaded``, when the
    caller already loaded it) and is adapted to the data (see :func:`finetune_state`); the
    head rows of new classes named like old ones (``labels``) start from the old rows.
    Otherwise ``cfg.model.name`` plus its shape fields. ``model.freeze`` is applied last.
    """
    model, arch = _build(cfg, num_classes, spec, log, labels, loaded)
    m = cfg.model
    if m.freeze != "none" or m.trainable_blocks is not None:
        trained = freeze(model, m.freeze, m.trainable_blocks)
        n_all = sum(p.numel() for p in model.parameters())
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "frozen (model.freeze=%s, trainable_blocks=%s): training %d tensors, %.3fM of "
            "%.3fM parameters",
            m.freeze,
            m.trainable_blocks,
            len(trained),
            n_trained / 1e6,
            n_all / 1e6,
        )
    return model, arch


def _build(
    cfg: TrainConfig,
    num_classes: int,
    spec: InputSpec,
    log: logging.Logger,
    labels: Sequence[str] | None,
    loaded: LoadedModel | None,
) -> tuple[nn.Module, str]:
    m = cfg.model
    if m.init:
        return _from_checkpoint(cfg, num_classes, spec, log, labels, loaded)
    if m.name not in VARIANTS and m.name != "deit":
        return build_classifier(m.name, num_classes, spec.in_chans, m.pretrained), m.name
    fields = {
        k: getattr(m, k)
        for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "distilled")
    }
    config = VARIANTS.get(m.name, DeiTConfig()).replace(
        img_size=spec.img_size,
        in_chans=spec.in_chans,
        num_classes=num_classes,
        drop_path_rate=m.drop_path_rate,
        **{k: v for k, v in fields.items() if v is not None},
    )
    return DeiT(config), "deit"


def _from_checkpoint(
    cfg: TrainConfig,
    num_classes: int,
    spec: InputSpec,
    log: logging.Logger,
    labels: Sequence[str] | None = None,
    loaded: LoadedModel | None = None,
) -> tuple[nn.Module, str]:
    init = cfg.model.init
    if Path(init).is_dir() and is_classifier_dir(init):
        old, config = load_classifier(init)
        model = build_classifier(config["arch"], num_classes, spec.in_chans)
        out_layer = output_layer(old)  # never inherited by position: rows copied by name below
        state = {
            k: v
            for k, v in old.state_dict().items()
            if v.shape == model.state_dict()[k].shape and not k.startswith(out_layer + ".")
        }
        skipped = sorted(set(model.state_dict()) - set(state))
        model.load_state_dict(state, strict=False)
        log.info(
            "fine-tuning %s from %s; re-initialised: %s",
            config["arch"],
            init,
            ", ".join(skipped) or "nothing",
        )
        if labels is not None and config.get("labels"):
            layer = model.get_submodule(out_layer)
            assert isinstance(layer, nn.Linear)
            mapping = label_map(labels, config["labels"])
            old_state = old.state_dict()
            w, b = old_state[f"{out_layer}.weight"], old_state.get(f"{out_layer}.bias")
            with torch.no_grad():
                for i, j in mapping.items():
                    layer.weight[i] = w[j]
                    if b is not None:
                        layer.bias[i] = b[j]
            log_head_matches(log, labels, config["labels"], mapping)
        return model, config["arch"]
    loaded = loaded or load_model(init)
    new = loaded.config.replace(
        img_size=spec.img_size,
        in_chans=spec.in_chans,
        num_classes=num_classes,
        drop_path_rate=cfg.model.drop_path_rate,
        distilled=loaded.config.distilled if cfg.model.distilled is None else cfg.model.distilled,
    )
    state, notes = finetune_state(loaded.model.state_dict(), loaded.config, new)
    model = DeiT(new)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(notes["reinit"]):
        raise ValueError(f"fine-tuning {init}: missing {missing}, unexpected {unexpected}")
    log.info("fine-tuning DeiT from %s: %s", init, "; ".join(notes["log"]) or "same shape")
    if labels is not None and loaded.labels:
        copied = init_head_rows(model, loaded.model.state_dict(), label_map(labels, loaded.labels))
        log_head_matches(log, labels, loaded.labels, copied)
    else:
        log.info("head rows: the initial model has no labels, so every row is new")
    return model, "deit"


def output_layer(model: nn.Module) -> str:
    """The name of a classifier's output layer (its last ``nn.Linear``)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear output layer")
    return names[-1]


def log_head_matches(
    log: logging.Logger, labels: Sequence[str], old: Sequence[str], mapping: dict[int, int]
) -> None:
    """Name every class whose head row starts from the initial model's, and the new ones."""
    new = [labels[i] for i in range(len(labels)) if i not in mapping]
    log.info(
        "head rows: %d of %d classes matched by name to the initial model's labels%s%s",
        len(mapping),
        len(labels),
        (": " + ", ".join(f"{labels[i]} <- {old[j]}" for i, j in mapping.items()))
        if mapping
        else "",
        f"; new rows (random start): {', '.join(new)}" if new else "",
    )


@torch.no_grad()
def init_head_rows(model: DeiT, old: dict[str, Tensor], mapping: dict[int, int]) -> dict[int, int]:
    """Copy the old ``head``/``head_dist`` rows (weight and bias) of matched classes.

    ``mapping`` is new class index -> old class index (:func:`deit.labels.label_map`).
    Rows of unmatched classes keep what they have (the new init, or the old rows when the
    class count did not change). A plain old model's ``head`` also seeds ``head_dist``.

    Returns:
        The mapping actually applied (empty when the old model has no heads of this width).
    """
    heads = [("head", model.head)]
    if model.head_dist is not None:
        heads.append(("head_dist", model.head_dist))
    applied = {}
    for name, layer in heads:
        src = name if f"{name}.weight" in old else "head"
        w, b = old.get(f"{src}.weight"), old.get(f"{src}.bias")
        if w is None or b is None or w.shape[1] != layer.weight.shape[1]:
            continue
        for i, j in mapping.items():
            if j < w.shape[0] and i < layer.weight.shape[0]:
                layer.weight[i] = w[j]
                layer.bias[i] = b[j]
                applied[i] = j
    return applied


def finetune_state(
    state: dict[str, Tensor], old: DeiTConfig, new: DeiTConfig
) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """Adapt a DeiT state dict from config ``old`` to config ``new``.

    Heads are always dropped (so re-initialised: rows are never inherited by position;
    :func:`init_head_rows` copies those of classes matched by name); the position
    embedding is resized bicubically to the new patch grid; the patch projection is summed
    (RGB → gray) or spread (gray → RGB) over input channels; a distillation token is added
    (copied from the class token) or removed.

    Returns:
        The new state dict and ``{"reinit": [keys left to the new init], "log": [notes]}``.
    """

    state, reinit, notes = dict(state), [], []
    pos = state["pos_embed"]
    if old.distilled and not new.distilled:
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        for k in ("dist_token", "head_dist.weight", "head_dist.bias"):
            state.pop(k, None)
        notes.append("removed the distillation token")
    elif new.distilled and not old.distilled:
        pos = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
        state["dist_token"] = state["cls_token"].clone()
        state["head_dist.weight"], state["head_dist.bias"] = (
            state["head.weight"].clone(),
            state["head.bias"].clone(),
        )
        notes.append("added a distillation token (copied from the class token)")
    if old.grid_size != new.grid_size:
        pos = resize_pos_embed(pos, new.num_prefix_tokens, old.grid_size, new.grid_size)
        notes.append(f"pos_embed resized {old.grid_size} -> {new.grid_size}")
    state["pos_embed"] = pos
    w = state["patch_embed.proj.weight"]
    if old.in_chans != new.in_chans:
        if new.in_chans == 1:
            state["patch_embed.proj.weight"] = w.sum(dim=1, keepdim=True)
        elif old.in_chans == 1:
            state["patch_embed.proj.weight"] = w.repeat(1, new.in_chans, 1, 1) / new.in_chans
        else:
            raise ValueError(f"cannot adapt {old.in_chans} input channels to {new.in_chans}")
        notes.append(f"patch embedding adapted from {old.in_chans} to {new.in_chans} channels")
    heads = [k for k in list(state) if k.startswith(("head.", "head_dist."))]
    for k in heads:
        state.pop(k)
    reinit += heads
    notes.append(
        f"re-initialised {', '.join(heads)} ({old.num_classes} -> {new.num_classes} classes; "
        "rows of classes named like old labels are copied next)"
    )
    return state, {"reinit": reinit, "log": notes}
