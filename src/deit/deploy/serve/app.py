"""HTTP server: classification with dynamic batching, attention maps, a web page, and the
protocols standard clients speak, all over one inference core.

Endpoints (FastAPI on uvicorn):

    GET  /                     the web page (``web/``: HTML, JS and CSS, no CDN) for a client
                               that accepts ``text/html``; else KServe v1's ``{"status": "alive"}``
    POST /                     the Hugging Face inference convention (:mod:`.protocols`)
    GET  /static/...           the page's script and stylesheet
    GET  /openapi.json         the API schema (no /docs: Swagger UI would come from a CDN)
    GET  /healthz              liveness and batching counters
    GET  /metrics              Prometheus metrics (:mod:`.metrics`)
    GET  /v1/model             model name, config, labels, preprocessing, limits, batching counters
    GET  /v1/samples[/{i}]     the sample images that fit the model (:mod:`.page`)
    POST /v1/classify          one image (multipart field ``file``), ``top_k`` as query or field
    POST /v1/classify/batch    several images (field ``files``); per-file results or errors
    POST /v1/explain           attention rollout: ``format=png`` (overlay) or ``json`` (maps)
    /v2/..., /v1/models/...    Open Inference Protocol v2 and KServe v1 (:mod:`.protocols`)

Every route goes through :class:`~deit.deploy.serve.core.InferenceCore`: uploads are decoded
and preprocessed in a thread pool as they arrive, then batched (one model thread, up to
``max_batch`` images, waiting at most ``max_wait_ms`` after the first). Attention maps have
their own thread and bounded queue, so they never delay classifications.

Errors are JSON ``{"error": "..."}``: 413 for an upload over ``max_upload_mb``, more than
``max_files`` files, an image over ``max_pixels`` or a request over ``max_request_pixels``;
415 for a non-image or a missing multipart body, 400 for an empty or malformed upload, 422 for
a truncated/corrupt image or bad parameters, 503 (with ``Retry-After``) when the queue, the
server's upload budget, its decode budget or the explain queue is full. The server binds
127.0.0.1 unless told otherwise.

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
import time
from pathlib import Path
from typing import Any, Literal

from deit import __version__
from deit.checkpoints import as_loaded
from deit.deploy.serve.core import Classified, InferenceCore, top_predictions
from deit.deploy.serve.limits import RETRY_AFTER_S, Reservation
from deit.deploy.serve.metrics import ServeMetrics, route_of
from deit.deploy.serve.page import (
    Sample,
    check_model_name,
    display_name,
    model_name,
    page_samples,
)
from deit.deploy.serve.protocols import (
    add_huggingface_routes,
    add_kserve_v1_routes,
    add_v2_routes,
)
from deit.deploy.serve.settings import ServeSettings
from deit.deploy.serve.uploads import Uploads, parse_top_k, read_uploads
from deit.errors import ApiError, DeiTError
from deit.inference import Classifier
from deit.runtime import require

__all__ = ["LOOPBACK", "ServeSettings", "ServerThread", "create_app", "display_name", "serve"]

WEB_DIR = Path(__file__).parent / "web"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKENS: dict[str, Literal["cls", "dist", "both"]] = {"cls": "cls", "dist": "dist", "both": "both"}


def _model_info(core: InferenceCore, name: str, stats: dict[str, Any]) -> dict[str, Any]:
    clf, settings = core.clf, core.settings
    loaded = clf.loaded
    return {
        "name": name,
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
            "max_explain_concurrent": settings.max_explain_concurrent,
            "max_explain_queue": settings.max_explain_queue,
        },
        "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms, **stats},
    }


async def _upload_form(
    core: InferenceCore, request: Any, held: Reservation, field_name: str, max_files: int = 1
) -> tuple[Uploads, int]:
    """The request's multipart files (within the byte budget ``held``) and its ``top_k``."""
    form = await read_uploads(
        request,
        field_name=field_name,
        max_file_bytes=core.settings.max_upload_bytes,
        max_files=max_files,
        budget=held,
    )
    k = parse_top_k(
        request.query_params.get("top_k", form.fields.get("top_k")),
        core.settings.default_top_k,
        len(core.labels),
    )
    return form, k


def _file_answer(name: str, out: Classified | DeiTError, labels: list[str], k: int) -> dict:
    """One file's entry in a JSON answer: predictions and extra fields, or its error."""
    if isinstance(out, DeiTError):
        return {"filename": name, "error": str(out), "status": out.http_status}
    return {"filename": name, "predictions": top_predictions(out, labels, k), **out.extras}


