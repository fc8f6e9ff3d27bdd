"""Reading WebDataset tar shards within bounds: what a shard declares is checked before it
costs memory or time.

A tar member says how large it is; ``tarfile``'s ``extractfile().read()`` believes it. A 10 KB
shard made with ``tar --sparse`` can declare a 3 GB member (holes read back as zeros), and a
``.tar.gz`` of zeros inflates a few megabytes into gigabytes. :func:`iter_shard` reads a shard
as a stream (local files, or any URL ``webdataset.gopen`` opens) and

* reads only the members a sample needs (``keep``: the image and label extensions),
* refuses sparse members (GNU ``S`` entries and PAX ``GNU.sparse`` headers) unread,
* refuses a member that declares more than ``max_member_bytes`` before reading any of it, and
  then stops reading that shard (skipping the member would mean inflating all of it),
* stops a shard whose decompressed stream grows past ``max_ratio`` times the compressed
  bytes read (after a first ``ratio_grace_bytes``), so decompression work stays proportional
  to the file's size.

Each refusal is a :class:`~deit.train.data.BadSample`, which the readers count and report;
it never ends an epoch or an evaluation.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

from deit.errors import ConfigError
from deit.runtime import require
from deit.train.data import BadSample

#: Largest tar member read into memory (an image or a label; 64 MiB).
MAX_MEMBER_BYTES = 64 * 2**20
#: Decompressed bytes a shard may produce per compressed byte read (images barely compress).
MAX_RATIO = 100
#: Decompressed bytes always allowed before the ratio applies.
RATIO_GRACE_BYTES = 64 * 2**20

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class _Counting:
    """A read-only file object that counts the bytes read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.count = raw, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        return data

    def close(self) -> None:
        self.raw.close()


def _open(url: str) -> IO[bytes]:
    if Path(url).is_file() or ("://" not in url and not url.startswith("pipe:")):
        return open(url, "rb")
    wds = require("webdataset", "webdataset", "data")
    return wds.gopen(url, "rb")


def _is_sparse(member: tarfile.TarInfo) -> bool:
    return (
        member.type == tarfile.GNUTYPE_SPARSE
        or member.sparse is not None
        or any(k.startswith("GNU.sparse") for k in member.pax_headers)
    )


def iter_shard(
    url: str,
    keep: Collection[str],
    *,
    max_member_bytes: int | None = None,
    max_ratio: float | None = None,
    ratio_grace_bytes: int | None = None,
) -> Iterator[dict[str, Any] | BadSample]:
    """The samples of one shard: dicts of ``__key__``, ``__url__`` and one ``bytes`` value per
    kept extension (lower case), grouped by consecutive keys as webdataset groups them; a
    sample with a refused member, and an unreadable rest of a shard, are a :class:`BadSample`.

    Args:
        url: a local path or a URL ``webdataset.gopen`` opens (``pipe:``, ``http://``...).
        keep: the extensions to read (others are skipped unread).
        max_member_bytes: refuse members declaring more (None: :data:`MAX_MEMBER_BYTES`).
        max_ratio, ratio_grace_bytes: stop once the tar stream has produced more than
            ``ratio_grace_bytes`` and more than ``max_ratio`` bytes per byte of the file
            (None: :data:`MAX_RATIO`, :data:`RATIO_GRACE_BYTES`).
    """
    max_member_bytes = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    max_ratio = MAX_RATIO if max_ratio is None else max_ratio
    ratio_grace_bytes = RATIO_GRACE_BYTES if ratio_grace_bytes is None else ratio_grace_bytes
    name = Path(url).name
    try:
        raw = _Counting(_open(url))
    except Exception as e:
        yield BadSample(name, f"cannot open shard: {type(e).__name__}: {e}")
        return
    sample: dict[str, Any] | None = None
    bad: str | None = None  # why the current sample is refused
    try:
        tar = tarfile.open(fileobj=raw, mode="r|*")  # type: ignore[call-overload]  # noqa: SIM115
        members = iter(tar)
        while True:
            try:
                member = next(members, None)
            except Exception as e:  # a corrupt header, a truncated or corrupt stream
                yield BadSample(name, f"unreadable shard from here on: {type(e).__name__}: {e}")
                break
            tar.members = []  # a stream keeps every header otherwise
            if member is None:
                break
            if tar.offset > ratio_grace_bytes and tar.offset > max_ratio * raw.count:
                yield BadSample(
                    name,
                    f"shard inflates to over {max_ratio:g} times its size "
                    f"({tar.offset} bytes from {raw.count}): rest of the shard skipped",
                )
                sample = None
                break
            match = _KEY.match(member.name)
            if not member.isreg() or match is None or Path(member.name).name.startswith("__"):
                continue
            prefix, suffix = match.group(1), match.group(2).lower()
            if sample is None or prefix != sample["__key__"]:
                if sample is not None:
                    yield _finish(sample, bad, name)
                sample, bad = {"__key__": prefix, "__url__": url}, None
            if suffix not in keep or bad is not None:
                continue
            if _is_sparse(member):
                bad = f"{member.name} is a sparse file member (refused unread)"
            elif member.size > max_member_bytes:
                yield BadSample(
                    f"{name}:{prefix}",
                    f"{member.name} declares {member.size} bytes, over the limit of "
                    f"{max_member_bytes}: rest of the shard skipped",
                )
                sample = None
                break
            else:
                f = tar.extractfile(member)  # reads member.size bytes at most
                sample[suffix] = f.read(member.size) if f is not None else b""
        if sample is not None:
            yield _finish(sample, bad, name)
    except Exception as e:  # opening the tar stream (not a tar, bad compression)
        yield BadSample(name, f"unreadable shard: {type(e).__name__}: {e}")
    finally:
        raw.close()


