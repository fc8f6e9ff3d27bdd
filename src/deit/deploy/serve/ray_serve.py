"""The same server as a Ray Serve deployment with several replicas (``deit serve --engine ray``).

Each replica builds the very app of :func:`deit.deploy.serve.app.create_app` (same routes,
limits, page, metrics), loads the model itself and batches inside itself; Ray Serve's HTTP
proxy spreads requests over the replicas. Every response carries ``X-Served-By`` naming the
replica (host and Ray's replica id). With ``max_replicas`` set, Ray scales between
``replicas`` and ``max_replicas`` by the requests each replica has in flight.

Without an address, :func:`serve_on_ray` starts a private local Ray instance (never one that
happens to run on the machine already) and, on SIGTERM or SIGINT, shuts Serve and that
instance down, leaving none of the processes it started. With ``address`` (a running
cluster, e.g. ``auto`` or ``ray://head:10001``) it deploys onto that cluster and, on the
signal, deletes only its own application.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from deit.deploy.serve.settings import ServeSettings
from deit.errors import UsageError
from deit.inference import Classifier
from deit.runtime import require

APP_NAME = "deit"


@dataclass(frozen=True)
class RaySettings:
    """Replicas and where they run.

    ``replicas``: how many (the minimum when autoscaling); ``max_replicas``: autoscale up to
    this many (None: a fixed count); ``target_ongoing``: requests in flight per replica that
    autoscaling aims for; ``replica_cpus``: CPUs Ray reserves for each replica (also its
    PyTorch threads); ``address``: a running Ray cluster (None: a private local one).
    """

    replicas: int = 1
    max_replicas: int | None = None
    target_ongoing: float = 8.0
    replica_cpus: float = 1.0
    address: str | None = None

    def check(self) -> None:
        """Raise :class:`UsageError` for impossible values."""
        if self.replicas < 1:
            raise UsageError(f"--replicas must be at least 1, not {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise UsageError("--max-replicas must be at least --replicas")
        if self.replica_cpus <= 0 or self.target_ongoing <= 0:
            raise UsageError("--replica-cpus and the autoscaling target must be positive")


def deployment_options(settings: ServeSettings, ray_settings: RaySettings) -> dict[str, Any]:
    """The Ray Serve deployment options: replica count or autoscaling, and enough requests in
    flight per replica for its batches to fill (Ray's default of 5 would cap them)."""
    options: dict[str, Any] = {
        "max_ongoing_requests": max(64, 2 * settings.max_batch),
        "max_queued_requests": settings.max_queue,
        "ray_actor_options": {"num_cpus": ray_settings.replica_cpus},
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
    }
    if ray_settings.max_replicas is None:
        options["num_replicas"] = ray_settings.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": ray_settings.replicas,
            "initial_replicas": ray_settings.replicas,
            "max_replicas": ray_settings.max_replicas,
            "target_ongoing_requests": ray_settings.target_ongoing,
        }
    return options


def build_application(
    load: Callable[[], Classifier], settings: ServeSettings, ray_settings: RaySettings
) -> Any:
    """The bound Ray Serve application: replicas that each call ``load()`` (a picklable
    callable) and serve :func:`~deit.deploy.serve.app.create_app` of its classifier."""
    require("ray.serve", "ray[serve]", "ray")
    from ray import serve

    threads = max(1, int(ray_settings.replica_cpus))

    @serve.ingress()
    class DeitReplica:
        """One replica: the whole app, built once the replica knows its name."""

        def __init__(self) -> None:
            self.load, self.settings = load, settings

        def __serve_build_asgi_app__(self) -> Any:
            import torch

            from deit.deploy.serve.app import create_app

            torch.set_num_threads(threads)
            replica = serve.get_replica_context().replica_tag
            served_by = f"{socket.gethostname()}/{replica}"
            return create_app(self.load(), replace(self.settings, served_by=served_by))

    options = deployment_options(settings, ray_settings)
    return serve.deployment(name="DeitReplica", **options)(DeitReplica).bind()


def serve_on_ray(
    load: Callable[[], Classifier],
    settings: ServeSettings,
    ray_settings: RaySettings,
    log: Callable[[str], None] = print,
) -> None:
    """Serve on Ray until SIGTERM or SIGINT (blocking); see the module docstring."""
    ray_settings.check()
    ray = require("ray", "ray[serve]", "ray")
    require("ray.serve", "ray[serve]", "ray")
    from ray import serve

    private = ray_settings.address is None
    ray.init(
        address="local" if private else ray_settings.address,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    # After ray.init, which installs handlers of its own that would kill this process first.
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        app = build_application(load, settings, ray_settings)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        log(f"ready: {ray_settings.replicas} replica(s) on http://{settings.host}:{settings.port}/")
        while not stop.wait(0.5):
            pass
        log("stopping")
    finally:
        started = _descendants()  # every Ray process a private instance runs is one of these
        try:
            if private:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if private:
                _end(started)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _descendants() -> list[Any]:
    """This process's descendants (psutil processes)."""
    import psutil

    return list(psutil.Process().children(recursive=True))


def _end(processes: list[Any], wait_s: float = 10.0) -> None:
    """Terminate those of ``processes`` that outlived ``ray.shutdown()`` (its agents can),
    then kill what still runs after ``wait_s``."""
    import psutil

    alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=wait_s)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
