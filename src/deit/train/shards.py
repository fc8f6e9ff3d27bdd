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
