"""The standard clients against a real server (uvicorn on a free loopback port): Hugging Face's
InferenceClient, Triton's HTTP client (binary and JSON), the KServe SDK (v1 and v2),
Prometheus' own text parser; every route's limits, and extra fields on every protocol."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from deit.checkpoints import LoadedModel, load_model

from .conftest import SAMPLE_IMAGES
from .deploy_helpers import png_claiming, save_tiny_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from deit.deploy.serve.app import ServerThread, ServeSettings, create_app  # noqa: E402

SETTINGS = ServeSettings(max_upload_mb=1, max_files=4, max_wait_ms=20, busy_wait_s=0.2)
NAME = "tiny"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(save_tiny_model(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def running(loaded: LoadedModel) -> Iterator[ServerThread]:
    settings = ServeSettings(**{**SETTINGS.__dict__, "name": NAME})
    with ServerThread(create_app(loaded, settings), log_level="info") as server:
        yield server


@pytest.fixture(scope="module")
def url(running: ServerThread) -> str:
    return running.url


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [(SAMPLE_IMAGES / name).read_bytes() for name in ("chelsea.png", "coffee.png")]


def reference(url: str, image: bytes) -> dict[str, Any]:
    """Our own multipart route's answer for one image (all 10 classes)."""
    r = httpx.post(f"{url}/v1/classify", files={"file": ("a.png", image)}, params={"top_k": 10})
    assert r.status_code == 200, r.text
    return r.json()


def text(value: str | bytes) -> str:
    """A BYTES element as the client gives it back (bytes, or str from a JSON answer)."""
    return value.decode() if isinstance(value, bytes) else value


def probabilities(answer: dict[str, Any]) -> np.ndarray:
    probs = np.zeros(10, dtype=np.float32)
    for p in answer["predictions"]:
        probs[p["index"]] = p["score"]
    return probs


def test_huggingface_inference_client(url: str, images: list[bytes], caplog: Any) -> None:
    hub = pytest.importorskip("huggingface_hub")
    caplog.set_level(logging.DEBUG)
    secret = "hf_do_not_log_this_token_123"
    client = hub.InferenceClient(model=url, token=secret, timeout=30)
    expected = reference(url, images[0])
    out = client.image_classification(images[0])  # raw bytes, no Content-Type
    assert [o.label for o in out] == [p["label"] for p in expected["predictions"][:5]]
    assert out[0].score == pytest.approx(expected["predictions"][0]["score"], abs=1e-6)
    assert out[0]["ood"]["method"] == "msp-uncalibrated"  # the OOD verdict reaches the client
    three = client.image_classification(images[0], top_k=3, function_to_apply="none")
    assert len(three) == 3 and three[0].score > 1  # logits, not probabilities
    assert len(client.image_classification(images[0], top_k=50)) == 10  # capped
    assert secret not in caplog.text  # nor in uvicorn's access log
    assert "POST / HTTP/1.1" in caplog.text  # the access log was on


def test_huggingface_json_and_errors(url: str, images: list[bytes]) -> None:
    body = {"inputs": base64.b64encode(images[1]).decode(), "parameters": {"top_k": 2}}
    r = httpx.post(url + "/", json=body, headers={"authorization": "Bearer x"})
    assert r.status_code == 200 and [set(e) for e in r.json()] == [{"label", "score", "ood"}] * 2
    bad = {
        "bad base64": ({"inputs": "%%%"}, 400),
        "bad function": ({"inputs": body["inputs"], "parameters": {"function_to_apply": "x"}}, 422),
        "not an image": ({"inputs": base64.b64encode(b"hello").decode()}, 415),
    }
    for name, (payload, status) in bad.items():
        r = httpx.post(url + "/", json=payload)
        assert r.status_code == status and r.json()["error"], name
    r = httpx.post(url + "/", content=b"\xff" * (2 << 20), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]


