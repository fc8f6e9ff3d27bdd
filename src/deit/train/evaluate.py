"""Evaluation: top-1/top-5 of both DeiT heads and their average, per class, against a teacher.

``evaluate(model_or_source, data)`` accepts a loaded model or anything
``deit.checkpoints.load_model`` loads (or a CNN directory from ``deit train``), and
``fashion-mnist[:test|train]``, an image-folder directory, or a Dataset. Accuracy follows the
official ``engine.evaluate``: the inference logits (the mean of the two heads for distilled
models), top-k = the label is among the k largest logits, exact dataset averages. All
accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deit.checkpoints import load_model
from deit.errors import UsageError
from deit.inference import EXPORTED_SUFFIXES, Classifier, expand_paths, load_any
from deit.ood import OODStats, Taps, auroc, collect, fit_features, fpr_at_tpr, msp_score
from deit.runtime import resolve_device
from deit.saving import save_model
from deit.train.classifiers import is_classifier_dir, load_classifier, logits_of
from deit.train.data import (
    DeviceBatches,
    ImageFolder,
    InputSpec,
    collate_skip_bad,
    image_eval_transform,
    match_class_folders,
)
from deit.train.fashion_mnist import load_fashion_mnist
from deit.train.losses import split_heads
from deit.train.plot import save_confusion_matrix
from deit.train.teachers import load_teacher
from deit.transforms import preprocess_image


class _Counts:
    """Running sums for one evaluation, kept on the device (one sync at the end)."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        z = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
        self.n, self.loss = 0, z()
        self.hits = {
            k: z()
            for k in (
                "top1",
                "top5",
                "cls_top1",
                "cls_top5",
                "dist_top1",
                "dist_top5",
                "teacher_top1",
                "agreement",
            )
        }
        self.has_dist = self.has_teacher = False
        self.confusion = torch.zeros(num_classes, num_classes, device=device, dtype=torch.long)

    def add(self, out: Any, y: Tensor, teacher_logits: Tensor | None) -> None:
        logits = logits_of(out).float()
        cls_logits, dist_logits = split_heads(out)
        self.n += len(y)
        self.loss += F.cross_entropy(logits, y, reduction="sum")
        k = min(5, logits.shape[-1])
        for name, z in (("", logits), ("cls_", cls_logits), ("dist_", dist_logits)):
            if z is None:
                continue
            top = z.float().topk(k, dim=-1).indices
            self.hits[f"{name}top1"] += (top[:, 0] == y).sum()
            self.hits[f"{name}top5"] += (top == y[:, None]).any(dim=-1).sum()
        self.has_dist |= dist_logits is not None
        pred = logits.argmax(dim=-1)
        self.confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
        if teacher_logits is not None:
            self.has_teacher = True
            t_pred = teacher_logits.argmax(dim=-1)
            self.hits["teacher_top1"] += (t_pred == y).sum()
            self.hits["agreement"] += (t_pred == pred).sum()

    def result(self) -> dict[str, Any]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            packed = torch.stack(
                [
                    self.loss,
                    *self.hits.values(),
                    torch.tensor(float(self.n), device=self.loss.device, dtype=torch.float64),
                ]
            )
            dist.all_reduce(packed)
            dist.all_reduce(self.confusion)
            self.loss, self.n = packed[0], int(packed[-1].item())
            self.hits = dict(zip(self.hits, packed[1:-1], strict=True))
        n = max(self.n, 1)
        out: dict[str, Any] = {"num_samples": self.n, "loss": float(self.loss) / n}
        skip = set() if self.has_dist else {"dist_top1", "dist_top5"}
        skip |= set() if self.has_teacher else {"teacher_top1", "agreement"}
        out.update({k: float(v) / n for k, v in self.hits.items() if k not in skip})
        out["confusion"] = self.confusion.cpu().tolist()
        return out


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Any,
    *,
    device: torch.device,
    precision: str = "fp32",
    num_classes: int,
    teacher: nn.Module | None = None,
) -> dict[str, Any]:
    """Accuracy sums over ``(x, y)`` or ``(x, y, bad)`` batches; the model is put in eval mode.

    Returns:
        ``num_samples``, ``loss``, ``top1``, ``top5``, ``cls_top1``, ``cls_top5``,
        ``dist_top1``/``dist_top5`` (distilled models), ``teacher_top1``/``agreement`` (with a
        teacher), ``confusion`` (rows = true class), ``bad_samples`` (unreadable files).
    """
    was_training = model.training
    model.eval()
    counts, bad = _Counts(num_classes, device), []
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for batch in batches:
        x, y = batch[0], batch[1]
        if len(batch) == 3:
            bad.extend(batch[2])
        if not len(y):
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
            t_logits = teacher(x) if teacher is not None else None
        counts.add(out, y, t_logits)
    model.train(was_training)
    result = counts.result()
    result["bad_samples"] = [{"path": b.path, "reason": b.reason} for b in bad]
    return result


