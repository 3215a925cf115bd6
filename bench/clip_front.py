"""clip-retrieval's own web front against serve/app.py: a text search shows result images, in headless Chromium.

The front (github.com/rom1504/clip-retrieval, `front/`) is not on PyPI or npm as a build; build it once outside this
repository (nothing of it is committed here):

    git clone https://github.com/rom1504/clip-retrieval && cd clip-retrieval/front
    npm install && npx webpack --env production          # -> front/build
    # (a registry mirror without @vaadin/button 23.6.x: pin the three @vaadin/vaadin-* devDependencies to 23.3.7)

    python bench/clip_front.py --front /path/to/clip-retrieval/front/build \\
        --index demo_out/emb --model demo_out/run --query "a red star"

Serves the build with Python's http.server on one port and `serve/app.py --cors-origin` on another (the front calls
the back end from the browser, cross-origin), opens `?back=...&index=...&query=...` in headless Chromium, waits for
the front's result images (inside its shadow DOM) to load, saves a screenshot and prints what it saw: how many
images loaded (then after asking the front for its next page of metadata), their captions, and every request the front
made to the back end with its status.
"""

import argparse
import functools
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--front", required=True, help="clip-retrieval's front/build directory")
    p.add_argument("--index", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--query", default="a red star")
    p.add_argument("--screenshot", default="/tmp/clip_front.png")
    p.add_argument("--timeout", type=float, default=120)
    a = p.parse_args(argv)
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        sys.exit("needs Debian's chromium and chromium-driver")
    front_port, back_port = free_port(), free_port()
    front_origin, back = f"http://127.0.0.1:{front_port}", f"http://127.0.0.1:{back_port}"

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=a.front)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", front_port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = subprocess.Popen([sys.executable, str(REPO / "serve" / "app.py"), "--index", a.index, "--model", a.model,
                               "--port", str(back_port), "--cors-origin", front_origin], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=open(a.screenshot + ".server.log", "w"))
    try:
        deadline = time.time() + a.timeout
        while time.time() < deadline:
            try:
                if requests.get(back + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        index_name = requests.get(back + "/indices-list").json()[0]
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                    "--disable-gpu", "--disable-background-networking"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        d = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            d.get(f"{front_origin}/?back={quote(back)}&index={quote(index_name)}&query={quote(a.query)}")
            count_js = """const f = document.querySelector('clip-front'); if (!f || !f.shadowRoot) return [0, []];
                const imgs = [...f.shadowRoot.querySelectorAll('img.pic')];
                return [imgs.filter(i => i.complete && i.naturalWidth > 0).length, imgs.map(i => i.alt)];"""
            loaded, captions = 0, []
            while time.time() < deadline:
                loaded, captions = d.execute_script(count_js)
                if loaded and loaded == len(captions):
                    break
                time.sleep(0.5)
            shown = loaded
            d.execute_script("window.scrollTo(0, document.body.scrollHeight);"
                             "const f = document.querySelector('clip-front'); if (f) f.fetchMoreMetadata(40);")
            time.sleep(3)
            more = d.execute_script(count_js)[0]
            d.save_screenshot(a.screenshot)
            calls = []
            for entry in d.get_log("performance"):
                msg = json.loads(entry["message"])["message"]
                if msg["method"] == "Network.responseReceived" and msg["params"]["response"]["url"].startswith(back):
                    r = msg["params"]["response"]
                    calls.append(f"{r['status']} {r['url'][len(back):]}")
            # the front's own static 404s (favicon, a polyfill its build does not copy) are not the back end's
            errors = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"
                      and (back in e["message"] or "Uncaught" in e["message"] or "CORS" in e["message"])]
        finally:
            d.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
        httpd.shutdown()
    print(json.dumps({"query": a.query, "images_loaded": shown, "after_fetching_more_metadata": more,
                      "results_shown": len(captions),
                      "captions": captions[:10], "backend_calls": calls, "console_errors": errors,
                      "screenshot": a.screenshot}, indent=1))
    return 0 if shown and shown == len(captions) and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
