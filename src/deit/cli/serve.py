"""``deit serve``: the HTTP API and web page, with dynamic batching."""

from __future__ import annotations

import argparse
import sys

import torch

from deit.cli._args import add_model_arguments, add_speed_arguments, classifier_from_args
from deit.deploy.serve import LOOPBACK, ServeSettings, require_server, serve
from deit.errors import UsageError

NAME = "serve"
HELP = "HTTP API and web page with dynamic batching"


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
    p.add_argument(
        "--max-upload-mb", type=float, default=d.max_upload_mb, help="largest upload per image, MiB"
    )
    p.add_argument(
        "--max-pixels", type=int, default=d.max_pixels, help="largest decoded image, width x height"
    )
    p.add_argument("--max-files", type=int, default=d.max_files, help="files per batch request")
    p.add_argument("--workers", type=int, default=d.decode_workers, help="decoding threads")
    p.add_argument("--threads", type=int, help="PyTorch intra-op threads (default: all cores)")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def run(args: argparse.Namespace) -> int:
    """Load the model, then serve until Ctrl-C."""
    for flag in ("max_batch", "workers", "max_files", "max_upload_mb", "max_pixels", "threads"):
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, not {value}")
    if not 0 <= args.port <= 65535 or args.max_wait_ms < 0:
        raise UsageError(
            "--port must be 0..65535 and --max-wait-ms >= 0, "
            f"not {args.port} and {args.max_wait_ms}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    require_server()
    clf = classifier_from_args(args)
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_files=args.max_files,
        decode_workers=args.workers,
    )
    if settings.host not in LOOPBACK:
        print(
            f"deit serve: warning: listening on {settings.host}, reachable from other machines",
            file=sys.stderr,
        )
    print(
        f"deit serve: {clf.loaded.source} on http://{settings.host}:{settings.port}/",
        file=sys.stderr,
    )
    serve(clf, settings, log_level=args.log_level)
    return 0