@dataclass
class EvalReport:
    """What ``deit eval`` reports (``to_dict()`` is JSON-able)."""

    source: str
    data: str
    num_samples: int
    top1: float
    top5: float
    cls_top1: float
    cls_top5: float
    loss: float
    dist_top1: float | None = None
    dist_top5: float | None = None
    teacher: str | None = None
    teacher_top1: float | None = None
    agreement: float | None = None  # fraction of samples where student and teacher agree
    per_class: dict[str, float] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    bad_samples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Subject:
    model: nn.Module
    spec: InputSpec
    labels: list[str]
    source: str
    preprocess: Any = None  # PreprocessConfig of a DeiT checkpoint


def _load_subject(source: Any, device: torch.device) -> _Subject:
    if isinstance(source, _Subject):
        return source
    if hasattr(source, "model") and hasattr(source, "preprocess"):  # a LoadedModel
        return _Subject(
            source.model.to(device).eval(),
            InputSpec.of(source),
            list(source.labels),
            str(getattr(source, "source", "model")),
            source.preprocess,
        )
    if isinstance(source, str | Path) and is_classifier_dir(source):
        model, config = load_classifier(source, device)
        spec = InputSpec.from_dict(config["input"])
        return _Subject(model, spec, list(config["labels"]), str(source))
    if isinstance(source, str | Path):
        if Path(source).suffix.lower() in EXPORTED_SUFFIXES:  # .onnx / OpenVINO .xml: CPU engines
            return _load_subject(load_any(source), torch.device("cpu"))
        return _load_subject(load_model(source, device=device), device)
    raise TypeError("evaluate() takes a LoadedModel, a checkpoint path/id, or a model directory")


def _image_transform(subject: _Subject) -> Any:
    """The checkpoint's own eval preprocessing (``deit.transforms``), else the official one."""
    if subject.preprocess is not None:
        pre = subject.preprocess
        return lambda img: preprocess_image(img, pre)
    s = subject.spec
    return image_eval_transform(s.img_size, s.mean, s.std)


def _fashion_mnist_part(data: str) -> tuple[str, slice]:
    """``fashion-mnist[:train|test][[start:stop]]`` as (split, rows); test by default."""
    m = re.fullmatch(r"fashion-mnist(?::(train|test))?(?:\[(\d*):(\d*)\])?", data)
    if m is None:
        raise UsageError(
            f"{data!r}: use fashion-mnist[:train|test], optionally with rows [start:stop]"
        )
    start, stop = (int(v) if v else None for v in m.group(2, 3))
    return m.group(1) or "test", slice(start, stop)


def _batches(
    data: Any,
    subject: _Subject,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    data_root: str | None,
) -> tuple[Any, str]:
    s = subject.spec
    if isinstance(data, str) and data.split(":")[0] == "fashion-mnist":
        split, rows = _fashion_mnist_part(data)
        x, y = load_fashion_mnist(split, data_root)
        x, y = x[rows], y[rows]
        batches = DeviceBatches(
            x.to(device),
            y.to(device),
            batch_size,
            s.mean,
            s.std,
            img_size=s.img_size,
            channels=s.in_chans,
        )
        return batches, data if "[" in data else f"fashion-mnist:{split}"
    if isinstance(data, str) and data.split(":")[0] in ("hf", "webdataset"):
        from deit.train.sources import eval_dataset

        data, data_name = eval_dataset(data, _image_transform(subject), subject.labels, s.in_chans)
        num_workers = 0  # a streamed/relabelled source is read in order by one process
    elif isinstance(data, str | Path):
        classes = match_class_folders(data, subject.labels)
        data_name, data = (
            str(data),
            ImageFolder(data, _image_transform(subject), classes, channels=s.in_chans),
        )
    else:
        data_name = type(data).__name__
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_bad
    )
    return loader, data_name


