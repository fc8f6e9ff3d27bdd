"""HTTP server: classification with dynamic batching, attention maps and a web page.

Endpoints (FastAPI on uvicorn; uploads are ``multipart/form-data``):

    GET  /                     the web page (``deit/web/``: HTML, JS and CSS, no CDN)
    GET  /healthz              liveness and batching counters
    GET  /v1/model             config, labels, preprocessing, limits, batching counters
    POST /v1/classify          one image (field ``file``), ``top_k`` as query or form field
    POST /v1/classify/batch    several images (field ``files``); per-file results or errors
    POST /v1/explain           attention rollout: ``format=png`` (overlay) or ``json`` (maps)

Concurrent requests are batched: each upload is decoded and preprocessed in a thread pool as
it arrives, then queued; one worker takes up to ``max_batch`` queued images, waiting at most
``max_wait_ms`` after the first, runs the model once on the stack and hands each request its
row. Decoding thus overlaps inference, and unreadable uploads are answered before they reach
the queue. The model runs in one dedicated thread, so the event loop keeps serving meanwhile.

Errors are JSON ``{"error": "..."}``: 413 for an upload over ``max_upload_mb`` or an image
over ``max_pixels``, 415 for a non-image or a missing multipart body, 400 for an empty or
malformed upload, 422 for a truncated/corrupt image or bad parameters, 503 when the queue is
full. The server binds 127.0.0.1 unless told otherwise.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations, and
``Request`` is imported inside :func:`create_app` to keep FastAPI an optional dependency.)
"""

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from deit.checkpoints import as_loaded
from deit.deploy.serve.batching import DynamicBatcher
from deit.deploy.serve.uploads import ApiError, parse_top_k, read_uploads
from deit.errors import BusyError, DeiTError
from deit.explain import explain_payload, rollout_maps
from deit.inference import Classifier
from deit.runtime import require
from deit.transforms import load_image, preprocess_image

WEB_DIR = Path(__file__).parent / "web"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and batching. Sizes in MiB; ``max_pixels`` is width x height."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 10.0
    max_pixels: int = 50_000_000
    max_files: int = 32
    max_queue: int = 1024
    decode_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    default_top_k: int = 5

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def _model_info(clf: Any, settings: ServeSettings, stats: dict[str, Any]) -> dict[str, Any]:
    loaded = clf.loaded
    return {
        "source": loaded.source,
        "format": loaded.format,
        "config": loaded.config.to_dict(),
        "distilled": loaded.config.distilled,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "num_labels": len(loaded.labels),
        "labels": loaded.labels,
        "preprocess": loaded.preprocess.to_dict(),
        "device": str(clf.device),
        "precision": clf.precision,
        "fast_decode": clf.fast_decode,
        "limits": {
            "max_upload_mb": settings.max_upload_mb,
            "max_pixels": settings.max_pixels,
            "max_files": settings.max_files,
        },
        "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms, **stats},
    }


def create_app(model: Any, settings: ServeSettings | None = None) -> Any:
    """The FastAPI application serving ``model`` (a ``Classifier``, loaded model or source).

    ``app.state.batcher.stats`` holds the batching counters once the app has started.
    """
    require_server()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    settings = settings or ServeSettings()
    clf = model if isinstance(model, Classifier) else _classifier(model)
    loaded, cfg = clf.loaded, clf.loaded.preprocess
    pools: dict[str, ThreadPoolExecutor] = {}  # created per run of the app, in lifespan()

    def decode(data: bytes) -> tuple[Any, Tensor]:
        img = load_image(data, max_pixels=settings.max_pixels, fast_decode=clf.fast_decode)
        return img, preprocess_image(img, cfg)

    async def to_tensor(data: bytes) -> tuple[Any, Tensor]:
        return await asyncio.get_running_loop().run_in_executor(pools["decode"], decode, data)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        pools["model"] = ThreadPoolExecutor(1, thread_name_prefix="deit-model")
        pools["decode"] = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="deit-io")
        batcher = DynamicBatcher(
            clf.logits,
            pools["model"],
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
        )
        app.state.batcher = batcher
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            for pool in pools.values():
                pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="deit", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(DeiTError)
    async def _deit_error(_: Request, e: DeiTError) -> JSONResponse:
        return error(e.http_status, str(e))

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

    def predictions(row: Tensor, k: int) -> list[dict[str, Any]]:
        return [asdict(p) for p in clf.topk(row[None], k)[0]]

    async def classify_one(data: bytes, k: int, batcher: DynamicBatcher) -> list[dict[str, Any]]:
        _, pixels = await to_tensor(data)
        try:
            return predictions(await batcher.submit(pixels), k)
        except BusyError as e:
            raise BusyError(f"server busy ({e}), retry later") from None

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        return {"status": "ok", "batching": request.app.state.batcher.stats.to_dict()}

    @app.get("/v1/model")
    async def model_info(request: Request) -> dict[str, Any]:
        return _model_info(clf, settings, request.app.state.batcher.stats.to_dict())

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        form = await read_uploads(
            request, field_name="file", max_file_bytes=settings.max_upload_bytes
        )
        k = parse_top_k(
            request.query_params.get("top_k", form.fields.get("top_k")),
            settings.default_top_k,
            len(loaded.labels),
        )
        name, data = form.files[0]
        start = time.perf_counter()
        preds = await classify_one(data, k, request.app.state.batcher)
        return {
            "filename": name,
            "predictions": preds,
            "time_ms": round(1000 * (time.perf_counter() - start), 3),
        }

    @app.post("/v1/classify/batch")
    async def classify_batch(request: Request) -> dict[str, Any]:
        form = await read_uploads(
            request,
            field_name="files",
            max_file_bytes=settings.max_upload_bytes,
            max_files=settings.max_files,
        )
        k = parse_top_k(
            request.query_params.get("top_k", form.fields.get("top_k")),
            settings.default_top_k,
            len(loaded.labels),
        )
        batcher = request.app.state.batcher
        outcomes = await asyncio.gather(
            *(classify_one(data, k, batcher) for _, data in form.files), return_exceptions=True
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

    @app.post("/v1/explain")
    async def explain_endpoint(request: Request) -> Response:
        form = await read_uploads(
            request, field_name="file", max_file_bytes=settings.max_upload_bytes
        )
        params = {**form.fields, **request.query_params}
        token, fmt = params.get("token", "both"), params.get("format", "json")
        if token not in ("cls", "dist", "both") or fmt not in ("json", "png"):
            raise ApiError(422, "token must be cls, dist or both; format json or png")
        if loaded.format == "onnx":
            raise ApiError(422, "explain needs a PyTorch model; this server runs an ONNX file")
        if token == "dist" and not loaded.config.distilled:
            raise ApiError(422, "this model has no distillation token")
        img, pixels = await to_tensor(form.files[0][1])

        def run() -> dict[str, np.ndarray]:
            ref = clf.loaded.model  # the fp32 eager model, whatever precision serves
            maps = rollout_maps(ref, pixels[None].to(next(ref.parameters()).device), token)
            return {k: v[0].numpy() for k, v in maps.items()}

        loop = asyncio.get_running_loop()
        maps = await loop.run_in_executor(pools["model"], run)
        body = await loop.run_in_executor(pools["decode"], explain_payload, img, cfg, maps, fmt)
        if fmt == "png":
            return Response(body, media_type="image/png")
        return JSONResponse(body)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


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
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
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
    """Serve ``model`` until interrupted (blocking)."""
    settings = settings or ServeSettings()
    uvicorn = require_server()
    app = create_app(model, settings)
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=log_level, timeout_keep_alive=5
    )
