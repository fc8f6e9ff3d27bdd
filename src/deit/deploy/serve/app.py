"""HTTP server: classification with dynamic batching, attention maps and a web page.

Endpoints (FastAPI on uvicorn; uploads are ``multipart/form-data``):

    GET  /                     the web page (``web/``: HTML, JS and CSS, no CDN); also HEAD
    GET  /static/...           the page's script, stylesheet and sample images
    GET  /openapi.json         the API schema (no /docs: Swagger UI would come from a CDN)
    GET  /healthz              liveness and batching counters
    GET  /v1/model             model name, config, labels, preprocessing, limits, batching counters
    POST /v1/classify          one image (field ``file``), ``top_k`` as query or form field
    POST /v1/classify/batch    several images (field ``files``); per-file results or errors
    POST /v1/explain           attention rollout: ``format=png`` (overlay) or ``json`` (maps)

Concurrent requests are batched: each upload is decoded and preprocessed in a thread pool as
it arrives, then queued; one worker takes up to ``max_batch`` queued images, waiting at most
``max_wait_ms`` after the first, runs the model once on the stack and hands each request its
row. Decoding thus overlaps inference, and unreadable uploads are answered before they reach
the queue. The model runs in one dedicated thread, so the event loop keeps serving meanwhile.

Errors are JSON ``{"error": "..."}``: 413 for an upload over ``max_upload_mb``, more than
``max_files`` files, an image over ``max_pixels`` or a request over ``max_request_pixels``;
415 for a non-image or a missing multipart body, 400 for an empty or malformed upload, 422 for
a truncated/corrupt image or bad parameters, 503 (with ``Retry-After``) when the queue, the
server's upload budget or its decode budget is full. The server binds 127.0.0.1 unless told
otherwise.

Hostile load is bounded by two server-wide budgets shared by the requests in flight (see
:mod:`deit.deploy.serve.limits`): upload bytes held in memory (``max_inflight_upload_mb``), and
image pixels queued for or in decoding (``max_inflight_pixels``, read from each image's header
before any decoding, so a batch of huge images can't fill the decoding threads' queue and
stall everyone else). On SIGTERM/SIGINT requests in flight get ``shutdown_timeout_s`` to
finish, then are cancelled.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations, and
``Request`` is imported inside :func:`create_app` to keep FastAPI an optional dependency.)
"""

import asyncio
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torch import Tensor

from deit.checkpoints import as_loaded
from deit.deploy.serve.batching import DynamicBatcher
from deit.deploy.serve.limits import RETRY_AFTER_S, Budget, Reservation
from deit.deploy.serve.uploads import ApiError, Uploads, parse_top_k, read_uploads
from deit.errors import BusyError, DeiTError
from deit.explain import explain_payload, rollout_maps
from deit.inference import Classifier
from deit.runtime import require
from deit.transforms import load_image, preprocess_image

T = TypeVar("T")
WEB_DIR = Path(__file__).parent / "web"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and batching. Sizes in MiB; pixels are width x height (from the header).

    Per request: ``max_upload_mb`` per file, ``max_files`` files, ``max_pixels`` per image and
    ``max_request_pixels`` for all of a request's images (413 beyond). Server-wide, over all
    requests in flight: ``max_inflight_upload_mb`` of upload bytes held and
    ``max_inflight_pixels`` queued for or in decoding; a request that finds a budget spent
    waits up to ``busy_wait_s``, then gets 503 with ``Retry-After``. ``allowed_hosts``:
    ``Host`` header values accepted (``*`` = any). ``shutdown_timeout_s``: how long requests
    in flight may finish after SIGTERM/SIGINT before they are cancelled.
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
    busy_wait_s: float = 5.0
    shutdown_timeout_s: float = 10.0
    allowed_hosts: tuple[str, ...] = ("*",)
    decode_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    default_top_k: int = 5

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_inflight_upload_bytes(self) -> int:
        return int(self.max_inflight_upload_mb * 1024 * 1024)


