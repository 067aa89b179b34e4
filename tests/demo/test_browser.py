"""The real demo server in headless Chromium (selenium + Debian's chromium-driver).

Each test opens the page, does what a user does (upload, pick an example, click a button, click a
result), waits for the result elements, saves a screenshot under the test's tmp folder and checks what
the page shows against the library. Every request the page makes must go to the demo server itself.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from tests.demo.conftest import EXAMPLES, REPO
from visreg_hub.inference import list_image_files

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PHOTO = REPO / "tests" / "fixtures" / "photos" / "chelsea.jpg"
WAIT_S = 60

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="browser tests need /usr/bin/chromium: apt-get install chromium chromium-driver",
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.TemporaryDirectory(prefix="demo-chromium-")
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1400,1500", f"--user-data-dir={profile.name}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()
    profile.cleanup()


@pytest.fixture
def page(browser, demo_server):
    """The demo page, loaded fresh; after the test, every request it made must have stayed local."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("performance")  # drop what earlier tests left
    browser.get(demo_server.url)
    WebDriverWait(browser, WAIT_S).until(EC.element_to_be_clickable((By.ID, "search-button")))
    yield browser
    assert_only_local_requests(browser, demo_server.url)


def assert_only_local_requests(browser, url: str) -> None:
    server = urlparse(url).netloc
    hosts = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request_url = message["params"]["request"]["url"]
            if request_url.startswith(("http:", "https:", "ws:", "wss:")):
                hosts.add(urlparse(request_url).netloc)
    assert hosts <= {server}, f"the page contacted other hosts: {sorted(hosts - {server})}"


# ------------------------------------------------------------------------------------------ helpers
def wait(browser, condition, timeout: float = WAIT_S):
    """``condition(browser)`` once truthy; an element Gradio re-rendered between finding and reading it
    (stale) counts as not yet, as a missing one does."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    stale = (StaleElementReferenceException,)
    return WebDriverWait(browser, timeout, ignored_exceptions=stale).until(condition)


def css(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def upload(browser, path: Path) -> None:
    """Put a file in the query box (clearing the previous one first), as a drag-and-drop would."""
    for button in css(browser, "#query-file button[aria-label='Clear']"):
        button.click()
    wait(browser, lambda b: css(b, "#query-file input[type=file]"))
    css(browser, "#query-file input[type=file]")[0].send_keys(str(path))


def result_captions(browser) -> list[str]:
    return [item.text for item in css(browser, "#results .thumbnail-item")]


def wait_for_results(browser, count: int) -> list[str]:
    def ready(b):
        captions = result_captions(b)
        loaded = len(css(b, "#results .thumbnail-item img")) == count and all(captions)
        return captions if loaded and len(captions) == count else False

    return wait(browser, ready)


def screenshot(browser, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000
    return path


def reference_top_k(model, gallery: Path, query: Path, k: int) -> list[str]:
    """The library's top-k scores, formatted as the captions show them."""
    files = [f for f in list_image_files(gallery) if f.parent.name != "broken"]
    embeddings = model.encode(files, convert_to_numpy=True)
    scores = embeddings @ model.encode(query, convert_to_numpy=True)
    return [f"{score:.3f}" for score in np.sort(scores)[::-1][:k]]


# -------------------------------------------------------------------------------------------- tests
def test_upload_search_then_click_a_result(page, demo_model, demo_gallery, tmp_path):
    query = EXAMPLES / "Sneaker_309.png"
    upload(page, query)
    wait(page, lambda b: css(b, "#query-preview img"))
    css(page, "#search-button")[0].click()
    captions = wait_for_results(page, 8)
    screenshot(page, tmp_path, "search")
    assert [c.split(" · ")[0] for c in captions] == reference_top_k(demo_model, demo_gallery, query, 8)
    labels = {p.name for p in demo_gallery.iterdir() if p.is_dir()}
    assert all(c.split(" · ")[1] in labels for c in captions)

    css(page, "#results .thumbnail-item")[2].click()  # search from the third result
    # it becomes the query, and as a gallery image it finds itself first (cosine 1)
    wait(page, lambda b: "Sneaker_309" not in css(b, "#query-file")[0].text)
    wait(page, lambda b: (result_captions(b) or [""])[0].startswith("1.000 · "))
    wait_for_results(page, 8)
    screenshot(page, tmp_path, "search_from_result")


def test_pick_an_example(page, demo_model, demo_gallery, tmp_path):
    from demo.service import DemoService

    # the examples gallery lists every bundled set's examples, the default set's first: find Bag_320's place
    position = [p.stem for p in DemoService.examples()].index("Bag_320")
    item = css(page, "#examples .thumbnail-item")[position]
    page.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", item)
    captions = wait_for_results(page, 8)
    screenshot(page, tmp_path, "example")
    assert "Bag_320" in css(page, "#query-file")[0].text.replace("\n", "")
    expected = reference_top_k(demo_model, demo_gallery, EXAMPLES / "Bag_320.png", 8)
    assert [c.split(" · ")[0] for c in captions] == expected


