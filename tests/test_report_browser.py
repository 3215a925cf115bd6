"""The run report in a real browser (headless Chromium through selenium): every image decodes, the console stays
clean, the layout puts the curves side by side; a full-page screenshot is saved.

Skips, with the reason, when selenium, /usr/bin/chromium or /usr/bin/chromedriver is absent (Debian packages
chromium and chromium-driver; .ci/run installs them). Screenshots go to the test's tmp dir, and also to
$CLIPKIT_SCREENSHOT_DIR when set. $CLIPKIT_REPORT_HTML shows an existing report instead of the one the test builds;
README's screenshot was made with:

    CLIPKIT_REPORT_HTML=demo_out/run/report.html CLIPKIT_SCREENSHOT_DIR=docs/screenshots \
        .venv/bin/python -m pytest -q tests/test_report_browser.py
"""

import os
import shutil
from pathlib import Path

import pytest

from clipkit.report import write_run_report
from tests._report import write_result, write_run
from tests.eval_helpers import export_tiny, write_color_folder

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1360,1000")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            pytest.skip(f"{path} is absent (apt-get install {package})")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _report(tmp_path: Path) -> Path:
    existing = os.environ.get("CLIPKIT_REPORT_HTML")
    if existing:
        return Path(existing).resolve()
    run = write_run(tmp_path / "run")
    export_tiny(run)
    folder = write_color_folder(tmp_path / "colors", per_class=3, misplaced=1)
    result = write_result(tmp_path / "results", "run", str(run / "final"))
    return write_run_report([run], [result], dataset=f"folder:{folder}")


def test_report_renders_in_chromium(browser, tmp_path):
    page = _report(tmp_path)
    browser.get(page.as_uri())
    assert browser.title.startswith("clipkit run report")
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width,"
        " i.dataset.chart || '']);")
    assert len(images) >= 10
    broken = [i for i, (complete, natural, _, _) in enumerate(images) if not complete or natural == 0]
    assert not broken, f"images that did not decode: {broken}"
    curves = [w for _, _, w, chart in images if chart in ("loss", "lr", "logit_scale", "samples_per_s")]
    assert len(curves) == 4 and all(250 < w < 700 for w in curves), curves  # two charts per row at 1360 px
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors
    for section in ("overview", "curves", "metrics", "classes", "retrieval", "config"):
        assert browser.find_element("id", section).is_displayed()

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1360, min(height + 40, 16000))
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
    target = os.environ.get("CLIPKIT_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / "report.png")