def _finish(sample: dict[str, Any], bad: str | None, shard: str) -> dict[str, Any] | BadSample:
    return sample if bad is None else BadSample(f"{shard}:{sample['__key__']}", bad)


# --------------------------------------------------------------------------- Hugging Face files

#: Largest JSON file of a ``save_to_disk`` folder read (state.json, dataset_info.json ...).
MAX_JSON_BYTES = 16 * 2**20
#: Largest decompressed Parquet column chunk (one image column's pages).
MAX_CHUNK_BYTES = 256 * 2**20
#: Decoded Parquet bytes allowed per byte of file (images are stored compressed already).
MAX_DECODED_RATIO = 20


def _json_file(path: Path) -> Any:
    import json

    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: not a regular file of at most {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from e


def _plain_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and not (set(name) & {"/", "\\", "\0"})
    )


def check_disk_dataset(folder: Path) -> None:
    """Refuse a ``save_to_disk`` folder whose JSON files point outside it or lie about it,
    before ``datasets`` reads them: splits and data files must be plain names of regular files
    (no symlinks) inside the folder, at least one per split, with no custom format.

    Raises:
        ConfigError: naming the file and the cause.
    """
    if (folder / "dataset_dict.json").is_file():
        meta = _json_file(folder / "dataset_dict.json")
        splits = meta.get("splits") if isinstance(meta, dict) else None
        if not isinstance(splits, list) or not splits or not all(map(_plain_name, splits)):
            raise ConfigError(f"{folder / 'dataset_dict.json'}: splits must be plain names")
        for split in splits:
            sub = folder / split
            if sub.is_symlink() or not sub.is_dir():
                raise ConfigError(f"{sub}: split folder missing (or a link)")
            check_disk_dataset(sub)
        return
    state = _json_file(folder / "state.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files:
        raise ConfigError(f"{folder / 'state.json'}: no _data_files")
    for entry in files:
        name = entry.get("filename") if isinstance(entry, dict) else None
        f = folder / str(name) if _plain_name(name) else None
        if f is None or f.suffix != ".arrow" or f.is_symlink() or not f.is_file():
            raise ConfigError(
                f"{folder / 'state.json'}: data file {name!r} is not an .arrow file in {folder}"
            )
    if state.get("_format_type") not in (None, "numpy", "torch", "arrow", "pandas", "python"):
        raise ConfigError(f"{folder / 'state.json'}: format {state.get('_format_type')!r}")
    if (folder / "dataset_info.json").exists():
        _json_file(folder / "dataset_info.json")


def check_parquet(path: str | Path) -> None:
    """Refuse a Parquet file whose decoding would take far more than its size, before
    ``datasets`` converts it: every column chunk decompresses to at most
    :data:`MAX_CHUNK_BYTES` (from the footer), and the decoded rows, counted a few at a time
    (dictionary encoding can repeat one large value for every row), total at most
    :data:`MAX_DECODED_RATIO` times the file plus :data:`MAX_CHUNK_BYTES`.

    Raises:
        ConfigError: naming the file and what it would produce.
    """
    pq = require("pyarrow.parquet", "pyarrow", "data")
    size = Path(path).stat().st_size
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                chunk = meta.row_group(g).column(c).total_uncompressed_size
                if chunk > MAX_CHUNK_BYTES:
                    raise ConfigError(
                        f"{path}: a column chunk decompresses to {chunk} bytes "
                        f"(limit {MAX_CHUNK_BYTES})"
                    )
        limit, decoded = MAX_DECODED_RATIO * size + MAX_CHUNK_BYTES, 0
        for batch in pf.iter_batches(batch_size=4):
            decoded += batch.nbytes
            if decoded > limit:
                raise ConfigError(
                    f"{path}: decodes to more than {limit} bytes from a {size}-byte file"
                )
    except ConfigError:
        raise
    except Exception as e:  # pyarrow's errors on corrupt files
        raise ConfigError(f"{path}: unreadable Parquet ({type(e).__name__}: {e})") from e
