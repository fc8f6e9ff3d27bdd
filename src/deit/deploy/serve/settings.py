"""The server's settings: limits, batching, names (:class:`ServeSettings`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and batching. Sizes in MiB; pixels are width x height (from the header).

    Per request: ``max_upload_mb`` per file, ``max_files`` files, ``max_pixels`` per image and
    ``max_request_pixels`` for all of a request's images (413 beyond). Server-wide, over all
    requests in flight: ``max_inflight_upload_mb`` of upload bytes held and
    ``max_inflight_pixels`` queued for or in decoding; a request that finds a budget spent
    waits up to ``busy_wait_s``, then gets 503 with ``Retry-After``. Attention maps: at most
    ``max_explain_concurrent`` computed at once and ``max_explain_queue`` more waiting (503
    beyond), in their own thread. ``allowed_hosts``: ``Host`` header values accepted (``*`` =
    any). ``shutdown_timeout_s``: how long requests in flight may finish after SIGTERM/SIGINT
    before they are cancelled. ``name``: the model's name in the v2/v1 protocol routes (None:
    derived from the model's source). ``served_by``: sent as ``X-Served-By`` on every response
    (set by each Ray Serve replica; None: no header).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 10.0
    max_pixels: int = 50_000_000
    max_request_pixels: int = 100_000_000
    max_files: int = 32
    max_queue: int = 1024
    max_inflight_upload_mb: float = 512.0
    max_inflight_pixels: int = 100_000_000
    max_explain_concurrent: int = 1
    max_explain_queue: int = 8
    busy_wait_s: float = 5.0
    shutdown_timeout_s: float = 10.0
    allowed_hosts: tuple[str, ...] = ("*",)
    decode_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    default_top_k: int = 5
    name: str | None = None
    served_by: str | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_inflight_upload_bytes(self) -> int:
        return int(self.max_inflight_upload_mb * 1024 * 1024)
