"""Where a model source points, and fetching Hub ids into the local cache.

A source is a local path, the name of a model embedded in the package (:data:`EMBEDDED_DIR`),
a published variant's timm name or a Hugging Face Hub id. :func:`resolve_source` tells them
apart without touching the network; :func:`download` fetches a Hub repo's config, weights and
preprocessor through ``huggingface_hub`` (its cache, ``revision`` and ``HF_HUB_OFFLINE``).
This is the only network access of loading, kept apart from :mod:`deit.checkpoints`, which
reads the folders it returns.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from deit.config import VARIANTS
from deit.errors import CheckpointError

EMBEDDED_DIR = Path(__file__).parent / "data" / "models"
# The weights file of a model folder, in order of preference (transformers' names).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or the Hub's host can't be reached quickly.

    Checked once up front, so that a machine without network goes straight to the local
    cache instead of retrying each file with back-off.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let huggingface_hub try
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def download(repo_id: str, revision: str | None) -> Path:
    """Fetch config, weights and preprocessor of a Hub repo into the cache; return its folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = not _hub_reachable()

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=offline))

    try:
        folder = fetch("config.json").parent
        for name in WEIGHT_FILES:
            try:
                fetch(name)
                break
            except EntryNotFoundError:  # includes "not in the local cache"
                if name == WEIGHT_FILES[-1]:
                    raise
        with contextlib.suppress(EntryNotFoundError):  # optional file
            fetch("preprocessor_config.json")
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot download {repo_id!r} from the Hugging Face Hub (offline or no network) and "
            "it is not in the local cache; connect once to cache it, give a local path, or use "
            "the embedded offline model: --model fashion-mnist"
        ) from None
    except (
        RepositoryNotFoundError,
        RevisionNotFoundError,
        HFValidationError,
        EntryNotFoundError,
    ) as e:
        raise CheckpointError(f"cannot load {repo_id!r} from the Hub: {e}") from None
    return folder


def resolve_source(source: str | Path) -> Path | str:
    """A local path, an embedded model's folder, or a Hub id (returned as a string)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    if (EMBEDDED_DIR / name / "config.json").is_file():
        return EMBEDDED_DIR / name
    if name in VARIANTS:  # published variants by their timm name → the facebook Hub copies
        return "facebook/" + name.replace("_", "-")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        return name
    raise CheckpointError(f"no such file, folder, embedded model or Hub id: {name!r}")