def display_name(source: str) -> str:
    """What the page and ``/v1/model`` show of a model's source: a file or folder's name (never
    its absolute path), a Hub id or embedded model's name as is."""
    path = Path(source)
    try:
        local = path.is_absolute() or path.exists()
    except OSError:
        local = False
    return (path.name or source) if local else source


def _model_info(clf: Any, settings: ServeSettings, stats: dict[str, Any]) -> dict[str, Any]:
    loaded = clf.loaded
    return {
        "source": display_name(loaded.source),
        "format": loaded.format,
        "config": loaded.config.to_dict(),
        "distilled": loaded.config.distilled,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "num_labels": len(loaded.labels),
        "labels": loaded.labels,
        "preprocess": loaded.preprocess.to_dict(),
        "device": str(clf.device),
        "precision": clf.precision,
        "engine": clf.engine,
        "fast_decode": clf.fast_decode,
        "limits": {
            "max_upload_mb": settings.max_upload_mb,
            "max_pixels": settings.max_pixels,
            "max_request_pixels": settings.max_request_pixels,
            "max_files": settings.max_files,
            "max_inflight_upload_mb": settings.max_inflight_upload_mb,
            "max_inflight_pixels": settings.max_inflight_pixels,
        },
        "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms, **stats},
    }


class _Service:
    """What the endpoints do, apart from HTTP: budgets, decoding, batching, explaining.

    The thread pools and the batcher exist while the app runs (:meth:`start`/:meth:`stop`,
    called by the app's lifespan).
    """

    def __init__(self, clf: Classifier, settings: ServeSettings) -> None:
        self.clf, self.settings = clf, settings
        self.pools: dict[str, ThreadPoolExecutor] = {}
        wait = settings.busy_wait_s
        self.upload_budget = Budget(settings.max_inflight_upload_bytes, "upload bytes", wait_s=wait)
        self.pixel_budget = Budget(settings.max_inflight_pixels, "pixels to decode", wait_s=wait)
        self.batcher: DynamicBatcher | None = None

    def start(self) -> DynamicBatcher:
        s = self.settings
        self.pools["model"] = ThreadPoolExecutor(1, thread_name_prefix="deit-model")
        self.pools["decode"] = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="deit-io")
        self.pools["peek"] = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="deit-hdr")
        self.batcher = DynamicBatcher(
            self.clf.logits,
            self.pools["model"],
            max_batch=s.max_batch,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
        )
        self.batcher.start()
        return self.batcher

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    async def run_in(self, pool: str, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pools[pool], fn, *args)

    def decode(self, data: bytes) -> tuple[Any, Tensor]:
        img = load_image(
            data, max_pixels=self.settings.max_pixels, fast_decode=self.clf.fast_decode
        )
        return img, preprocess_image(img, self.clf.loaded.preprocess)

    def header_pixels(self, files: list[tuple[str, bytes]]) -> list[int]:
        """Each image's width x height from its header, without decoding; 0 for the images
        that ``load_image`` refuses from the header anyway (unreadable, over max_pixels)."""
        from PIL import Image

        sizes = []
        for _, data in files:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    pixels = img.size[0] * img.size[1]
            except Exception:  # not an image, corrupt, or PIL's decompression-bomb check
                pixels = 0
            sizes.append(pixels if pixels <= self.settings.max_pixels else 0)
        return sizes

    async def reserve_pixels(self, files: list[tuple[str, bytes]], held: Reservation) -> list[int]:
        """Each file's pixels, all taken from the decode budget (413 over the request limit,
        503 if the server stays too busy); each is given back once that file is decoded."""
        sizes = await self.run_in("peek", self.header_pixels, files)
        total, limit = sum(sizes), self.settings.max_request_pixels
        if total > limit:
            raise ApiError(
                413,
                f"the images of this request hold {total} pixels in all, more than the limit "
                f"of {limit}; send fewer or smaller images",
            )
        await held.grow(total)
        return sizes

    async def upload_form(
        self, request: Any, held: Reservation, field_name: str, max_files: int = 1
    ) -> tuple[Uploads, int]:
        """The request's files (within the byte budget ``held``) and its ``top_k``."""
        form = await read_uploads(
            request,
            field_name=field_name,
            max_file_bytes=self.settings.max_upload_bytes,
            max_files=max_files,
            budget=held,
        )
        k = parse_top_k(
            request.query_params.get("top_k", form.fields.get("top_k")),
            self.settings.default_top_k,
            len(self.clf.labels),
        )
        return form, k

    async def classify_one(
        self, data: bytes, k: int, pixels: int, held: Reservation
    ) -> list[dict[str, Any]]:
        assert self.batcher is not None, "the app is not running"
        try:
            _, x = await self.run_in("decode", self.decode, data)
        finally:
            held.shrink(pixels)  # decoded (or failed): its pixels are free for others
        try:
            row = await self.batcher.submit(x)
        except BusyError as e:
            raise BusyError(f"server busy ({e}), retry later") from None
        return [asdict(p) for p in self.clf.topk(row[None], k)[0]]

    async def classify(self, request: Any) -> dict[str, Any]:
        async with self.upload_budget.hold() as held_bytes, self.pixel_budget.hold() as held_px:
            form, k = await self.upload_form(request, held_bytes, "file")
            sizes = await self.reserve_pixels(form.files, held_px)
            name, data = form.files[0]
            start = time.perf_counter()
            preds = await self.classify_one(data, k, sizes[0], held_px)
        ms = round(1000 * (time.perf_counter() - start), 3)
        return {"filename": name, "predictions": preds, "time_ms": ms}

    async def classify_batch(self, request: Any) -> dict[str, Any]:
        async with self.upload_budget.hold() as held_bytes, self.pixel_budget.hold() as held_px:
            form, k = await self.upload_form(request, held_bytes, "files", self.settings.max_files)
            sizes = await self.reserve_pixels(form.files, held_px)
            outcomes = await asyncio.gather(
                *(
                    self.classify_one(data, k, pixels, held_px)
                    for (_, data), pixels in zip(form.files, sizes)
                ),
                return_exceptions=True,
            )
        results: list[dict[str, Any]] = []
        for (name, _), out in zip(form.files, outcomes):
            if isinstance(out, DeiTError):
                results.append({"filename": name, "error": str(out), "status": out.http_status})
            elif isinstance(out, BaseException):
                raise out
            else:
                results.append({"filename": name, "predictions": out})
        return {"results": results}

    async def explain(self, request: Any) -> tuple[bytes | dict[str, Any], str]:
        """The attention-rollout answer and its format (``png`` or ``json``)."""
        loaded = self.clf.loaded
        async with self.upload_budget.hold() as held_bytes, self.pixel_budget.hold() as held_px:
            form, _ = await self.upload_form(request, held_bytes, "file")
            params = {**form.fields, **request.query_params}
            token, fmt = params.get("token", "both"), params.get("format", "json")
            if token not in ("cls", "dist", "both") or fmt not in ("json", "png"):
                raise ApiError(422, "token must be cls, dist or both; format json or png")
            if loaded.format in ("onnx", "openvino"):
                raise ApiError(
                    422, f"explain needs a PyTorch model; this server runs {loaded.format}"
                )
            if token == "dist" and not loaded.config.distilled:
                raise ApiError(422, "this model has no distillation token")
            await self.reserve_pixels(form.files, held_px)  # held until the answer is built
            img, pixels = await self.run_in("decode", self.decode, form.files[0][1])

            def run() -> dict[str, np.ndarray]:
                ref = loaded.model  # the fp32 eager model, whatever precision serves
                maps = rollout_maps(ref, pixels[None].to(next(ref.parameters()).device), token)
                return {k: v[0].numpy() for k, v in maps.items()}

            maps = await self.run_in("model", run)
            body = await self.run_in("decode", explain_payload, img, loaded.preprocess, maps, fmt)
        return body, fmt


