"""Batch inference on Ray Data: image collections that one process does not get through.

``predict_to_file(model, inputs, out)`` reads files, folders or globs, decodes and preprocesses
them in Ray tasks (CPU), runs the model in a pool of Ray actors (one per GPU when the cluster
has GPUs, else CPU actors), and writes the records ``deit predict --json`` prints (``path``,
``predictions``, ``error``): a file that can't be read is a row with its error, never a failed
job. Rows are written as they arrive, so ``resume=True`` skips what an interrupted run already
wrote, and nothing is lost or written twice.

For pipelines of your own, :class:`Preprocess` and :class:`Predict` are the callables that
``Dataset.map_batches`` runs::

    ds = ray.data.from_items([{"path": p} for p in paths])
    ds = ds.map_batches(Preprocess("fashion-mnist"), batch_size=64)
    ds = ds.map_batches(Predict, fn_constructor_args=("fashion-mnist",), concurrency=2)

Ray is an optional extra (``pip install 'deit[ray]'``); nothing imports it unless asked.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deit.checkpoints import DEFAULT_MODEL
from deit.errors import ImageLoadError, UsageError
from deit.inference import Classifier, expand_paths, load_any
from deit.runtime import atomic_write, require
from deit.transforms import PreprocessConfig, load_image, preprocess_image

log = logging.getLogger("deit.deploy.batch")
OUTPUT_SUFFIXES = (".jsonl", ".parquet")


class Preprocess:
    """``map_batches`` callable: decode and preprocess the batch's ``path`` column (or its
    ``file`` column when the paths to show differ from the files to read), as a model's
    :class:`PreprocessConfig` says (given, or read from a model source).

    Returns ``path``, ``pixels`` (N, C, H, W float32; zeros where an image failed) and
    ``error`` (``""`` for the good ones), so failures travel as rows.
    """

    def __init__(
        self, preprocess: PreprocessConfig | str = DEFAULT_MODEL, fast_decode: bool = False
    ) -> None:
        cfg = preprocess
        if not isinstance(cfg, PreprocessConfig):
            cfg = load_any(cfg).preprocess
        self.cfg, self.fast_decode = cfg, fast_decode
        self.shape = (cfg.channels, *cfg.input_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        files = [str(f) for f in batch["file"]] if "file" in batch else paths
        pixels = np.zeros((len(paths), *self.shape), np.float32)
        errors = []
        for i, file in enumerate(files):
            try:
                img = load_image(file, fast_decode=self.fast_decode)
                pixels[i] = preprocess_image(img, self.cfg).numpy()
                errors.append("")
            except ImageLoadError as e:
                errors.append(str(e))
            except MemoryError:  # this image alone; the batch goes on
                errors.append("out of memory while preprocessing this image")
        return {"path": np.array(paths), "pixels": pixels, "error": np.array(errors)}


class Predict:
    """``map_batches`` callable class: the model, loaded once per actor, classifies the rows
    that :class:`Preprocess` decoded. Returns ``path``, ``predictions`` (JSON text of the
    ``deit predict --json`` list) and ``error``."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        top_k: int = 5,
        device: str = "auto",
        precision: str = "fp32",
        **load: Any,
    ) -> None:
        self.clf = Classifier.from_pretrained(model, device=device, precision=precision, **load)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = [str(e) for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if not e]
        preds: list[str] = ["[]"] * len(errors)
        if good:
            logits = self.clf.logits(torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])))
            for i, row in zip(good, self.clf.topk(logits, self.top_k), strict=True):
                preds[i] = json.dumps([asdict(p) for p in row], ensure_ascii=False)
        return {"path": batch["path"], "predictions": np.array(preds), "error": np.array(errors)}