def evaluate(
    model_or_source: Any,
    data: Any = "fashion-mnist:test",
    *,
    teacher: str | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    data_root: str | None = None,
    confusion_matrix: str | Path | None = None,
    trust_code: bool = False,
) -> EvalReport:
    """Evaluate a classifier on a dataset.

    Args:
        model_or_source: a ``LoadedModel``, or a source for ``deit.checkpoints.load_model``,
            or a CNN directory written by ``deit train``.
        data: ``"fashion-mnist[:test|train]"``, an image-folder directory (class folders
            matched to the model's labels by name when they all exist, else sorted order), or
            a Dataset yielding ``(normalised tensor, label)``.
        teacher: also evaluate this teacher (any ``deit.train.teachers.load_teacher`` source) and
            report its accuracy and the student–teacher agreement.
        batch_size, device, precision, num_workers: how to run.
        data_root: folder of the Fashion-MNIST IDX files (default: the Debian package's).
        confusion_matrix: write a PNG of the confusion matrix here.
        trust_code: allow a teacher file that runs code when loaded (TorchScript, a ``.pt2``
            holding pickles); refused otherwise (``deit.safety``).
    """
    _check_arguments(batch_size, num_workers, confusion_matrix)
    dev = resolve_device(device)
    subject = _load_subject(model_or_source, dev)
    batches, data_name = _batches(data, subject, batch_size, dev, num_workers, data_root)
    t = (
        load_teacher(
            teacher,
            student=subject.spec,
            num_classes=len(subject.labels),
            device=dev,
            trust_code=trust_code,
        )
        if teacher
        else None
    )
    r = evaluate_batches(
        subject.model,
        batches,
        device=dev,
        precision=precision,
        num_classes=len(subject.labels),
        teacher=t,
    )
    report = _report(subject, data_name, teacher, r)
    if confusion_matrix:
        save_confusion_matrix(report.confusion, report.labels, confusion_matrix)
    return report


def _check_arguments(
    batch_size: int, num_workers: int, confusion_matrix: str | Path | None
) -> None:
    """Refuse bad settings before anything loads (a confusion-matrix path that could not be
    written would otherwise fail after the whole evaluation)."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError(
            f"batch size must be >= 1 and workers >= 0, not {batch_size} and {num_workers}"
        )
    if confusion_matrix:
        cm = Path(confusion_matrix)
        if cm.suffix.lower() not in (".png", ".pdf", ".svg"):
            raise ValueError(f"confusion matrix {cm}: use a .png, .pdf or .svg file name")
        if not cm.parent.is_dir():
            raise FileNotFoundError(f"confusion matrix {cm}: folder {cm.parent} does not exist")


REPORTED = (
    "top1",
    "top5",
    "cls_top1",
    "cls_top5",
    "loss",
    "dist_top1",
    "dist_top5",
    "teacher_top1",
    "agreement",
)  # evaluate_batches' metrics that an EvalReport carries (None where absent)


def _report(
    subject: _Subject, data_name: str, teacher: str | None, r: dict[str, Any]
) -> EvalReport:
    """The :class:`EvalReport` of :func:`evaluate_batches`' result ``r``: its metrics and
    each class's accuracy (classes with no images left out)."""
    per_class = {
        name: (row[i] / max(sum(row), 1))
        for i, (name, row) in enumerate(zip(subject.labels, r["confusion"], strict=True))
        if sum(row)
    }
    return EvalReport(
        source=subject.source,
        data=data_name,
        num_samples=r["num_samples"],
        teacher=teacher,
        per_class=per_class,
        labels=subject.labels,
        confusion=r["confusion"],
        bad_samples=r["bad_samples"],
        **{k: r.get(k) for k in REPORTED},  # type: ignore[arg-type]  # floats, or None if absent
    )


# --------------------------------------------------------------------------- out of distribution


def calibrate(
    model_or_source: Any,
    data: Any = "fashion-mnist:train",
    *,
    val_data: Any = None,
    val_fraction: float = 0.1,
    out: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    num_workers: int = 0,
    data_root: str | None = None,
    seed: int = 0,
) -> tuple[OODStats, Path]:
    """Fit a model's out-of-distribution statistics on labelled data and save them with it.

    Args:
        model_or_source: a DeiT checkpoint (anything :func:`deit.checkpoints.load_model`
            reads) or a ``LoadedModel``.
        data: the labelled in-distribution data, with ``deit eval``'s syntax
            (``fashion-mnist[:train|test][[start:stop]]``, an image folder, ``hf:``, ...).
        val_data: held-out data for the threshold (95% of it is accepted); None holds out
            ``val_fraction`` of ``data`` (a seeded random draw) instead.
        out: the model folder to write ``ood.safetensors`` into; default the model's own
            folder. A model that is not a folder (a file, a Hub id) is saved there whole.
        limit: fit on at most this many images of ``data``.

    Returns:
        The statistics and the folder now holding them.
    """
    if not 0 < val_fraction < 1:
        raise UsageError(f"val_fraction must lie in (0, 1), not {val_fraction}")
    dev = resolve_device(device)
    loaded = model_or_source
    if isinstance(model_or_source, str | Path):
        if Path(model_or_source).suffix.lower() in EXPORTED_SUFFIXES:
            raise UsageError(
                f"{model_or_source}: calibrate the model it was exported from, then export again"
            )
        loaded = load_model(model_or_source, device=dev)
    subject = _load_subject(loaded, dev)
    taps = Taps.of(subject.model)  # type: ignore[arg-type]  # a DeiT: checked by load_model

    def features(source: Any, cap: int | None) -> tuple[Tensor, Tensor, str]:
        batches, name = _batches(source, subject, batch_size, dev, num_workers, data_root)
        f, y, _ = collect(subject.model, batches, taps, device=dev, limit=cap)
        return f, y, name

    feats, labels, name = features(data, limit)
    if val_data is not None:
        val_feats, _, val_name = features(val_data, None)
    else:
        order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))
        cut = max(1, round(val_fraction * len(feats)))
        val_feats, val_name = feats[order[:cut]], f"{val_fraction:.0%} of {name} (seed {seed})"
        feats, labels = feats[order[cut:]], labels[order[cut:]]
    stats = fit_features(
        feats,
        labels,
        val_feats,
        len(subject.labels),
        taps,
        data=f"fit on {name}, threshold on {val_name}",
    )
    folder = Path(out) if out is not None else Path(subject.source)
    if not (folder / "config.json").is_file():
        if out is None:
            raise UsageError(f"{subject.source} is not a model folder: give --out FOLDER")
        save_model(
            subject.model,  # type: ignore[arg-type]
            folder,
            labels=subject.labels,
            preprocess=subject.preprocess,
        )
    stats.save(folder)
    return stats, folder


