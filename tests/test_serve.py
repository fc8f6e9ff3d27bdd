"""The HTTP server, run for real by uvicorn on a free loopback port, and its batcher."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from deit.checkpoints import load_model
from deit.deploy.serve.batching import DynamicBatcher
from deit.errors import BusyError

from .deploy_helpers import png_claiming, save_tiny_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

from deit.deploy.serve.app import ServerThread, ServeSettings, create_app  # noqa: E402

SETTINGS = ServeSettings(max_upload_mb=1, max_pixels=4_000_000, max_files=4, max_wait_ms=50)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    loaded = load_model(save_tiny_model(tmp_path_factory.mktemp("model")))
    with ServerThread(create_app(loaded, SETTINGS)) as running:
        assert running.url.startswith("http://127.0.0.1:")
        yield running.url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def photo() -> bytes:
    from deit.deploy.export import sample_images

    return next(p for p in sample_images() if p.suffix == ".jpg").read_bytes()


def test_health_and_model_info(client: httpx.Client) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and "largest_batch" in health["batching"]
    info = client.get("/v1/model").json()
    assert info["num_labels"] == 10 and info["labels"][3] == "class-3"
    assert info["config"]["img_size"] == 32 and info["distilled"] is True
    assert info["preprocess"]["resize_mode"] == "squash"
    assert info["limits"]["max_files"] == 4 and info["batching"]["max_batch"] == 32
    assert info["precision"] == "fp32" and info["fast_decode"] is False


def test_classify_one(client: httpx.Client, photo: bytes) -> None:
    r = client.post("/v1/classify", files={"file": ("cat.jpg", photo)}, params={"top_k": 3})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and preds[0]["score"] >= preds[1]["score"] >= preds[2]["score"]
    assert preds[0]["label"] == f"class-{preds[0]['index']}"
    ood = r.json()["ood"]  # a published-style model without statistics: uncalibrated MSP
    assert ood["method"] == "msp-uncalibrated"
    assert ood["score"] == pytest.approx(1 - preds[0]["score"])
    r = client.post("/v1/classify", files={"file": ("cat.jpg", photo)}, data={"top_k": "20"})
    assert len(r.json()["predictions"]) == 10  # capped at the number of classes


def test_classify_batch_reports_each_file(client: httpx.Client, photo: bytes) -> None:
    files = [
        ("files", ("a.jpg", photo)),
        ("files", ("b.txt", b"text")),
        ("files", ("c.jpg", photo)),
    ]
    r = client.post("/v1/classify/batch", files=files)
    assert r.status_code == 200, r.text
    a, b, c = r.json()["results"]
    assert a["predictions"] == c["predictions"] and len(a["predictions"]) == 5
    assert b == {"filename": "b.txt", "error": "not an image file", "status": 415}
    too_many = [("files", (f"{i}.jpg", photo)) for i in range(5)]
    assert client.post("/v1/classify/batch", files=too_many).status_code == 413


def test_explain_json_and_png(client: httpx.Client, photo: bytes) -> None:
    r = client.post("/v1/explain", files={"file": ("cat.jpg", photo)})
    body = r.json()
    assert r.status_code == 200 and body["grid"] == [4, 4] and body["tokens"] == ["cls", "dist"]
    assert body["maps"]["cls"] != body["maps"]["dist"] and body["view"].startswith("data:image/png")
    r = client.post(
        "/v1/explain", files={"file": ("cat.jpg", photo)}, params={"format": "png", "token": "dist"}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG")
    r = client.post("/v1/explain", files={"file": ("cat.jpg", photo)}, params={"token": "x"})
    assert r.status_code == 422


def _chunked_multipart(size: int) -> Iterator[bytes]:
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
    for _ in range(size // 65536):
        yield os.urandom(65536)
    yield b"\r\n--b--\r\n"


MULTIPART_B = {"content-type": "multipart/form-data; boundary=b"}
BAD_REQUESTS: dict[str, tuple[Callable[[bytes], dict[str, Any]], int]] = {
    "too many bytes": (lambda _: {"files": {"file": ("a.jpg", b"\xff" * (3 << 20))}}, 413),
    "too many bytes, no length": (
        lambda _: {"content": _chunked_multipart(2 << 20), "headers": MULTIPART_B},
        413,
    ),
    "too many pixels": (lambda _: {"files": {"file": ("a.png", png_claiming(5000, 5000))}}, 413),
    "not multipart": (lambda p: {"content": p, "headers": {"content-type": "image/jpeg"}}, 415),
    "no file field": (lambda p: {"files": {"image": ("a.jpg", p)}}, 422),
    "not an image": (lambda _: {"files": {"file": ("a.jpg", b"hello")}}, 415),
    "truncated": (lambda p: {"files": {"file": ("a.jpg", p[: len(p) // 3])}}, 422),
    "empty": (lambda _: {"files": {"file": ("a.jpg", b"")}}, 400),
    "bad top_k": (lambda p: {"files": {"file": ("a.jpg", p)}, "params": {"top_k": "0"}}, 422),
    "malformed body": (lambda _: {"content": b"--b\r\nbroken", "headers": MULTIPART_B}, 422),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_and_the_server_keeps_serving(
    client: httpx.Client, photo: bytes, name: str
) -> None:
    make_kwargs, status = BAD_REQUESTS[name]
    r = client.post("/v1/classify", **make_kwargs(photo))
    assert r.status_code == status, (name, r.text)
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    ok = client.post("/v1/classify", files={"file": ("cat.jpg", photo)})
    assert ok.status_code == 200


def test_concurrent_requests_are_batched(server: str, photo: bytes) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            files = {"file": ("cat.jpg", photo)}
            responses = await asyncio.gather(
                *(c.post("/v1/classify", files=files) for _ in range(12))
            )
            return [r.status_code for r in responses]

    assert set(asyncio.run(burst())) == {200}
    stats = httpx.get(f"{server}/healthz").json()["batching"]
    assert stats["largest_batch"] > 1, stats
    assert stats["requests"] >= 12 and stats["batches"] < stats["requests"]


def test_batcher_groups_resolves_and_survives_failures() -> None:
    calls: list[int] = []

    def infer(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        if (x < 0).any():
            raise RuntimeError("bad batch")
        return x.flatten(1) * 2

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(infer, pool, max_batch=4, max_wait_ms=100, max_queue=8)
            with pytest.raises(BusyError):
                await batcher.submit(torch.zeros(1))  # not started
            batcher.start()
            rows = await asyncio.gather(
                *(batcher.submit(torch.tensor([float(i)])) for i in range(6))
            )
            assert [float(r) for r in rows] == [2.0 * i for i in range(6)]
            assert calls == [4, 2] and batcher.stats.largest_batch == 4
            with pytest.raises(RuntimeError, match="bad batch"):
                await batcher.submit(torch.tensor([-1.0]))
            assert float(await batcher.submit(torch.tensor([3.0]))) == 6.0  # still working
            # 12 submissions queued before the worker wakes: the queue holds 8, 4 are refused.
            many = [asyncio.ensure_future(batcher.submit(torch.zeros(1))) for _ in range(12)]
            results = await asyncio.gather(*many, return_exceptions=True)
            assert sum(isinstance(r, BusyError) for r in results) == 4
            await batcher.stop()

    asyncio.run(scenario())


def test_binds_loopback_by_default() -> None:
    assert ServeSettings().host == "127.0.0.1"


def test_out_of_range_port_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deit.cli import main

    model = str(save_tiny_model(tmp_path))
    assert main(["serve", "-m", model, "--port", "99999"]) == 2
    assert "--port must be 0..65535 and --max-wait-ms >= 0, not 99999" in capsys.readouterr().err
    assert main(["serve", "-m", model, "--max-wait-ms", "-1"]) == 2
    assert "not 8000 and -1" in capsys.readouterr().err


def test_app_from_a_bare_model(tmp_path: Path, photo: bytes) -> None:
    model = load_model(save_tiny_model(tmp_path)).model  # numbered labels, default preprocessing
    with ServerThread(create_app(model, SETTINGS)) as running:
        r = httpx.post(f"{running.url}/v1/classify", files={"file": ("a.jpg", photo)}, timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("class ")


def test_the_serve_command_end_to_end(tmp_path: Path, photo: bytes) -> None:
    """`deit serve` as a user starts it: a real process, a real port, Ctrl-C to stop."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    model = save_tiny_model(tmp_path)
    bad = subprocess.run(
        [sys.executable, "-m", "deit", "serve", "-m", str(model), "--max-batch", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--max-batch must be positive" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["serve", "-m", str(model), "--port", str(port), "--precision", "bf16", "--fast-decode"]
    cmd = [sys.executable, "-m", "deit", *argv]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "server did not come up in 120 s"
                time.sleep(0.5)
        r = httpx.post(f"{url}/v1/classify", files={"file": ("a.jpg", photo)}, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("class-")
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        assert info["precision"] == "bf16" and info["fast_decode"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert f"on http://127.0.0.1:{port}/" in err


def test_page_names_and_samples(tmp_path: Path) -> None:
    """Names: Hub id as is, a file by its name, a folder with its parent, the embedded model
    by its name; protocol names URL-safe. Samples: the model's own data first, then bundled
    photos whose class the model has, else none."""
    import dataclasses

    from PIL import Image

    from deit.deploy.serve.page import check_model_name, display_name, model_name, page_samples
    from deit.errors import UsageError

    folder = save_tiny_model(tmp_path / "run" / "model")
    weights = tmp_path / "deit_tiny.pth"
    weights.write_bytes(b"")
    assert display_name(str(folder)) == "run/model" and model_name(str(folder)) == "run-model"
    assert display_name(str(weights)) == "deit_tiny.pth" and model_name(str(weights)) == "deit_tiny"
    assert display_name("facebook/deit-tiny-patch16-224") == "facebook/deit-tiny-patch16-224"
    assert model_name("facebook/deit-tiny-patch16-224") == "facebook-deit-tiny-patch16-224"
    assert model_name(str(load_model("fashion-mnist").source)) == "fashion-mnist"
    with pytest.raises(UsageError, match="letters, digits"):
        check_model_name("../x")

    loaded = load_model(folder)
    assert page_samples(loaded) == []  # numbered classes: no photo fits
    assert [s.title for s in page_samples(load_model("fashion-mnist"))] == [
        "Ankle boot",
        "Pullover",
    ]
    imagenet = dataclasses.replace(loaded, labels=["tabby, tabby cat", "espresso", "x"])
    assert [s.title for s in page_samples(imagenet)] == ["Cat", "Coffee"]
    data = tmp_path / "data"
    for label in ("class-1", "class-7", "not-a-label"):
        (data / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(data / label / "a.png")
    trained = dataclasses.replace(
        loaded, metadata={"train_config": {"data": {"path": str(data), "val_path": ""}}}
    )
    own = page_samples(trained)
    assert [(s.title, s.path) for s in own] == [
        ("class-1", data / "class-1" / "a.png"),
        ("class-7", data / "class-7" / "a.png"),
    ]