def records(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """The ``deit predict --json`` records of a :class:`Predict` output batch."""
    for path, preds, error in zip(batch["path"], batch["predictions"], batch["error"], strict=True):
        yield {
            "path": str(path),
            "predictions": json.loads(str(preds)),
            "error": str(error) or None,
        }


# --------------------------------------------------------------------------- output files


def done_paths(out: Path) -> set[str]:
    """Paths already in ``out`` (a ``.jsonl`` file or a ``.parquet`` folder of parts)."""
    if out.suffix == ".jsonl":
        if not out.is_file():
            return set()
        done = set()
        for line in out.read_text().splitlines():
            try:
                done.add(json.loads(line)["path"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # the torn last line of a killed run
        return done
    pq = require("pyarrow.parquet", "pyarrow", "ray")
    parts = sorted(out.glob("part-*.parquet")) if out.is_dir() else []
    return {
        p for part in parts for p in pq.read_table(part, columns=["path"]).column(0).to_pylist()
    }


class _Writer:
    """Appends records to ``out`` as they come: JSON lines (flushed per batch; a torn last
    line of a killed run is dropped on resume), or Parquet parts written atomically."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.out = out
        if out.suffix == ".jsonl":
            if resume and out.is_file():
                good = [ln for ln in out.read_text().splitlines() if _is_record(ln)]
                atomic_write(out, lambda tmp: tmp.write_text("".join(f"{ln}\n" for ln in good)))
            self.file: Any = out.open("a" if resume else "w", encoding="utf-8")
        else:
            out.mkdir(parents=True, exist_ok=True)
            if not resume:
                for part in out.glob("part-*.parquet"):
                    part.unlink()
            self.part = len(list(out.glob("part-*.parquet")))

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.out.suffix == ".jsonl":
            self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self.file.flush()
            os.fsync(self.file.fileno())
            return
        pa = require("pyarrow", "pyarrow", "ray")
        pq = require("pyarrow.parquet", "pyarrow", "ray")
        prediction = pa.struct(
            [("index", pa.int64()), ("label", pa.string()), ("score", pa.float64())]
        )
        schema = pa.schema(  # fixed, so that every part reads as one table
            [("path", pa.string()), ("predictions", pa.list_(prediction)), ("error", pa.string())]
        )
        table = pa.Table.from_pylist(rows, schema=schema)
        atomic_write(self.out / f"part-{self.part:05d}.parquet", lambda t: pq.write_table(table, t))
        self.part += 1

    def close(self) -> None:
        if self.out.suffix == ".jsonl":
            self.file.close()


def _is_record(line: str) -> bool:
    try:
        return "path" in json.loads(line)
    except json.JSONDecodeError:
        return False


# --------------------------------------------------------------------------- the job


def predict_to_file(
    model: str,
    inputs: Iterable[str],
    out: str | Path,
    *,
    address: str | None = None,
    top_k: int = 5,
    batch_size: int = 64,
    actors: int | None = None,
    precision: str = "fp32",
    fast_decode: bool = False,
    resume: bool = False,
    progress: bool = False,
) -> dict[str, int]:
    """Classify ``inputs`` on a Ray cluster and write one record per image to ``out``.

    Args:
        model: what ``deit predict --model`` takes (every actor loads it).
        inputs: files, folders (recursive) or globs, as ``deit predict`` expands them.
        out: ``.jsonl`` (one JSON object per line) or ``.parquet`` (a folder of parts).
        address: an existing cluster (``ray://host:10001``, ``auto``); None starts a local one.
        actors: model actors (default: one per GPU of the cluster, else half its CPUs, ≥ 1).
        resume: skip the paths ``out`` already holds (from an interrupted run).

    Returns:
        Counts: ``inputs``, ``skipped`` (already done), ``written``, ``errors``.
    """
    ray = require("ray", "ray[data]", "ray")
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out must end in .jsonl or .parquet, not {out.name!r}")
    if top_k < 1 or batch_size < 1 or (actors is not None and actors < 1):
        raise UsageError("--top-k, --batch-size and the actor count must be at least 1")
    paths = expand_paths(inputs)
    done = done_paths(out) if resume else set()
    todo = [p for p in paths if p not in done]
    counts = {"inputs": len(paths), "skipped": len(paths) - len(todo), "written": 0, "errors": 0}
    # A bad model fails here, in one line, before a cluster starts; the preprocessing workers
    # get its (small) PreprocessConfig instead of each loading the weights again.
    preprocess = load_any(model).preprocess
    writer = _Writer(out, resume)
    try:
        if not todo:
            return counts
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        pool = actors or gpus or max(1, int(resources.get("CPU", 1)) // 2)
        blocks = max(1, min(len(todo) // batch_size, 4 * int(resources.get("CPU", 1))))
        items = [{"path": p, "file": os.path.abspath(p)} for p in todo]  # workers' cwd may differ
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            Preprocess,
            fn_constructor_args=(preprocess, fast_decode),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                size=max(1, int(resources.get("CPU", 1)) - (0 if gpus else pool))
            ),
        )
        ds = ds.map_batches(
            Predict,
            fn_constructor_args=(model, top_k, "cuda" if gpus else "cpu", precision),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_gpus=1 if gpus else 0,
        )
        bar = _progress(len(todo), progress)
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            rows = list(records(batch))
            writer.write(rows)
            counts["written"] += len(rows)
            counts["errors"] += sum(r["error"] is not None for r in rows)
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        return counts
    finally:
        writer.close()


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="deit predict (ray)")
