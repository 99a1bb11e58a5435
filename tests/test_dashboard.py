"""The dashboard in a real browser: headless Chromium (Debian's /usr/bin/chromium, installed by
scripts/install-browser.sh) driven by Playwright, against the real server (uvicorn subprocess)
with API keys, on real Fashion-MNIST images embedded by efficientnet-lite0.

Screenshots go to each test's tmp dir (kept as CI artefacts); with DASHBOARD_DOCS_SCREENSHOTS=1
one of each page is also written to docs/.

Cost: 445 s measured on this 2-core machine under a load average of ~24 (other suites running):
the browser steps take ~40 s; the rest is the two efficientnet-lite0 fits at D = 1280 (one of
80 images through the API with a fixed shrinkage, one of 40 images uploaded and fitted from the
browser with the defaults: shrinkage cross-validation and the label-issue step dominate).
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from apiserver import running_server, wait_for_job
from ci import skip_unless_ci

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789ab"}
DOCS = Path(__file__).resolve().parents[1] / "docs"
TIMEOUT_MS = 30_000

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # the dev extra installs it
    skip_unless_ci("playwright is not installed (pip install -e '.[dev]')")
if not CHROMIUM.exists():
    skip_unless_ci("no /usr/bin/chromium: run scripts/install-browser.sh")

try:
    from fmnist_images import write_fmnist_folder

    from trainer.fmnist import load_fashion_mnist

    load_fashion_mnist("train")
except FileNotFoundError as exc:
    skip_unless_ci(str(exc))


def _zip(root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(root.rglob("*.png")):
            archive.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The real server with two tenants' keys and alice's fitted Fashion-MNIST dataset."""
    root = tmp_path_factory.mktemp("dashboard")
    images = root / "images"
    write_fmnist_folder(images, 80, classes=4)
    upload = root / "upload"
    write_fmnist_folder(upload, 40, classes=2)
    (root / "upload.zip").write_bytes(_zip(upload))
    env = {"DIFFICULTY_DEFAULT_ENCODER": "efficientnet-lite0"}
    with running_server(root / "data", api_keys=KEYS, env=env) as base:
        headers = {"Authorization": f"Bearer {KEYS['alice']}"}
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            dataset = client.post("/v1/datasets", json={"name": "fashion-mnist 80"}).json()["id"]
            response = client.post(f"/v1/datasets/{dataset}/items", files={"file": ("fmnist.zip", _zip(images))})
            assert response.status_code == 201, response.text
            # A fixed shrinkage skips its cross-validation (minutes at D = 1280 on 2 cores); the
            # browser's own fit below runs the defaults.
            job = client.post(f"/v1/datasets/{dataset}/fit", json={"shrinkage": 0.1}).json()["job_id"]
            assert wait_for_job(client, job, timeout=1200)["state"] == "succeeded"
            scores = client.get(f"/v1/datasets/{dataset}/scores", params={"limit": 1000}).json()["items"]
            yield {"base": base, "dataset": dataset, "scores": scores, "archive": root / "upload.zip", "client": client}


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, tmp_path: Path) -> Iterator[Page]:
    """A fresh browser context per test; every console error or page error fails the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.console_errors = errors  # type: ignore[attr-defined]
    yield page
    context.close()
    assert errors == [], errors


def _shot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("DASHBOARD_DOCS_SCREENSHOTS"):
        shutil.copy(path, DOCS / f"dashboard-{name}.png")


def _enter_key(page: Page, base: str, key: str) -> None:
    """The key is entered once on the list page and kept in the browser (localStorage)."""
    page.goto(f"{base}/ui/")
    # Before a key is entered the server answers 401 (and the browser logs it): expected once.
    page.wait_for_selector("#key-status:has-text('missing API key')")
    errors = page.console_errors  # type: ignore[attr-defined]
    assert all("401" in e for e in errors), errors
    errors.clear()
    page.fill("#api-key", key)
    page.click("#save-key")
    page.wait_for_load_state("load")
    page.wait_for_selector("#datasets tbody tr, #empty:not([hidden])")


def _open_dataset(page: Page, server: dict) -> None:
    page.goto(f"{server['base']}/ui/datasets/{server['dataset']}")
    page.wait_for_selector("body[data-ready=true]")
    _wait_for_images(page)


def _wait_for_images(page: Page) -> None:
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('.gallery img')];"
        " return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0); }"
    )


def _gallery_ids(page: Page) -> list[str]:
    return page.eval_on_selector_all("#gallery .card", "cards => cards.map(c => c.dataset.sampleId)")


def test_dataset_page_shows_real_thumbnails_hardest_first_with_histogram_and_map(page: Page, server: dict, tmp_path: Path) -> None:
    _enter_key(page, server["base"], KEYS["alice"])
    row = page.wait_for_selector(f"#datasets tr[data-id='{server['dataset']}']")
    assert "fashion-mnist 80" in row.inner_text() and "succeeded" in row.inner_text()
    _shot(page, tmp_path, "list")
    page.click(f"#datasets tr[data-id='{server['dataset']}'] a")
    page.wait_for_selector("body[data-ready=true]")
    _wait_for_images(page)
    hardest = max(server["scores"], key=lambda s: (s["rmd"], s["sample_id"]))
    ids = _gallery_ids(page)
    assert ids[0] == hardest["sample_id"] and len(ids) == 48
    assert hardest["sample_id"] in page.inner_text("#gallery .card:first-child")
    sizes = page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(sizes) == 48 and min(sizes) == 28  # Fashion-MNIST is 28 x 28: shown as stored
    assert page.query_selector("#histogram canvas") is not None
    assert page.query_selector("#map canvas") is not None
    points = page.evaluate("() => mapChart.getOption().series.reduce((n, s) => n + s.data.length / 2, 0)")
    assert points == 80
    assert page.locator("#classes tbody tr").count() == 4
    _shot(page, tmp_path, "dataset")


def test_class_filter_paging_and_confusion_cells(page: Page, server: dict) -> None:
    _enter_key(page, server["base"], KEYS["alice"])
    _open_dataset(page, server)
    first = _gallery_ids(page)
    page.click("#next-page")
    page.wait_for_function("ids => document.querySelector('#gallery .card').dataset.sampleId !== ids[0]", arg=first)
    _wait_for_images(page)
    second = _gallery_ids(page)
    by_rmd = [s["sample_id"] for s in sorted(server["scores"], key=lambda s: (s["rmd"], s["sample_id"]), reverse=True)]
    assert first + second == by_rmd  # keyset pages: every sample once, hardest first
    assert page.is_disabled("#next-page")
    page.select_option("#class-filter", "trouser")
    trousers = [s["sample_id"] for s in server["scores"] if s["label"] == "trouser"]
    assert 0 < len(trousers) < 48
    page.wait_for_function("n => document.querySelectorAll('#gallery .card').length === n", arg=len(trousers))
    _wait_for_images(page)
    assert sorted(_gallery_ids(page)) == sorted(trousers)
    page.select_option("#order", "asc")
    page.wait_for_function(
        "id => document.querySelector('#gallery .card').dataset.sampleId === id",
        arg=min((s for s in server["scores"] if s["label"] == "trouser"), key=lambda s: (s["rmd"], s["sample_id"]))["sample_id"],
    )
    page.select_option("#class-filter", "")
    page.check("#differs")
    differs = [s["sample_id"] for s in server["scores"] if s["label"] != s["predicted_label"]]
    page.wait_for_function("n => document.getElementById('selection').textContent.includes(`: ${n} samples`)", arg=len(differs))
    page.wait_for_function("n => document.querySelectorAll('#gallery .card').length === n", arg=min(len(differs), 48))
    assert sorted(_gallery_ids(page)) == sorted(differs[:48]) or len(differs) > 48
    page.uncheck("#differs")
    # A confusion cell lists exactly its samples.
    cell = page.locator("#confusion td.cell[data-label='shirt'][data-predicted='shirt'], #confusion td.cell.diag").first
    label, predicted = cell.get_attribute("data-label"), cell.get_attribute("data-predicted")
    expected = sorted(s["sample_id"] for s in server["scores"] if s["label"] == label and s["predicted_label"] == predicted)
    cell.click()
    page.wait_for_function("n => document.getElementById('selection').textContent.includes(`: ${n} samples`)", arg=len(expected))
    page.wait_for_function("n => document.querySelectorAll('#gallery .card').length === n", arg=min(len(expected), 48))
    assert sorted(_gallery_ids(page)) == expected[:48] or len(expected) > 48


def test_map_box_selection_and_click_to_open(page: Page, server: dict) -> None:
    _enter_key(page, server["base"], KEYS["alice"])
    _open_dataset(page, server)
    # A real brush drag over the whole plot area selects every point.
    page.evaluate("() => mapChart.dispatchAction({type: 'takeGlobalCursor', key: 'brush', brushOption: {brushType: 'rect', brushMode: 'single'}})")
    page.locator("#map").scroll_into_view_if_needed()
    box = page.locator("#map").bounding_box()  # mouse coordinates are the viewport's
    page.mouse.move(box["x"] + 42, box["y"] + 42)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 22, box["y"] + box["height"] - 32, steps=8)
    page.mouse.up()
    page.wait_for_function("() => document.getElementById('selection').textContent.includes('box on the map')")
    text = page.inner_text("#selection")
    assert text.endswith(": 80 samples"), text
    page.click("#clear-selection")
    page.evaluate("() => mapChart.dispatchAction({type: 'takeGlobalCursor', key: 'brush', brushOption: {brushType: false}})")
    # Click one point: its sample page opens.
    x, y = page.evaluate(
        "() => { const s = mapChart.getOption().series[0]; return mapChart.convertToPixel({seriesIndex: 0}, [s.data[0], s.data[1]]); }"
    )
    page.locator("#map").scroll_into_view_if_needed()
    box = page.locator("#map").bounding_box()
    page.mouse.click(box["x"] + x, box["y"] + y)
    page.wait_for_url("**/samples/**")
    page.wait_for_selector("body[data-ready=true]")


def test_thumbnail_opens_sample_page_with_neighbours(page: Page, server: dict, tmp_path: Path) -> None:
    _enter_key(page, server["base"], KEYS["alice"])
    _open_dataset(page, server)
    target = _gallery_ids(page)[0]
    page.click("#gallery .card:first-child img")
    page.wait_for_selector("body[data-ready=true]")
    assert page.inner_text("#title") == target
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('#neighbors img'), document.getElementById('image')];"
        " return imgs.length > 1 && imgs.every((i) => i.complete && i.naturalWidth > 0); }"
    )
    detail = server["client"].get(f"/v1/datasets/{server['dataset']}/samples/{target}", params={"k": 12}).json()
    shown = page.eval_on_selector_all("#neighbors .card", "cards => cards.map(c => c.dataset.sampleId)")
    assert shown == [n["sample_id"] for n in detail["neighbors"]] and len(shown) == 12
    assert page.query_selector("#distances canvas") is not None
    assert detail["label"] in page.inner_text("#numbers")
    _shot(page, tmp_path, "sample")
    page.click("#neighbors .card:first-child")
    page.wait_for_url(f"**/samples/{shown[0]}")


def test_other_tenant_sees_nothing(page: Page, server: dict) -> None:
    _enter_key(page, server["base"], KEYS["bob"])
    page.wait_for_selector("#empty:not([hidden])")
    page.goto(f"{server['base']}/ui/datasets/{server['dataset']}")
    page.wait_for_selector("#errors:has-text('dataset')")
    assert page.query_selector("#gallery .card") is None
    errors = page.console_errors  # type: ignore[attr-defined]
    assert errors and all("404" in e for e in errors), errors  # the browser logs the refusal
    errors.clear()


def test_upload_and_fit_from_the_browser(page: Page, server: dict, tmp_path: Path) -> None:
    _enter_key(page, server["base"], KEYS["alice"])
    page.fill("#new-name", "uploaded from the browser")
    page.set_input_files("#archive", str(server["archive"]))
    page.click("#upload-fit")
    page.wait_for_selector("#open-dataset", timeout=1_200_000)
    assert "succeeded" in page.inner_text("#upload-status")
    page.click("#open-dataset")
    page.wait_for_selector("body[data-ready=true]")
    _wait_for_images(page)
    assert len(_gallery_ids(page)) == 40


def test_keyless_on_loopback_and_a_dataset_without_images(browser, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(c, 1.0, size=(30, 8)) for c in range(3)]).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, features)
    labels = "\n".join(str(c) for c in np.repeat(np.arange(3), 30)).encode()
    with running_server(tmp_path / "data") as base, httpx.Client(base_url=base, timeout=60) as client:
        dataset = client.post("/v1/datasets", json={"name": "uploaded embeddings"}).json()["id"]
        response = client.post(f"/v1/datasets/{dataset}/embeddings",
                               files={"embeddings": ("e.npy", buffer.getvalue()), "labels": ("l.txt", labels)})
        assert response.status_code == 201, response.text
        job = client.post(f"/v1/datasets/{dataset}/fit", json={}).json()["job_id"]
        assert wait_for_job(client, job)["state"] == "succeeded"
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(f"{base}/ui/datasets/{dataset}")
        page.wait_for_selector("body[data-ready=true]")
        assert page.is_visible("#no-images")
        assert page.locator("#gallery .card .noimg").count() == 48
        page.click("#gallery .card:first-child")
        page.wait_for_selector("body[data-ready=true]")
        assert page.is_visible("#no-image")
        context.close()
        assert errors == [], errors
