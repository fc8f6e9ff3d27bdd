"""The web page in a real browser: Debian's Chromium driven by Playwright, against a live server."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deit.checkpoints import load_model

from .deploy_helpers import save_tiny_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not Path(CHROMIUM).is_file():
    pytest.skip(
        "Chromium not found at /usr/bin/chromium (apt-get install chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser)")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from deit.deploy.serve.app import ServerThread, ServeSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    loaded = load_model(model_dir)
    with ServerThread(create_app(loaded, ServeSettings(max_upload_mb=2))) as running:
        yield running.url


@pytest.fixture(scope="module")
def fmnist_server() -> Iterator[str]:
    with ServerThread(create_app("fashion-mnist", ServeSettings(max_upload_mb=2))) as running:
        yield running.url


@pytest.fixture(scope="module")
def page(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_upload_shows_label_bars_and_attention(
    page: Any, server: str, sample_images: list[Path]
) -> None:
    expect = sync_api.expect
    photo = next(p for p in sample_images if p.name == "chelsea.png")
    top = httpx.post(
        f"{server}/v1/classify", files={"file": (photo.name, photo.read_bytes())}, timeout=30
    ).json()["predictions"][0]
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server + "/")
    expect(page.locator("#model-info")).to_contain_text("10 classes")

    page.set_input_files("#file-input", str(photo))
    rows = page.locator("#predictions li")
    expect(rows).to_have_count(5)
    expect(page.locator("#status")).to_contain_text(f"Prediction: {top['label']}")
    expect(rows.first.locator(".label")).to_have_text(top["label"])
    expect(rows.first.locator(".value")).to_have_text(re.compile(r"^\d+(\.\d+)?%$"))
    widths = [rows.nth(i).locator(".fill").bounding_box()["width"] for i in range(5)]
    assert all(w > 0 for w in widths) and widths == sorted(widths, reverse=True)

    canvas = page.locator("#attention")
    expect(canvas).to_have_attribute("aria-label", re.compile("class token"))
    page.get_by_label("Distillation token").check()
    expect(canvas).to_have_attribute("aria-label", re.compile("distillation token"))
    expect(page.locator("#preview-img")).to_be_visible()
    assert all(u.startswith((server, "data:", "blob:")) for u in requests), requests  # no CDN


def test_sample_button_and_bad_upload(page: Any, fmnist_server: str) -> None:
    expect = sync_api.expect
    page.goto(fmnist_server + "/")
    expect(page.locator("#model-info")).to_contain_text("fashion-mnist · distilled DeiT")
    expect(page).to_have_title(re.compile("^fashion-mnist"))
    buttons = page.locator("#sample-list button")
    expect(buttons).to_have_text(["Ankle boot", "Pullover"])  # Fashion-MNIST's own images
    page.get_by_role("button", name="Ankle boot").click()
    expect(page.locator("#preview-name")).to_have_text("fmnist-ankle-boot.png")
    expect(page.locator("#predictions li")).to_have_count(5)
    expect(page.locator("#status")).to_contain_text("Prediction: Ankle boot")
    expect(page.locator("#ood-warning")).to_be_hidden()  # a garment: no warning

    bad = {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not an image"}
    page.set_input_files("#file-input", files=[bad])
    status = page.locator("#status")
    expect(status).to_have_class(re.compile("error"))
    expect(status).to_contain_text("not an image file")
    expect(page.locator("#predictions li")).to_have_count(0)


def test_a_folder_is_named_with_its_parent_and_no_wrong_samples(
    page: Any, server: str, model_dir: Path
) -> None:
    """The issue: a folder called ``model`` showed as "model · distilled DeiT", and a digits
    model offered a cat and a cup. A model with numbered classes gets no samples at all."""
    expect = sync_api.expect
    page.goto(server + "/")
    info = page.locator("#model-info")
    expect(info).to_contain_text(f"{model_dir.parent.name}/{model_dir.name} · distilled DeiT")
    expect(page.locator("#predictions-title")).to_be_visible()
    expect(page.locator("#samples")).to_be_hidden()
    assert page.locator("#sample-list button").count() == 0


def test_a_photo_that_is_no_garment_shows_the_unusual_warning(
    page: Any, fmnist_server: str, sample_images: list[Path]
) -> None:
    """Issue #26: the embedded model calls the issue's cat photo "Bag" at 99.6%; the page says
    the image is unlike its training data, in a visible warning."""
    expect = sync_api.expect
    photo = next(p for p in sample_images if p.name == "chelsea.png")
    page.goto(fmnist_server + "/")
    expect(page.locator("#model-info")).to_contain_text("fashion-mnist")
    page.set_input_files("#file-input", str(photo))
    expect(page.locator("#predictions li")).to_have_count(5)
    warning = page.locator("#ood-warning")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("unlike anything the model was trained on")