def create_app(model: Any, settings: ServeSettings | None = None) -> Any:
    """The FastAPI application serving ``model`` (a ``Classifier``, loaded model or source).

    Every route's answer carries each image's out-of-distribution verdict, ``ood`` (see
    :mod:`deit.deploy.serve.core`).

    ``app.state.batcher.stats`` holds the batching counters once the app has started;
    ``app.state.core`` is the inference core and ``app.state.metrics`` the Prometheus metrics.
    """
    require_server()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    settings = settings or ServeSettings()
    clf = model if isinstance(model, Classifier) else _classifier(model)
    name = check_model_name(settings.name or model_name(clf.loaded.source))
    metrics = ServeMetrics(settings.max_batch)
    core = InferenceCore(clf, settings, observe=metrics.observe_batch)
    samples = page_samples(clf.loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        app.state.batcher = core.start()
        try:
            yield
        finally:
            await core.stop()

    # No /docs: Swagger UI loads its script from a CDN. The schema stays at /openapi.json.
    app = FastAPI(
        title="deit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings, app.state.core, app.state.metrics = settings, core, metrics
    if "*" not in settings.allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    app.add_middleware(_edge_middleware(metrics, settings.served_by))  # outermost
    _add_error_handlers(app)

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        return {"status": "ok", "batching": request.app.state.batcher.stats.to_dict()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/model")
    async def model_info(request: Request) -> dict[str, Any]:
        return _model_info(core, name, request.app.state.batcher.stats.to_dict())

    _add_image_routes(app, core)
    _add_page_routes(app, samples)
    add_huggingface_routes(app, core)
    add_v2_routes(app, core, name, __version__)
    add_kserve_v1_routes(app, core, name)
    return app


def _add_image_routes(app: Any, core: InferenceCore) -> None:
    """Our own multipart routes: ``/v1/classify``, ``/v1/classify/batch``, ``/v1/explain``."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    settings = core.settings

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        async with core.budgets() as (held_bytes, held_px):
            form, k = await _upload_form(core, request, held_bytes, "file")
            start = time.perf_counter()
            [out] = await core.classify_files(form.files, held_px)
        if isinstance(out, DeiTError):
            raise out
        answer = _file_answer(form.files[0][0], out, core.labels, k)
        return {**answer, "time_ms": round(1000 * (time.perf_counter() - start), 3)}

    @app.post("/v1/classify/batch")
    async def classify_batch(request: Request) -> dict[str, Any]:
        async with core.budgets() as (held_bytes, held_px):
            form, k = await _upload_form(core, request, held_bytes, "files", settings.max_files)
            outcomes = await core.classify_files(form.files, held_px)
        files = [n for n, _ in form.files]
        return {"results": [_file_answer(n, o, core.labels, k) for n, o in zip(files, outcomes)]}

    @app.post("/v1/explain")
    async def explain_endpoint(request: Request) -> Response:
        async with core.explain_gate.admit(), core.budgets() as (held_bytes, held_px):
            form, _ = await _upload_form(core, request, held_bytes, "file")
            params = {**form.fields, **request.query_params}
            token, fmt = params.get("token", "both"), params.get("format", "json")
            if token not in TOKENS or fmt not in ("json", "png"):
                raise ApiError(422, "token must be cls, dist or both; format json or png")
            body = await core.explain(form.files[0][1], held_px, TOKENS[token], fmt)
        if isinstance(body, bytes):
            return Response(body, media_type="image/png")
        return JSONResponse(body)


def _add_page_routes(app: Any, samples: list[Sample]) -> None:
    """The web page (``GET /``; KServe v1's liveness for non-browsers), its static files and
    its sample images."""
    from fastapi import Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    @app.get("/v1/samples")
    async def sample_list() -> list[dict[str, str]]:
        return [
            {"title": s.title, "file": s.path.name, "url": f"v1/samples/{i}"}
            for i, s in enumerate(samples)
        ]

    @app.get("/v1/samples/{index}")
    async def sample_image(index: int) -> FileResponse:
        if not 0 <= index < len(samples):
            raise ApiError(404, f"no sample {index}")
        return FileResponse(samples[index].path)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index(request: Request) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return FileResponse(WEB_DIR / "index.html")
        return JSONResponse({"status": "alive"})  # KServe v1 liveness

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


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


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _edge_middleware(metrics: ServeMetrics, served_by: str | None) -> Any:
    """The outermost ASGI middleware: :data:`SECURITY_HEADERS` (and ``X-Served-By`` when
    ``served_by`` is set) on every HTTP response (the page, its static files, the API and
    error answers alike), each request counted in ``metrics``, and a request cancelled by the
    shutdown deadline logged in one line (answered 503 if nothing was sent yet) instead of
    uvicorn's traceback. Request headers (``Authorization`` among them) are never logged."""
    import logging

    from starlette.datastructures import MutableHeaders

    log = logging.getLogger("uvicorn.error")
    extra = {**SECURITY_HEADERS, **({"X-Served-By": served_by} if served_by else {})}

    class Edge:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            status, start = 0, time.perf_counter()

            async def send_with_headers(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    headers = MutableHeaders(scope=message)
                    for name, value in extra.items():
                        headers.setdefault(name, value)
                await send(message)

            try:
                await self.app(scope, receive, send_with_headers)
            except asyncio.CancelledError:  # uvicorn's shutdown deadline; the task ends here
                log.info("%s %s: cancelled at shutdown", scope["method"], scope["path"])
                if not status:
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
            finally:
                seconds = time.perf_counter() - start
                metrics.observe_request(route_of(scope), scope["method"], status or 500, seconds)

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

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        import threading

        uvicorn = require_server()
        settings = getattr(getattr(app, "state", None), "settings", None) or ServeSettings()
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
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