def create_app(model: Any, settings: ServeSettings | None = None) -> Any:
    """The FastAPI application serving ``model`` (a ``Classifier``, loaded model or source).

    ``app.state.batcher.stats`` holds the batching counters once the app has started.
    """
    require_server()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    settings = settings or ServeSettings()
    clf = model if isinstance(model, Classifier) else _classifier(model)
    service = _Service(clf, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        app.state.batcher = service.start()
        try:
            yield
        finally:
            await service.stop()

    # No /docs: Swagger UI loads its script from a CDN. The schema stays at /openapi.json.
    app = FastAPI(title="deit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    if "*" not in settings.allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    app.add_middleware(_edge_middleware())  # outermost: sees every response
    _add_error_handlers(app)

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        return {"status": "ok", "batching": request.app.state.batcher.stats.to_dict()}

    @app.get("/v1/model")
    async def model_info(request: Request) -> dict[str, Any]:
        return _model_info(clf, settings, request.app.state.batcher.stats.to_dict())

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        return await service.classify(request)

    @app.post("/v1/classify/batch")
    async def classify_batch(request: Request) -> dict[str, Any]:
        return await service.classify_batch(request)

    @app.post("/v1/explain")
    async def explain_endpoint(request: Request) -> Response:
        body, fmt = await service.explain(request)
        if fmt == "png":
            return Response(body, media_type="image/png")
        return JSONResponse(body)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def _add_error_handlers(app: Any) -> None:
    """Every error as ``{"error": message}``: a DeiTError with its class's HTTP status (503s
    with ``Retry-After``), FastAPI's own errors with theirs, anything else 500."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(DeiTError)
    async def _deit_error(_: Request, e: DeiTError) -> JSONResponse:
        retry = getattr(e, "retry_after", None)
        if e.http_status == 503 and retry is None:
            retry = RETRY_AFTER_S
        return error(e.http_status, str(e), retry)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {e}")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, x.get('loc', ())))}: {x.get('msg')}" for x in e.errors()]
        return error(422, "; ".join(parts) or "invalid request")


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _edge_middleware() -> Any:
    """The outermost ASGI middleware: :data:`SECURITY_HEADERS` on every HTTP response (the
    page, its static files, the API and error answers alike), and a request cancelled by the
    shutdown deadline logged in one line (answered 503 if nothing was sent yet) instead of
    uvicorn's traceback."""
    import logging

    from starlette.datastructures import MutableHeaders

    log = logging.getLogger("uvicorn.error")

    class Edge:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            started = False

            async def send_with_headers(message: Any) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    headers = MutableHeaders(scope=message)
                    for name, value in SECURITY_HEADERS.items():
                        headers.setdefault(name, value)
                await send(message)

            try:
                await self.app(scope, receive, send_with_headers)
            except asyncio.CancelledError:  # uvicorn's shutdown deadline; the task ends here
                log.info("%s %s: cancelled at shutdown", scope["method"], scope["path"])
                if not started:
                    body = b'{"error":"server shutting down"}'
                    await send_with_headers(
                        {
                            "type": "http.response.start",
                            "status": 503,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})

    return Edge


def _classifier(model: Any) -> Classifier:
    loaded = as_loaded(model)
    return Classifier(loaded, device=str(next(loaded.model.parameters()).device))


# --------------------------------------------------------------------------- running


class ServerThread:
    """Run the app under uvicorn in a background thread (tests, notebooks, benchmarks).

    Example:
        >>> with ServerThread(create_app("fashion-mnist")) as server:
        ...     httpx.get(server.url + "/healthz").json()
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import threading

        uvicorn = require_server()
        settings = getattr(getattr(app, "state", None), "settings", None) or ServeSettings()
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="deit-serve", daemon=True)
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def require_server() -> Any:
    """Import the serving extra's packages (uvicorn returned), or say what to install."""
    require("fastapi", "fastapi", "serve")
    require("python_multipart", "python-multipart", "serve")
    return require("uvicorn", "uvicorn", "serve")


def serve(model: Any, settings: ServeSettings | None = None, log_level: str = "info") -> None:
    """Serve ``model`` until SIGTERM or SIGINT (blocking).

    On the signal the server stops accepting connections and gives the requests in flight
    ``settings.shutdown_timeout_s`` to finish before cancelling them (a second SIGINT
    cancels at once).
    """
    settings = settings or ServeSettings()
    uvicorn = require_server()
    app = create_app(model, settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
