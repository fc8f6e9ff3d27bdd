"""``deit serve``: the HTTP API and web page, with dynamic batching."""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from deit.cli._args import add_model_arguments, add_speed_arguments, classifier_from_args
from deit.deploy.serve import LOOPBACK, ServeSettings, require_server, serve
from deit.deploy.serve.page import check_model_name, model_name
from deit.deploy.serve.ray_serve import RaySettings, serve_on_ray
from deit.errors import UsageError

NAME = "serve"
HELP = "HTTP API, web page and standard protocols (Hugging Face, KServe/Triton v2), batched"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    d = ServeSettings()
    p.add_argument("--host", default=d.host, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_speed_arguments(p)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="largest model batch")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help="how long a request waits for others to batch with",
    )
    _add_limits(p, d)
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=d.shutdown_timeout_s,
        help="seconds requests in flight get to finish after SIGTERM/SIGINT before they are "
        f"cancelled (default {d.shutdown_timeout_s:g})",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="HOST",
        help="accept only requests whose Host header is HOST (repeatable; '*.example.com' "
        "matches subdomains); default: any host, which is fine on 127.0.0.1 but set it "
        "when --host exposes the server",
    )
    p.add_argument(
        "--name",
        help="the model's name in the /v2 and /v1 protocol routes (default: from the model's "
        "source, e.g. fashion-mnist)",
    )
    _add_ray(p)
    p.add_argument("--workers", type=int, default=d.decode_workers, help="decoding threads")
    p.add_argument("--threads", type=int, help="PyTorch intra-op threads (default: all cores)")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def _add_limits(p: argparse.ArgumentParser, d: ServeSettings) -> None:
    """The per-request and server-wide limits, as one argument group."""
    limits = p.add_argument_group(
        "limits",
        "per request (413 beyond), and server-wide over all requests in flight (503 with "
        "Retry-After once a request has waited --busy-wait-s for room)",
    )
    limits.add_argument(
        "--max-upload-mb",
        type=float,
        default=d.max_upload_mb,
        help=f"largest file, MiB; refused while it streams in (default {d.max_upload_mb:g})",
    )
    limits.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help=f"largest image, width x height from its header (default {d.max_pixels})",
    )
    limits.add_argument(
        "--max-request-pixels",
        type=int,
        default=d.max_request_pixels,
        help=f"all images of one request together, pixels (default {d.max_request_pixels})",
    )
    limits.add_argument(
        "--max-files",
        type=int,
        default=d.max_files,
        help=f"files per batch request (default {d.max_files})",
    )
    limits.add_argument(
        "--max-inflight-upload-mb",
        type=float,
        default=d.max_inflight_upload_mb,
        help="upload bytes held by all requests in flight, MiB "
        f"(default {d.max_inflight_upload_mb:g})",
    )
    limits.add_argument(
        "--max-inflight-pixels",
        type=int,
        default=d.max_inflight_pixels,
        help="image pixels queued for or in decoding, all requests together "
        f"(default {d.max_inflight_pixels})",
    )
    limits.add_argument(
        "--busy-wait-s",
        type=float,
        default=d.busy_wait_s,
        help="how long a request waits for room in a full budget before its 503 "
        f"(default {d.busy_wait_s:g})",
    )
    limits.add_argument(
        "--max-explain-concurrent",
        type=int,
        default=d.max_explain_concurrent,
        help="attention maps computed at once, in their own thread "
        f"(default {d.max_explain_concurrent})",
    )
    limits.add_argument(
        "--max-explain-queue",
        type=int,
        default=d.max_explain_queue,
        help=f"attention-map requests waiting; 503 beyond (default {d.max_explain_queue})",
    )