@dataclass
class OODReport:
    """``deit eval --ood``: how well the score separates ``data`` from the images of ``ood``
    (OOD = positive; FPR@95 = share of in-distribution images flagged when 95% of the OOD ones
    are caught), for the model's score and for the max softmax."""

    source: str
    data: str
    ood: str
    method: str
    threshold: float
    num_in: int
    num_out: int
    auroc: float
    fpr95: float
    msp_auroc: float
    msp_fpr95: float
    in_flagged: float  # share of in-distribution images the model calls unusual
    out_flagged: float  # share of OOD images it calls unusual
    top1: float  # accuracy on the in-distribution data
    unreadable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_ood(
    model_or_source: Any,
    data: Any,
    ood: str | Path,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    num_workers: int = 0,
    data_root: str | None = None,
) -> OODReport:
    """Score ``data`` (in distribution, ``deit eval``'s syntax) and every image under the
    folder or glob ``ood`` with the model's out-of-distribution score; AUROC and FPR@95 for
    it and for the max softmax, and the share flagged at the model's threshold."""
    dev = resolve_device(device)
    loaded = (
        load_any(model_or_source) if isinstance(model_or_source, str | Path) else model_or_source
    )
    exported = getattr(loaded, "format", "") in ("onnx", "openvino")
    clf = Classifier(loaded, "cpu" if exported else dev)
    subject = _load_subject(loaded, clf.device)
    batches, data_name = _batches(data, subject, batch_size, clf.device, num_workers, data_root)
    scores: dict[str, list[float]] = {"in": [], "out": [], "in_msp": [], "out_msp": []}
    flagged = {"in": 0, "out": 0}
    hits = 0
    for batch in batches:
        if not len(batch[1]):
            continue
        logits, verdicts = clf.logits_and_ood(batch[0])
        hits += int((logits.argmax(-1) == batch[1].cpu()).sum())
        scores["in"] += [v.score for v in verdicts]
        scores["in_msp"] += msp_score(logits).tolist()
        flagged["in"] += sum(v.unusual for v in verdicts)
    paths = expand_paths([ood])
    unreadable = 0
    for r in clf.predict_files(paths, top_k=1, batch_size=batch_size):
        if r.ood is None:
            unreadable += 1
            continue
        scores["out"].append(r.ood.score)
        scores["out_msp"].append(1.0 - r.predictions[0].score)
        flagged["out"] += r.ood.unusual
    if not scores["out"]:
        raise UsageError(f"{ood}: no readable images to score")
    return OODReport(
        source=subject.source,
        data=data_name,
        ood=str(ood),
        method=clf.calibration.method,
        threshold=clf.calibration.threshold,
        num_in=len(scores["in"]),
        num_out=len(scores["out"]),
        auroc=auroc(scores["in"], scores["out"]),
        fpr95=fpr_at_tpr(scores["in"], scores["out"]),
        msp_auroc=auroc(scores["in_msp"], scores["out_msp"]),
        msp_fpr95=fpr_at_tpr(scores["in_msp"], scores["out_msp"]),
        in_flagged=flagged["in"] / max(1, len(scores["in"])),
        out_flagged=flagged["out"] / len(scores["out"]),
        top1=hits / max(1, len(scores["in"])),
        unreadable=unreadable,
    )