def test_extract_shows_embedding_pca_and_download(page, demo_model, tmp_path):
    from selenium.webdriver.common.by import By

    page.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Feature extraction')]").click()
    upload(page, PHOTO)
    wait(page, lambda b: css(b, "#query-preview img"))
    css(page, "#extract-button")[0].click()
    for selector in ("#pca-image img", "#overlay-image img", "#view-image img", "#embedding-plot svg",
                     "#embedding-stats table", "#embedding-npy a"):  # fmt: skip
        wait(page, lambda b, s=selector: css(b, s))
    screenshot(page, tmp_path, "extract")
    expected = demo_model.encode(PHOTO, convert_to_numpy=True)
    stats = css(page, "#embedding-stats table")[0].text
    assert f"{expected.shape[0]} 1.0000 cls yes" in stats
    link = next(
        a.get_attribute("href") for a in css(page, "#embedding-npy a") if ".npy" in a.get_attribute("href")
    )
    downloaded = np.load(io.BytesIO(httpx.get(link, timeout=30).content), allow_pickle=False)
    np.testing.assert_allclose(downloaded, expected, atol=1e-6)


def choose(browser, menu: str, label: str) -> None:
    """Pick the option ``label`` of the dropdown ``#menu`` as a user does (open it, click the option)."""
    from selenium.webdriver.common.by import By

    css(browser, f"#{menu} input")[0].click()
    options = "li[role='option']"
    wait(browser, lambda b: [o for o in b.find_elements(By.CSS_SELECTOR, options)
                             if o.get_attribute("aria-label") == label])[0].click()  # fmt: skip


def status_text(browser) -> str:
    return " ".join(css(browser, "#status")[0].text.split())  # the Markdown's code spans break lines


def menu_value(browser, menu: str) -> str:
    return css(browser, f"#{menu} input")[0].get_attribute("value")


def test_switching_the_model_clears_old_results_and_pairs_the_bundled_gallery(page, demo_server, tmp_path):
    """Results and features of one model never stay on screen under another; a bundled model brings its
    own bundled gallery along (the photo gallery under the Fashion-MNIST model meant nothing)."""
    from demo.service import BUNDLED_SETS

    photos, fashion = BUNDLED_SETS
    upload(page, EXAMPLES / "Sneaker_309.png")
    wait(page, lambda b: css(b, "#query-preview img"))
    css(page, "#search-button")[0].click()
    wait_for_results(page, 8)
    choose(page, "gallery-choice", f"bundled: {photos.gallery_label}")
    wait(page, lambda b: not result_captions(b))  # another gallery: the old hits go
    choose(page, "model-choice", f"bundled ({fashion.model_name})")
    wait(page, lambda b: menu_value(b, "gallery-choice") == f"bundled: {fashion.gallery_label}")
    status = wait(page, lambda b: (t := status_text(b)) and fashion.model_name in t and t)
    assert "goes with" not in status  # model and gallery match
    choose(page, "gallery-choice", f"bundled: {photos.gallery_label}")  # a mismatch the user asks for
    wait(page, lambda b: f"goes with {photos.model_name}" in status_text(b))
    css(page, "#search-button")[0].click()
    wait_for_results(page, 8)
    screenshot(page, tmp_path, "switched")


def test_a_menu_opened_and_closed_unchanged_leaves_search_and_results_alone(page, tmp_path):
    """Opening a menu and leaving it without a new choice (Escape, a click elsewhere, the same option)
    changes nothing: the next Search click searches, and results on screen stay (a menu event that
    fired on blur cancelled that search and cleared the results)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    upload(page, EXAMPLES / "Sneaker_309.png")
    wait(page, lambda b: css(b, "#query-preview img"))
    for menu in ("model-choice", "gallery-choice"):
        css(page, f"#{menu} input")[0].click()  # open it
        wait(page, lambda b: b.find_elements(By.CSS_SELECTOR, "li[role='option']"))
        css(page, f"#{menu} input")[0].send_keys(Keys.ESCAPE)  # and leave it as it was
        css(page, "#search-button")[0].click()  # the click also takes the focus from the menu
        first = wait_for_results(page, 8)
        screenshot(page, tmp_path, f"after_{menu}")
        choose(page, menu, menu_value(page, menu))  # the option already chosen, chosen again
        css(page, "#search-button")[0].click()
        assert wait_for_results(page, 8) == first


def test_broken_upload_shows_a_message_and_the_page_keeps_working(page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not a png" * 8)
    upload(page, broken)
    toast = wait(page, lambda b: [t for t in css(b, ".toast-body.error") if "broken.png" in t.text])[0]
    screenshot(page, tmp_path, "error")
    assert "not a readable image" in toast.text
    assert "Traceback" not in page.page_source and str(tmp_path) not in toast.text

    upload(page, EXAMPLES / "Trouser_216.png")
    wait(page, lambda b: css(b, "#query-preview img"))
    css(page, "#search-button")[0].click()
    wait_for_results(page, 8)


def test_api_docs_render_offline(browser, demo_server, tmp_path):
    """/docs on the demo's port shows the API's operations with no request leaving the server (Swagger
    UI ships in the package; FastAPI's default page loads it from a CDN and stays blank offline)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    base = demo_server.url.rstrip("/")
    browser.get_log("performance")
    browser.get(base + "/docs")
    WebDriverWait(browser, WAIT_S).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, ".opblock-summary-path"))
    )
    browser.save_screenshot(str(tmp_path / "docs.png"))
    paths = {
        element.text.replace("\u200b", "")
        for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    spec = httpx.get(base + "/openapi.json", timeout=WAIT_S).json()
    assert paths == set(spec["paths"])  # every route of the schema is on the page, nothing else
    assert "visreg_hub inference API" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    assert_only_local_requests(browser, demo_server.url)