def _add_ray(p: argparse.ArgumentParser) -> None:
    """The engine choice and the Ray Serve replicas' settings, as one argument group."""
    ray = p.add_argument_group("replicas on Ray Serve (--engine ray)")
    ray.add_argument(
        "--engine",
        choices=["uvicorn", "ray"],
        default="uvicorn",
        help="uvicorn: one process (default); ray: Ray Serve replicas of the same app",
    )
    r = RaySettings()
    ray.add_argument(
        "--replicas", type=int, default=r.replicas, help="replicas (the minimum when autoscaling)"
    )
    ray.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas")
    ray.add_argument(
        "--replica-cpus",
        type=float,
        default=r.replica_cpus,
        help=f"CPUs reserved per replica, also its PyTorch threads (default {r.replica_cpus:g})",
    )
    ray.add_argument(
        "--address",
        help="a running Ray cluster (auto, or ray://HEAD:10001); default: a private local one, "
        "shut down on exit",
    )


def _check_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    """Every argument that can be checked before the model loads, checked (one line on the
    first bad one); returns the hosts to accept."""
    positive = (
        "max_batch",
        "workers",
        "max_files",
        "max_upload_mb",
        "max_pixels",
        "max_request_pixels",
        "max_inflight_upload_mb",
        "max_inflight_pixels",
        "max_explain_concurrent",
        "threads",
    )
    for flag in positive:
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, not {value}")
    if not 0 <= args.port <= 65535 or args.max_wait_ms < 0:
        raise UsageError(
            "--port must be 0..65535 and --max-wait-ms >= 0, "
            f"not {args.port} and {args.max_wait_ms}"
        )
    if args.busy_wait_s < 0 or args.shutdown_timeout < 0:
        raise UsageError(
            "--busy-wait-s and --shutdown-timeout must be >= 0, "
            f"not {args.busy_wait_s} and {args.shutdown_timeout}"
        )
    if args.max_inflight_upload_mb < args.max_upload_mb:
        raise UsageError("--max-inflight-upload-mb must be at least --max-upload-mb")
    hosts = tuple(args.allowed_host or ("*",))
    for host in hosts:
        if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
            raise UsageError(f"--allowed-host takes a name, '*' or '*.domain', not {host!r}")
    if args.max_explain_queue < 0:
        raise UsageError(f"--max-explain-queue must be >= 0, not {args.max_explain_queue}")
    if args.name is not None:
        check_model_name(args.name)
    return hosts


def run(args: argparse.Namespace) -> int:
    """Load the model, then serve until Ctrl-C or SIGTERM."""
    hosts = _check_arguments(args)
    ray_settings = RaySettings(
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        replica_cpus=args.replica_cpus,
        address=args.address,
    )
    ray_settings.check()
    if args.threads:
        torch.set_num_threads(args.threads)
    require_server()
    clf = classifier_from_args(args)  # loaded here too, so a bad model is one line, not a crash
    name = args.name or model_name(clf.loaded.source)
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_request_pixels=args.max_request_pixels,
        max_files=args.max_files,
        max_inflight_upload_mb=args.max_inflight_upload_mb,
        max_inflight_pixels=args.max_inflight_pixels,
        busy_wait_s=args.busy_wait_s,
        shutdown_timeout_s=args.shutdown_timeout,
        allowed_hosts=hosts,
        decode_workers=args.workers,
        max_explain_concurrent=args.max_explain_concurrent,
        max_explain_queue=args.max_explain_queue,
        name=name,
    )
    if settings.host not in LOOPBACK:
        hint = "" if args.allowed_host else "; consider --allowed-host"
        print(
            f"deit serve: warning: listening on {settings.host}, reachable from other "
            f"machines{hint}",
            file=sys.stderr,
        )
    where = f"http://{settings.host}:{settings.port}/"
    print(f"deit serve: {clf.loaded.source} ({clf.engine}) as {name!r} on {where}", file=sys.stderr)
    if args.engine == "ray":
        del clf  # each replica loads its own
        serve_on_ray(
            functools.partial(classifier_from_args, args),
            settings,
            ray_settings,
            log=lambda line: print(f"deit serve: {line}", file=sys.stderr, flush=True),
        )
    else:
        serve(clf, settings, log_level=args.log_level)
    return 0
