"""Thin adapters for the protocols standard clients speak, over the one inference core.

- **Hugging Face** (``huggingface_hub.InferenceClient(model=URL).image_classification``):
  ``POST /`` with the raw image bytes (any Content-Type or none: the image is sniffed) or
  JSON ``{"inputs": "<base64>", "parameters": {"top_k", "function_to_apply"}}``; the answer
  is a list of ``{"label", "score"}``, best first. An ``Authorization: Bearer`` header is
  accepted and never read or logged.
- **Open Inference Protocol v2** (KServe, Triton, Seldon MLServer clients): server and model
  metadata, health, and ``POST /v2/models/{name}/infer`` with a BYTES ``image`` input (whole
  encoded files; base64 strings in JSON, raw in the binary-data extension) or an FP32
  ``pixels`` input ``[N, C, H, W]``; outputs ``probabilities``, ``logits``, each image's
  extra fields, and the classification extension (``"score:index:label"``).
- **KServe v1**: ``GET /v1/models/{name}`` and ``POST /v1/models/{name}:predict`` with
  ``instances`` (base64 strings, ``{"b64": ...}``, ``{"image_bytes": {"b64": ...}}`` or
  ``{"data": ...}``) answered with ``predictions``.

Every route reads its body under the core's budgets and limits (413, 503 with
``Retry-After``), and every error is ``{"error": ...}``.

(No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations.)
"""

import base64
import binascii
import json
import math
import struct
from typing import Any

import numpy as np

from deit.deploy.serve.core import (
    SCORE_FUNCTIONS,
    Classified,
    InferenceCore,
    scores,
    top_predictions,
)
from deit.deploy.serve.uploads import FORM_OVERHEAD, parse_top_k, read_body
from deit.errors import ApiError, DeiTError

V2_BINARY_HEADER = "Inference-Header-Content-Length"
V2_EXTENSIONS = ["classification", "binary_tensor_data"]


def json_limit(core: InferenceCore, files: int) -> int:
    """The largest JSON body holding ``files`` images of the largest size, base64-encoded."""
    return files * 4 * math.ceil(core.settings.max_upload_bytes / 3) + FORM_OVERHEAD


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object from a request body (400 otherwise)."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the JSON body must be an object, not {type(obj).__name__}")
    return obj


def b64_image(value: Any, where: str) -> bytes:
    """The bytes of a base64 string (a ``data:`` URL's prefix is dropped); 400 otherwise."""
    if isinstance(value, dict) and "b64" in value:
        value = value["b64"]
    if not isinstance(value, str):
        raise ApiError(400, f"{where}: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: not valid base64") from None
    if not data:
        raise ApiError(400, f"{where}: empty image")
    return data


def only_answers(outcomes: list[Classified | DeiTError], what: str) -> list[Classified]:
    """The rows of a tensor request, where one bad image fails the request (naming it)."""
    for i, out in enumerate(outcomes):
        if isinstance(out, DeiTError):
            raise ApiError(out.http_status, f"{what} {i}: {out}")
    return [out for out in outcomes if isinstance(out, Classified)]


def _check_name(core_name: str, name: str) -> None:
    if name != core_name:
        raise ApiError(404, f"unknown model {name!r}; this server serves {core_name!r}")


# --------------------------------------------------------------------------- Hugging Face


def add_huggingface_routes(app: Any, core: InferenceCore) -> None:
    """``POST /``: the Hugging Face inference convention (see the module docstring)."""
    from fastapi import Request

    @app.post("/", include_in_schema=True, summary="Hugging Face image classification")
    async def hf_classify(request: Request) -> list[dict[str, Any]]:
        ctype = request.headers.get("content-type", "").lower()
        labels, params = core.labels, dict(request.query_params)
        async with core.budgets() as (held_bytes, held_px):
            if ctype.startswith("application/json"):
                body = parse_json(
                    await read_body(request, limit=json_limit(core, 1), budget=held_bytes)
                )
                data = b64_image(body.get("inputs"), "inputs")
                extra = body.get("parameters") or {}
                if not isinstance(extra, dict):
                    raise ApiError(400, "parameters must be an object")
                params.update({k: v for k, v in extra.items() if v is not None})
            else:  # raw bytes, whatever the Content-Type says: load_image sniffs them
                limit = core.settings.max_upload_bytes
                data = await read_body(request, limit=limit, budget=held_bytes)
            k = parse_top_k(params.get("top_k"), core.settings.default_top_k, len(labels))
            function = str(params.get("function_to_apply") or "")
            function = function or ("softmax" if len(labels) > 1 else "sigmoid")
            if function not in SCORE_FUNCTIONS:
                raise ApiError(
                    422, f"function_to_apply must be one of {', '.join(SCORE_FUNCTIONS)}"
                )
            [out] = await core.classify_files([("inputs", data)], held_px)
        if isinstance(out, DeiTError):
            raise out
        return [
            {"label": p["label"], "score": p["score"], **out.extras}
            for p in top_predictions(out, labels, k, function)
        ]


