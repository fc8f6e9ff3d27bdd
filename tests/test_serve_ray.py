"""`deit serve --engine ray --replicas 2` on a private local Ray cluster (loopback only): both
replicas answer concurrent requests, and SIGTERM leaves none of the processes it started."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from .conftest import SAMPLE_IMAGES, free_port
from .deploy_helpers import save_tiny_model

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")


@pytest.mark.slow
def test_two_ray_serve_replicas_answer_and_sigterm_cleans_up(tmp_path: Path) -> None:
    model, port = save_tiny_model(tmp_path / "model"), free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["serve", "-m", str(model), "--engine", "ray", "--replicas", "2", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deit", *argv], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180  # a Ray cluster on a busy 2-core machine is slow
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "Ray Serve did not come up in 180 s"
            time.sleep(1)
        image = (SAMPLE_IMAGES / "chelsea.png").read_bytes()

        async def load() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                files = {"file": ("a.png", image)}
                return await asyncio.gather(
                    *(client.post("/v1/classify", files=files) for _ in range(48))
                )

        served_by: Counter[str] = Counter()
        while len(served_by) < 2 and time.monotonic() < deadline + 30:  # a replica may lag
            answers = asyncio.run(load())
            assert {r.status_code for r in answers} == {200}
            served_by = Counter(r.headers["x-served-by"] for r in answers)
        assert len(served_by) == 2, served_by  # one burst of 48 answered by both replicas
        assert (
            httpx.post(f"{url}/", content=image, timeout=30).json()[0]["label"].startswith("class-")
        )
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in p.name() for p in started)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    time.sleep(1)
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.name() for p in alive]
