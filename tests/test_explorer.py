"""The explorer page in a real browser (Debian's chromium + chromium-driver, driven by selenium): type a query and
see result images load, click a map point and see its neighbours, classify zero-shot and see the confusion matrix,
click a result for more like it, search by an uploaded image, hover a point, pan and zoom the map, with the
service's API key asked for once. Screenshots go to tests/artifacts/ (explorer_*.png). The test fails when
a result image does not load or the browser console shows an error."""

import shutil
import time
from pathlib import Path

import pytest
import requests

from tests._serve import Server, export_random_model

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"
KEY = "explorer-key"

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver)")


def _demo_like_index(root: Path) -> tuple:
    """A small labelled index: 180 shape images (30 classes), class in each sample's json, a PCA map (UMAP's numba
    compilation would cost a minute; tests/test_index.py checks the UMAP map)."""
    import io
    import json
    import random
    import tarfile

    from clipkit.synthetic import CLASSES, draw_shape
    from tests._serve import build_index

    model = export_random_model(root / "model")
    rng = random.Random(0)
    shard = root / "shards" / "00000.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        for i in range(180):
            cls = CLASSES[i % len(CLASSES)]
            buf = io.BytesIO()
            draw_shape(*cls.split(" "), 64, rng).save(buf, "PNG")
            for ext, payload in (("png", buf.getvalue()), ("txt", f"a {cls}".encode()),
                                 ("json", json.dumps({"class": cls}).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return build_index(root / "index", model, str(shard), ["--map", "pca"]), model


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    root = tmp_path_factory.mktemp("explorer")
    index, model = _demo_like_index(root)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with Server(["--index", str(index), "--model", str(model), "--api-key", KEY]) as server:
        driver = webdriver.Chrome(service=ChromeService(DRIVER), options=opts)
        try:
            yield {"driver": driver, "url": server.url, "server": server}
        finally:
            driver.quit()


def _wait(predicate, timeout=60, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _shot(driver, name):
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"explorer_{name}.png"))


def test_page_asks_for_the_key_once_then_search_shows_images(browser):
    from selenium.webdriver.common.by import By

    d = browser["driver"]
    assert requests.get(browser["url"] + "/").status_code == 200  # the page itself needs no key
    assert requests.get(browser["url"] + "/explorer/map").status_code == 401  # its data does
    d.get(browser["url"] + "/")
    alert = _wait(lambda: _alert(d), what="the API key prompt")
    alert.send_keys(KEY)
    alert.accept()
    _wait(lambda: d.execute_script("return window.explorer && window.explorer.state.map !== null"), what="the map")
    d.find_element(By.ID, "query").send_keys("a red star")
    d.find_element(By.CSS_SELECTOR, "#search-form button").click()
    images = _wait(lambda: _loaded_images(d, "#results img.result-image", 24), what="24 loaded result images")
    assert len(images) == 24
    assert "red star" in d.find_element(By.ID, "results-title").text
    highlighted = d.execute_script("return window.explorer.state.highlight.size")
    assert highlighted == 24
    _shot(d, "search")
    assert not _console_errors(d)


def _alert(d):
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return d.switch_to.alert
    except NoAlertPresentException:
        return None


def _loaded_images(d, selector, n):
    count = d.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0).length",
        selector)
    return list(range(count)) if count >= n else None