def test_tritonclient_binary_json_classification_and_pixels(
    url: str, images: list[bytes], loaded: LoadedModel
) -> None:
    triton = pytest.importorskip("tritonclient.http")
    client = triton.InferenceServerClient(url=url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    assert [i["name"] for i in meta["inputs"]] == ["image", "pixels"]
    assert meta["inputs"][1]["shape"] == [-1, 3, 32, 32] and len(meta["parameters"]["labels"]) == 10
    expected = np.stack([probabilities(reference(url, im)) for im in images])

    for binary in (True, False):
        data = images if binary else [base64.b64encode(im) for im in images]
        image = triton.InferInput("image", [2], "BYTES")
        image.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
        result = client.infer(NAME, [image])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
        assert result.as_numpy("logits").shape == (2, 10)
        assert [text(m) for m in result.as_numpy("ood_method")] == ["msp-uncalibrated"] * 2

    image = triton.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_))
    wanted = [triton.InferRequestedOutput("probabilities", class_count=3)]
    top = client.infer(NAME, [image], outputs=wanted).as_numpy("probabilities")
    score, index, label = text(top[0, 0]).split(":")
    assert int(index) == int(expected[0].argmax()) and label == f"class-{index}"
    assert float(score) == pytest.approx(expected[0].max(), abs=1e-5) and top.shape == (2, 3)

    from deit.images import load_image
    from deit.transforms import preprocess_image

    x = preprocess_image(load_image(images[0]), loaded.preprocess)[None].numpy()
    pixels = triton.InferInput("pixels", list(x.shape), "FP32")
    pixels.set_data_from_numpy(x)  # binary FP32
    out = client.infer(NAME, [pixels]).as_numpy("probabilities")
    np.testing.assert_allclose(out[0], expected[0], atol=1e-5)

    wrong = triton.InferInput("pixels", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(Exception, match="pixels must have shape"):
        client.infer(NAME, [wrong])
    with pytest.raises(Exception, match="unknown model"):
        client.infer("other", [image])


def test_kserve_rest_client_v1_and_v2(url: str, images: list[bytes]) -> None:
    kserve = pytest.importorskip("kserve")
    b64 = base64.b64encode(images[0]).decode()
    expected = reference(url, images[0])

    async def scenario() -> tuple[Any, ...]:
        v1 = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v1"))
        v2 = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2"))
        try:
            live = await v1.is_server_live(url)
            ready1 = await v1.is_model_ready(url, NAME)
            one = await v1.infer(url, {"instances": [{"image_bytes": {"b64": b64}}, b64]}, NAME)
            ready2 = await v2.is_server_ready(url) and await v2.is_model_ready(url, NAME)
            request = kserve.InferRequest(
                model_name=NAME,
                infer_inputs=[kserve.InferInput("image", [1], "BYTES", [b64])],
            )
            two = await v2.infer(url, request, NAME)
        finally:
            await v1.close()
            await v2.close()
        return live, ready1, one, ready2, two

    live, ready1, one, ready2, two = asyncio.run(scenario())
    assert live and ready1 and ready2
    first, second = one["predictions"]
    for got in (first, second):  # batched with other images: equal up to float rounding
        want = expected["predictions"][:5]
        assert [p["index"] for p in got["predictions"]] == [p["index"] for p in want]
        scores = [p["score"] for p in got["predictions"]]
        assert scores == pytest.approx([p["score"] for p in want], abs=1e-5)
    assert first["ood"]["method"] == "msp-uncalibrated"
    outputs = {o.name: o.as_numpy() for o in two.outputs}
    np.testing.assert_allclose(outputs["probabilities"][0], probabilities(expected), atol=1e-5)


def test_prometheus_metrics(url: str, images: list[bytes]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(url + "/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    before = samples()
    for _ in range(3):
        httpx.post(url + "/", content=images[0])
    httpx.post(url + "/", content=b"\xff" * (2 << 20))  # 413
    after = samples()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("deit_requests_total", route="/", method="POST", status="200") == 3
    assert delta("deit_rejections_total", route="/", status="413") == 1
    assert delta("deit_request_duration_seconds_count", route="/") == 4
    assert delta("deit_images_classified_total") >= 3
    assert delta("deit_batch_size_count") >= 1 and delta("deit_model_duration_seconds_count") >= 1
    assert delta("deit_queue_duration_seconds_count") >= 3
    assert all("hf_" not in name for name, _ in after)  # no raw paths or headers as labels


def test_every_route_answers_413_and_503_with_retry_after(
    running: ServerThread, images: list[bytes]
) -> None:
    url, core = running.url, running.server.config.app.state.core
    b64 = base64.b64encode(images[0]).decode()
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    routes: dict[str, dict[str, Any]] = {
        "/": {"content": images[0]},
        f"/v2/models/{NAME}/infer": {"json": v2},
        f"/v1/models/{NAME}:predict": {"json": {"instances": [b64]}},
        "/v1/classify": {"files": {"file": ("a.png", images[0])}},
        "/v1/explain": {"files": {"file": ("a.png", images[0])}},
    }
    for path, kwargs in routes.items():
        assert httpx.post(url + path, timeout=30, **kwargs).status_code == 200, path
    huge = png_claiming(1500, 1500)  # 2.25 M pixels: over the request limit set below
    core.settings = ServeSettings(**{**SETTINGS.__dict__, "max_request_pixels": 1_000_000})
    try:
        for path, kwargs in _with_image(routes, huge).items():
            r = httpx.post(url + path, timeout=30, **kwargs)
            assert r.status_code == 413 and "pixels" in r.json()["error"], (path, r.text)
    finally:
        core.settings = running.server.config.app.state.settings
    capacity = core.upload_budget.capacity
    core.upload_budget.used += capacity  # as if other requests held every upload byte
    try:
        for path, kwargs in routes.items():
            r = httpx.post(url + path, timeout=30, **kwargs)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", (path, r.text)
            assert "server busy" in r.json()["error"]
    finally:
        core.upload_budget.used -= capacity


def _with_image(routes: dict[str, dict[str, Any]], image: bytes) -> dict[str, dict[str, Any]]:
    b64 = base64.b64encode(image).decode()
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    return {
        "/": {"content": image},
        f"/v2/models/{NAME}/infer": {"json": v2},
        f"/v1/models/{NAME}:predict": {"json": {"instances": [b64]}},
        "/v1/classify": {"files": {"file": ("a.png", image)}},
        "/v1/explain": {"files": {"file": ("a.png", image)}},
    }


def test_extra_fields_reach_the_json_routes(url: str, images: list[bytes]) -> None:
    one = reference(url, images[0])
    assert set(one["ood"]) == {"score", "unusual", "method"}
    files = [("files", ("a.png", images[0])), ("files", ("b.txt", b"no"))]
    good, bad = httpx.post(url + "/v1/classify/batch", files=files).json()["results"]
    assert good["ood"] == one["ood"] and "ood" not in bad and bad["status"] == 415


def test_v2_requests_that_are_wrong(url: str, images: list[bytes]) -> None:
    infer = f"{url}/v2/models/{NAME}/infer"
    b64 = base64.b64encode(images[0]).decode()
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}
    cases: dict[str, tuple[dict[str, Any], int, str]] = {
        "no inputs": ({"inputs": []}, 400, "non-empty"),
        "shape mismatch": ({"inputs": [{**image, "shape": [2]}]}, 400, "1 elements"),
        "unknown input": ({"inputs": [{**image, "name": "x"}]}, 400, "unknown input"),
        "unknown output": ({"inputs": [image], "outputs": [{"name": "x"}]}, 400, "unknown output"),
        "too many": ({"inputs": [{**image, "shape": [5], "data": [b64] * 5}]}, 413, "at most 4"),
        "bad image": (
            {"inputs": [{**image, "data": [base64.b64encode(b"hi").decode()]}]},
            415,
            "image 0",
        ),
    }
    for name, (body, status, text) in cases.items():
        r = httpx.post(infer, json=body)
        assert r.status_code == status and text in r.json()["error"], (name, r.text)
    server = httpx.get(url + "/v2").json()
    assert server["name"] == "deit" and "classification" in server["extensions"]
    assert httpx.get(f"{url}/v2/models/other").status_code == 404