# --------------------------------------------------------------------------- v2 and v1


def _elements(shape: Any, where: str) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ApiError(400, f"{where}: shape must be a list of non-negative integers")
    return math.prod(shape)


def _split_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    """BYTES elements of the binary-data extension: each a 4-byte little-endian length, then
    that many bytes."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ApiError(400, f"{where}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise ApiError(400, f"{where}: BYTES element runs past the binary data")
        items.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if len(items) != count:
        raise ApiError(400, f"{where}: {len(items)} BYTES elements for a shape of {count}")
    return items


def _flat(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flat(item)]
    return [data]


class V2Request:
    """The inputs and requested outputs of one ``/infer`` request, read from JSON or from the
    binary-data extension (a JSON header of ``header_length`` bytes, then the tensors' raw
    bytes in the order of the inputs that declare ``binary_data_size``)."""

    def __init__(self, body: bytes, header_length: str | None, max_files: int) -> None:
        if header_length is not None:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise ApiError(400, f"bad {V2_BINARY_HEADER}: {header_length!r}")
            head, binary = body[: int(header_length)], body[int(header_length) :]
        else:
            head, binary = body, b""
        self.json = parse_json(head)
        self.max_files = max_files
        inputs = self.json.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise ApiError(400, "inputs must be a non-empty list")
        self.images: list[bytes] | None = None
        self.pixels: np.ndarray | None = None
        offset = 0
        for tensor in inputs:
            offset = self._read_input(tensor, binary, offset)
        if offset != len(binary):
            raise ApiError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
        if (self.images is None) == (self.pixels is None):
            raise ApiError(400, "send exactly one input: image (BYTES) or pixels (FP32)")
        outputs = self.json.get("outputs")
        if outputs is not None and not isinstance(outputs, list):
            raise ApiError(400, "outputs must be a list")
        self.outputs: list[dict[str, Any]] | None = outputs

    def _read_input(self, tensor: Any, binary: bytes, offset: int) -> int:
        if not isinstance(tensor, dict):
            raise ApiError(400, "each input must be an object")
        name, dtype = tensor.get("name"), tensor.get("datatype")
        where = f"input {name!r}"
        count = _elements(tensor.get("shape"), where)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ApiError(400, f"{where}: binary_data_size {size!r} past the body")
            raw, offset = binary[offset : offset + size], offset + size
        if name == "image" and dtype == "BYTES":
            if count > self.max_files:
                raise ApiError(413, f"at most {self.max_files} images per request")
            if raw is not None:
                self.images = _split_bytes(raw, count, where)
            else:
                items = _flat(tensor.get("data"))
                if len(items) != count:
                    raise ApiError(400, f"{where}: {len(items)} elements for a shape of {count}")
                self.images = [b64_image(x, f"{where} element {i}") for i, x in enumerate(items)]
        elif name == "pixels" and dtype == "FP32":
            shape = tensor["shape"]
            if len(shape) != 4 or shape[0] > self.max_files:
                raise ApiError(400, f"{where}: shape must be [N, C, H, W], N <= {self.max_files}")
            try:
                if raw is not None:
                    flat = np.frombuffer(raw, dtype="<f4")
                else:
                    flat = np.asarray(_flat(tensor.get("data")), dtype=np.float32)
            except (TypeError, ValueError):
                raise ApiError(400, f"{where}: data must be numbers") from None
            if flat.size != count:
                raise ApiError(400, f"{where}: {flat.size} values for a shape of {shape}")
            self.pixels = flat.reshape(shape)
        else:
            raise ApiError(
                400, f"unknown input {name!r} ({dtype}): send image (BYTES) or pixels (FP32)"
            )
        return offset


def v2_outputs(
    rows: list[Classified], labels: list[str], wanted: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The response tensors: probabilities, logits and the extra fields, or those asked for
    (with the classification extension where an output asks for it)."""
    logits = np.stack([r.logits.float().numpy() for r in rows])
    probs = np.stack([scores(r.logits).numpy() for r in rows])
    n = len(rows)
    tensors: dict[str, dict[str, Any]] = {
        "probabilities": {"datatype": "FP32", "shape": [n, len(labels)], "values": probs},
        "logits": {"datatype": "FP32", "shape": [n, len(labels)], "values": logits},
        **_extra_tensors(rows),
    }
    out = []
    for request in wanted or [{"name": name} for name in tensors]:
        name = request.get("name") if isinstance(request, dict) else None
        if name not in tensors:
            raise ApiError(400, f"unknown output {name!r}; outputs: {', '.join(tensors)}")
        t = tensors[name]
        k = (request.get("parameters") or {}).get("classification")
        if k is not None:
            if not isinstance(k, int) or k < 1 or t["datatype"] != "FP32" or len(t["shape"]) != 2:
                raise ApiError(400, f"{name}: classification must be a positive integer")
            out.append(_classification(name, t["values"], labels, min(k, len(labels))))
        else:
            values = np.asarray(t["values"])
            data = values.reshape(-1).tolist()
            out.append({"name": name, "datatype": t["datatype"], "shape": t["shape"], "data": data})
    return out


