"""A real browser on the real server: `streamlit run app.py` on localhost, Debian's chromium driven
headless by playwright, a widget changed, the new verdict read, a screenshot saved.

CI installs chromium (.ci/run); locally the test skips when it is missing. Set
LLM_PLANNER_SCREENSHOT=docs/screenshot.png to refresh the README's screenshot.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
START_TIMEOUT_S = 60

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; CI installs it)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    port = free_port()
    streamlit = shutil.which("streamlit", path=str(Path(sys.executable).parent)) or "streamlit"
    proc = subprocess.Popen([streamlit, "run", "app.py", "--server.headless", "true", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail(f"streamlit did not answer /_stcore/health within {START_TIMEOUT_S} s")
        yield url
    finally:
        proc.terminate()  # by its own process id
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_change_devices_and_read_the_new_verdict(server, tmp_path):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, timeout=60_000)
            title = page.get_by_role("heading", name="llama3-8b on 8 x h100-sxm-80gb")
            title.wait_for(timeout=60_000)
            verdict = page.get_by_text("Fits.", exact=False).first
            before = verdict.inner_text()
            devices = page.get_by_label("Devices", exact=True)
            devices.fill("32")
            devices.press("Enter")
            page.get_by_role("heading", name="llama3-8b on 32 x h100-sxm-80gb").wait_for(timeout=60_000)
            page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60_000)
            after = page.get_by_text("Fits.", exact=False).first.inner_text()
            assert after.startswith("Fits.") and after != before
            shot = tmp_path / "screenshot.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            target = os.environ.get("LLM_PLANNER_SCREENSHOT")
            if target:
                page.screenshot(path=str(ROOT / target), type="png")
        finally:
            browser.close()
