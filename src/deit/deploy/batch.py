"""Batch inference on Ray Data: image collections that one process does not get through.

``predict_to_file(model, inputs, out)`` reads files, folders or globs, decodes and preprocesses
them in Ray tasks (CPU), runs the model in a pool of Ray actors (one per GPU when the cluster
has GPUs, else CPU actors), and writes the records ``deit predict --json`` prints (``path``,
``predictions``, ``ood``, ``error``): a file that can't be read is a row with its error, never a
failed job. Rows are written as they arrive, so ``resume=True`` skips what an interrupted run
already wrote, and nothing is lost or written twice.

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
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deit.checkpoints import DEFAULT_MODEL
from deit.errors import ImageLoadError, UsageError
from deit.images import load_image
from deit.inference import NON_FINITE, Classifier, expand_paths, finite_rows, load_any
from deit.runtime import atomic_write, require
from deit.transforms import PreprocessConfig, preprocess_image

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
    ``deit predict --json`` list), ``ood`` (JSON text of the image's out-of-distribution
    verdict, ``null`` for a failed image) and ``error``."""

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
        oods: list[str] = ["null"] * len(errors)
        if good:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))
            logits, verdicts = self.clf.logits_and_ood(pixels)
            rows = zip(good, self.clf.topk(logits, self.top_k), verdicts, finite_rows(logits))
            for i, row, verdict, finite in rows:
                if not finite:
                    errors[i] = f"the model's output for this image is {NON_FINITE}"
                    continue
                preds[i] = json.dumps([asdict(p) for p in row], ensure_ascii=False)
                oods[i] = json.dumps(verdict.to_dict())
        return {
            "path": batch["path"],
            "predictions": np.array(preds),
            "ood": np.array(oods),
            "error": np.array(errors),
        }


def records(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """The ``deit predict --json`` records of a :class:`Predict` output batch."""
    columns = batch["path"], batch["predictions"], batch["ood"], batch["error"]
    for path, preds, ood, error in zip(*columns, strict=True):
        yield {
            "path": str(path),
            "predictions": json.loads(str(preds)),
            "ood": json.loads(str(ood)),
            "error": str(error) or None,
        }


# --------------------------------------------------------------------------- output files


def _record(line: bytes) -> dict[str, Any] | None:
    """The record on one output line, or None: not UTF-8 (a line torn inside a character),
    not JSON, not an object, or without a string ``path``."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return None
    return record


def read_jsonl(out: Path) -> tuple[list[bytes], int]:
    """(the record lines of a ``.jsonl`` output, without their newlines; how many other
    non-empty lines were dropped: the torn last line of a killed run, or anything else that
    is no record). Lines are read as bytes, so a line torn inside a character drops alone."""
    good: list[bytes] = []
    dropped = 0
    if not out.is_file():
        return good, dropped
    with out.open("rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if _record(line) is not None:
                good.append(line)
            elif line.strip():
                dropped += 1
    return good, dropped


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet")) if out.is_dir() else []


def done_paths(out: Path) -> set[str]:
    """Paths already in ``out`` (a ``.jsonl`` file or a ``.parquet`` folder of parts).

    Raises:
        UsageError: a Parquet part that can't be read (named; nothing a killed run leaves,
            since parts are written atomically).
    """
    if out.suffix == ".jsonl":
        return {_record(line)["path"] for line in read_jsonl(out)[0]}  # type: ignore[index]
    pq = require("pyarrow.parquet", "pyarrow", "ray")
    done: set[str] = set()
    for part in _parts(out):
        try:
            paths = pq.read_table(part, columns=["path"]).column(0).to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, KeyError, ...
            raise UsageError(
                f"{part}: unreadable Parquet part ({type(e).__name__}: {e}); "
                "move it away and resume"
            ) from e
        done.update(p for p in paths if isinstance(p, str))
    return done


class _Writer:
    """Appends records to ``out`` as they come: JSON lines (flushed per batch; a torn last
    line of a killed run is dropped on resume), or Parquet parts written atomically (the
    temporary file of a killed run is removed on the next run). ``dropped`` counts the lines
    a resume dropped."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.out, self.dropped = out, 0
        if out.suffix == ".jsonl":
            if resume and out.is_file():  # rewritten whole: a torn line may lack its newline
                good, self.dropped = read_jsonl(out)
                if self.dropped:
                    log.warning("%s: dropped %d lines that are no record", out, self.dropped)
                lines = b"".join(g + b"\n" for g in good)
                atomic_write(out, lambda tmp: tmp.write_bytes(lines))
            self.file: Any = out.open("a" if resume else "w", encoding="utf-8")
        else:
            out.mkdir(parents=True, exist_ok=True)
            for tmp in out.glob(".part-*.parquet.*.tmp"):  # what a killed run left
                tmp.unlink(missing_ok=True)
            if not resume:
                for part in _parts(out):
                    part.unlink()
            numbers = [int(m.group(1)) for p in _parts(out) if (m := _PART.fullmatch(p.name))]
            self.part = max(numbers, default=-1) + 1  # after the last, even with gaps

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
        ood = pa.struct([("score", pa.float64()), ("unusual", pa.bool_()), ("method", pa.string())])
        schema = pa.schema(  # fixed, so that every part reads as one table
            [
                ("path", pa.string()),
                ("predictions", pa.list_(prediction)),
                ("ood", ood),
                ("error", pa.string()),
            ]
        )
        table = pa.Table.from_pylist(rows, schema=schema)
        atomic_write(self.out / f"part-{self.part:05d}.parquet", lambda t: pq.write_table(table, t))
        self.part += 1

    def close(self) -> None:
        if self.out.suffix == ".jsonl":
            self.file.close()


_PART = re.compile(r"part-([0-9]+)\.parquet")


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
        Counts: ``inputs``, ``skipped`` (already done), ``written``, ``errors`` and
        ``dropped`` (lines of a ``.jsonl`` being resumed that held no record).
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
    counts = {
        "inputs": len(paths),
        "skipped": len(paths) - len(todo),
        "written": 0,
        "errors": 0,
        "dropped": 0,
    }
    # A bad model fails here, in one line, before a cluster starts; the preprocessing workers
    # get its (small) PreprocessConfig instead of each loading the weights again.
    preprocess = load_any(model).preprocess
    writer = _Writer(out, resume)
    counts["dropped"] = writer.dropped
    try:
        if not todo:
            return counts
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        ds = _pipeline(
            ray, todo, model, preprocess, top_k, batch_size, actors, precision, fast_decode
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


def _pipeline(
    ray: Any,
    todo: list[str],
    model: str,
    preprocess: PreprocessConfig,
    top_k: int,
    batch_size: int,
    actors: int | None,
    precision: str,
    fast_decode: bool,
) -> Any:
    """The Ray Data pipeline over ``todo``: decoding and preprocessing actors on the CPUs
    left over, then the model actors (one per GPU, else ``actors`` or half the CPUs)."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    pool = actors or gpus or max(1, cpus // 2)
    blocks = max(1, min(len(todo) // batch_size, 4 * cpus))
    items = [{"path": p, "file": os.path.abspath(p)} for p in todo]  # workers' cwd may differ
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        Preprocess,
        fn_constructor_args=(preprocess, fast_decode),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, cpus - (0 if gpus else pool))),
    )
    return ds.map_batches(
        Predict,
        fn_constructor_args=(model, top_k, "cuda" if gpus else "cpu", precision),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_gpus=1 if gpus else 0,
    )


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="deit predict (ray)")