def test_clicking_a_map_point_shows_its_neighbours(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = browser["driver"]
    canvas = d.find_element(By.ID, "map")
    x, y = d.execute_script("const m = window.explorer.state.map; return window.explorer.toScreen(m.xy[10], m.xy[11]);")
    w, h = canvas.size["width"], canvas.size["height"]
    ActionChains(d).move_to_element_with_offset(canvas, int(x - w / 2), int(y - h / 2)).click().perform()
    _wait(lambda: _loaded_images(d, "#neighbor-images img.result-image", 8), what="8 neighbour images")
    texts = d.find_elements(By.CSS_SELECTOR, "#neighbor-texts li.neighbor-text")
    assert len(texts) == 8 and all(t.text.startswith("a ") for t in texts)
    assert d.execute_script("return window.explorer.state.selected") is not None
    _shot(d, "neighbours")
    assert not _console_errors(d)


def test_zero_shot_view_draws_a_confusion_matrix(browser):
    from selenium.webdriver.common.by import By

    from clipkit.synthetic import CLASSES

    d = browser["driver"]
    d.find_element(By.CSS_SELECTOR, "#zeroshot-panel summary").click()
    d.find_element(By.ID, "classnames").send_keys("\n".join(CLASSES))
    d.find_element(By.CSS_SELECTOR, "#label-column option[value='class']").click()
    d.find_element(By.ID, "zeroshot-run").click()
    table = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#zeroshot-result table.confusion"), what="confusion")
    rows = table[0].find_elements(By.TAG_NAME, "tr")
    assert len(rows) == len(CLASSES) + 1
    assert "on 180 labelled images" in d.find_element(By.ID, "zeroshot-result").text
    assert len(d.find_elements(By.CSS_SELECTOR, "#legend span")) == len(CLASSES)
    _shot(d, "zeroshot")
    assert not _console_errors(d)


def test_more_like_this_upload_hover_pan_and_zoom(browser, tmp_path):
    """Clicking a result searches by its image; an uploaded image file searches too; hovering a point shows its
    thumbnail and caption; dragging pans and the wheel zooms about the cursor."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By

    from clipkit.synthetic import draw_shape

    d = browser["driver"]
    _wait(lambda: d.execute_script("return window.explorer && window.explorer.state.map !== null"), what="the map")
    if not d.find_elements(By.CSS_SELECTOR, "#results .result"):  # this test alone: search first
        d.find_element(By.ID, "query").send_keys("a blue circle")
        d.find_element(By.CSS_SELECTOR, "#search-form button").click()
        _wait(lambda: _loaded_images(d, "#results img.result-image", 24), what="24 loaded result images")
    first = d.find_element(By.CSS_SELECTOR, "#results .result")
    first_id = first.find_element(By.CSS_SELECTOR, ".sim").text.split(" ")[0]  # "#12 · 0.345"
    first.click()
    _wait(lambda: d.find_element(By.ID, "results-title").text == f"more like {first_id}", what="more like this")
    _wait(lambda: _loaded_images(d, "#results img.result-image", 24), what="24 similar images")
    _shot(d, "more_like_this")

    import random

    path = tmp_path / "green_square.png"
    draw_shape("green", "square", 64, random.Random(1)).save(path)
    d.find_element(By.ID, "image-file").send_keys(str(path))
    d.find_element(By.CSS_SELECTOR, "#search-form button").click()
    _wait(lambda: d.find_element(By.ID, "results-title").text == "results for green_square.png", what="upload search")
    _wait(lambda: _loaded_images(d, "#results img.result-image", 24), what="24 images for the upload")

    canvas = d.find_element(By.ID, "map")
    w, h = canvas.size["width"], canvas.size["height"]
    x, y = d.execute_script("const m = window.explorer.state.map; return window.explorer.toScreen(m.xy[20], m.xy[21]);")
    ActionChains(d).move_to_element_with_offset(canvas, int(x - w / 2), int(y - h / 2)).perform()
    _wait(lambda: d.execute_script("const t = document.getElementById('tooltip'); const i = t.querySelector('img');"
                                   "return !t.hidden && i.complete && i.naturalWidth > 0 && "
                                   "t.querySelector('.caption').textContent.startsWith('#')"), what="hover tooltip")
    _shot(d, "hover")

    view = lambda: d.execute_script("const v = window.explorer.state.view; return [v.x, v.y, v.scale];")
    before = view()
    ActionChains(d).move_to_element_with_offset(canvas, 0, 0).click_and_hold().move_by_offset(60, 40) \
        .move_by_offset(20, 10).release().perform()
    panned = view()
    assert panned[2] == before[2] and (panned[0], panned[1]) != (before[0], before[1])  # moved, same zoom
    ActionChains(d).scroll_from_origin(ScrollOrigin.from_element(canvas, 10, 10), 0, -120).perform()
    _wait(lambda: view()[2] > panned[2], what="zoom in")  # 1.25x per wheel notch
    assert not _console_errors(d)
