"""Prometheus metrics of the server, served at ``/metrics`` through ``prometheus_client``.

Each app has its own registry (several apps can live in one process, as in the tests), so the
numbers are per process: under Ray Serve, per replica (the ``X-Served-By`` header says which
one answered a scrape). Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms); requests are labelled by route template (``/v2/models/{name}/infer``), never by
the raw path, so a client can't grow the label set.

=================================== ======================================================
``deit_requests_total``             requests by ``route``, ``method`` and ``status``
``deit_request_duration_seconds``   request latency by ``route`` (histogram)
``deit_queue_duration_seconds``     time an image waited for its batch (histogram)
``deit_model_duration_seconds``     time of one model call on a batch (histogram)
``deit_batch_size``                 images per model call (histogram)
``deit_images_classified_total``    images the model classified
``deit_rejections_total``           413 and 503 answers by ``route`` and ``status``
=================================== ======================================================
"""

from __future__ import annotations

from typing import Any

from deit.runtime import require

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REJECTED = (413, 503)


class ServeMetrics:
    """The server's counters and histograms in a registry of their own."""

    def __init__(self, max_batch: int) -> None:
        prom = require("prometheus_client", "prometheus_client", "serve")
        self.registry = prom.CollectorRegistry()
        reg = {"registry": self.registry}
        self.requests = prom.Counter(
            "deit_requests", "HTTP requests", ["route", "method", "status"], **reg
        )
        self.latency = prom.Histogram(
            "deit_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            **reg,
        )
        self.queue = prom.Histogram(
            "deit_queue_duration_seconds",
            "time an image waited in the batching queue",
            buckets=LATENCY_BUCKETS,
            **reg,
        )
        self.model = prom.Histogram(
            "deit_model_duration_seconds",
            "time of one model call on a batch",
            buckets=LATENCY_BUCKETS,
            **reg,
        )
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch_size = prom.Histogram(
            "deit_batch_size",
            "images per model call",
            buckets=[s for s in sizes if s <= max_batch],
            **reg,
        )
        self.images = prom.Counter("deit_images_classified", "images classified", **reg)
        self.rejections = prom.Counter(
            "deit_rejections", "requests refused with 413 or 503", ["route", "status"], **reg
        )
        self._prom = prom

    def observe_batch(self, size: int, queued_s: list[float], model_s: float) -> None:
        """One model call: its size, each image's queue time and the call's time."""
        self.batch_size.observe(size)
        self.model.observe(model_s)
        self.images.inc(size)
        for seconds in queued_s:
            self.queue.observe(seconds)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request, answered with ``status`` after ``seconds``."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status in REJECTED:
            self.rejections.labels(route, str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


def route_of(scope: dict[str, Any]) -> str:
    """The route template a request matched (``other`` for none: 404s, the host check)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if scope.get("path", "").startswith("/static/"):
        return "/static"
    return "other"