def _classification(name: str, values: np.ndarray, labels: list[str], k: int) -> dict[str, Any]:
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    data = [f"{values[r, i]:f}:{i}:{labels[i]}" for r in range(len(values)) for i in order[r]]
    return {"name": name, "datatype": "BYTES", "shape": [len(values), k], "data": data}


def _flatten(extras: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in extras.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}_"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _extra_tensors(rows: list[Classified]) -> dict[str, dict[str, Any]]:
    """Each image's extra fields as tensors of shape [N] (nested keys joined with ``_``):
    BOOL, FP64 for numbers, BYTES for anything else (as JSON text unless a string)."""
    flat = [_flatten(r.extras) for r in rows]
    names = list(dict.fromkeys(k for f in flat for k in f))
    tensors = {}
    for name in names:
        values = [f.get(name) for f in flat]
        if all(isinstance(v, bool) for v in values):
            dtype, data = "BOOL", values
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            dtype, data = "FP64", [float(v) for v in values if v is not None]
        else:
            dtype = "BYTES"
            data = [v if isinstance(v, str) else json.dumps(v) for v in values]
        tensors[name] = {"datatype": dtype, "shape": [len(rows)], "values": data}
    return tensors


def add_v2_routes(app: Any, core: InferenceCore, name: str, version: str) -> None:
    """The Open Inference Protocol v2 routes (see the module docstring)."""
    from fastapi import Request
    from fastapi.responses import Response

    channels, height, width = core.input_shape
    metadata = {
        "name": name,
        "versions": ["1"],
        "platform": f"deit-{core.clf.engine}".replace(" ", "-"),
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "FP32", "shape": [-1, channels, height, width]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(core.labels)]},
            {"name": "logits", "datatype": "FP32", "shape": [-1, len(core.labels)]},
        ],
        "parameters": {"labels": core.labels},
    }

    @app.get("/v2")
    async def v2_server() -> dict[str, Any]:
        return {"name": "deit", "version": version, "extensions": V2_EXTENSIONS}

    @app.get("/v2/health/live")
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/models/{model}")
    async def v2_metadata(model: str) -> dict[str, Any]:
        _check_name(name, model)
        return metadata

    @app.get("/v2/models/{model}/ready")
    async def v2_model_ready(model: str) -> dict[str, Any]:
        _check_name(name, model)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{model}/infer")
    async def v2_infer(model: str, request: Request) -> Response:
        _check_name(name, model)
        files = core.settings.max_files
        async with core.budgets() as (held_bytes, held_px):
            body = await read_body(request, limit=json_limit(core, files) * 2, budget=held_bytes)
            req = V2Request(body, request.headers.get(V2_BINARY_HEADER), files)
            if req.images is not None:
                files_in = [(f"image {i}", data) for i, data in enumerate(req.images)]
                rows = only_answers(await core.classify_files(files_in, held_px), "image")
            else:
                assert req.pixels is not None
                rows = await core.classify_pixels(req.pixels, held_px)
        answer = {
            "model_name": name,
            "model_version": "1",
            "id": str(req.json.get("id", "")),
            "outputs": v2_outputs(rows, core.labels, req.outputs),
        }
        return Response(json.dumps(answer).encode(), media_type="application/json")


def add_kserve_v1_routes(app: Any, core: InferenceCore, name: str) -> None:
    """KServe v1: model readiness and ``:predict`` (see the module docstring)."""
    from fastapi import Request

    @app.get("/v1/models/{model}")
    async def v1_model(model: str) -> dict[str, Any]:
        _check_name(name, model)
        return {"name": name, "ready": True}

    @app.post("/v1/models/{model}:predict")
    async def v1_predict(model: str, request: Request) -> dict[str, Any]:
        _check_name(name, model)
        files = core.settings.max_files
        async with core.budgets() as (held_bytes, held_px):
            body = parse_json(
                await read_body(request, limit=json_limit(core, files), budget=held_bytes)
            )
            instances = body.get("instances")
            if not isinstance(instances, list) or not instances:
                raise ApiError(400, "instances must be a non-empty list")
            if len(instances) > files:
                raise ApiError(413, f"at most {files} instances per request")
            images = [_v1_image(x, i) for i, x in enumerate(instances)]
            params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
            k = parse_top_k(
                (params or {}).get("top_k", request.query_params.get("top_k")),
                core.settings.default_top_k,
                len(core.labels),
            )
            named = [(f"instance {i}", data) for i, data in enumerate(images)]
            rows = only_answers(await core.classify_files(named, held_px), "instance")
        return {
            "predictions": [
                {"predictions": top_predictions(r, core.labels, k), **r.extras} for r in rows
            ]
        }


def _v1_image(instance: Any, i: int) -> bytes:
    if isinstance(instance, dict):
        if "image_bytes" in instance:
            instance = instance["image_bytes"]
        elif "data" in instance:
            instance = instance["data"]
    return b64_image(instance, f"instance {i}")
