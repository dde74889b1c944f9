"""The dashboard in a real headless browser (Debian's Chromium through chromedriver): under load from
tools/loadgen its numbers move and its tokens/s agrees with the load generator's; it works behind
--api-key; the gateway's page shows each replica and marks a stopped one down."""
import json
import os
import shutil
import signal
import threading
import time
import urllib.request

import pytest

from tests.server_utils import GatewayProcess, ServerProcess, llama_replica

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(tools/bootstrap.sh installs them when run as root)")
MODEL = "tiny-llama"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def number(driver, element_id: str) -> float | None:
    try:
        return float(text(driver, element_id).rstrip("%"))
    except ValueError:
        return None


def wait_for(predicate, timeout: float = 15.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def test_the_page_under_load(llama_folder, browser, tmp_path):
    from PIL import Image

    from tools.loadgen.__main__ import main as loadgen

    server = ServerProcess("--model", llama_folder, "--dtype", "float32", "--served-model-name", MODEL,
                           "--max-model-len", "512", "--kv-cache-memory", "32MB", "--disable-log-requests")
    summary = tmp_path / "load.json"
    try:
        browser.get(server.url + "/dashboard")
        assert wait_for(lambda: text(browser, "state") == "serving")
        load = threading.Thread(target=loadgen, args=(["--url", server.url, "--concurrency", "8", "--duration", "20",
                                                       "--input-len", "32", "--output-len", "64", "--warmup", "0",
                                                       "--json", str(summary), "--quiet"],))
        load.start()
        assert wait_for(lambda: (number(browser, "running") or 0) > 0, timeout=30)  # the load has begun
        time.sleep(10.5)  # the page's rate is over the last 10 s: from now on all of it under load
        readings = []  # (tok/s, finished, points) once a second until the load ends
        while len(readings) < 8:
            readings.append((number(browser, "tok-rate"), number(browser, "finished"), number(browser, "tokens-total")))
            time.sleep(1.0)
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        load.join(60)
        assert number(browser, "running") is not None and text(browser, "info").startswith(MODEL)
    finally:
        server.stop()
    measured = json.loads(summary.read_text())["output_throughput"]
    rates = sorted(r[0] for r in readings)
    print(f"page tok/s {rates}; loadgen {measured:.1f}")
    first, last = readings[0], readings[-1]
    assert first[1] < last[1] and first[2] < last[2], readings  # the numbers update between reads
    shown = rates[len(rates) // 2]  # the median reading: one stall of the machine does not decide it
    assert abs(shown - measured) <= 0.2 * measured, (rates, measured)
    image = Image.open(shot).convert("RGB")
    assert image.size[0] >= 1000 and len(image.getcolors(maxcolors=1 << 20) or []) > 50  # not blank
    keep = os.environ.get("SCALELLM_DASHBOARD_SCREENSHOT")
    if keep:  # how docs/dashboard.png is made
        shutil.copy(shot, keep)


def test_the_page_behind_an_api_key(llama_folder, browser):
    with ServerProcess("--model", llama_folder, "--dtype", "float32", "--served-model-name", MODEL,
                       "--max-model-len", "512", "--kv-cache-memory", "16MB", "--api-key", "s3cret") as server:
        with urllib.request.urlopen(server.url + "/dashboard", timeout=10) as r:
            assert r.status == 200 and b"<title>ScaleLLM dashboard</title>" in r.read()
        for path in ("/dashboard/stream", "/dashboard/snapshot"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(server.url + path, timeout=10)
            assert e.value.code == 401
        browser.get(server.url + "/dashboard")
        assert wait_for(lambda: text(browser, "state") == "key needed")
        browser.find_element("id", "api-key").send_keys("s3cret")
        browser.find_element("id", "key-save").click()
        assert wait_for(lambda: text(browser, "state") == "serving")
        assert wait_for(lambda: number(browser, "running") is not None)


def test_the_gateway_page_shows_each_replica_and_a_stopped_one(llama_folder, browser):
    replicas = [llama_replica(llama_folder, wait=False) for _ in range(2)]
    gateway = None
    try:
        for r in replicas:
            r.wait_healthy(120)
        gateway = GatewayProcess(*[a for r in replicas for a in ("--replica", r.url)])

        def cards() -> dict[str, tuple[str, str]]:
            """url -> (state, class) of each replica card, read in one go (the cards are redrawn each second)."""
            rows = browser.execute_script(
                "return Array.from(document.querySelectorAll('.replica')).map("
                "c => [c.dataset.url, c.querySelector('.replica-state').textContent, c.className]);")
            return {url: (state, cls) for url, state, cls in rows}

        def states() -> dict[str, str]:
            return {url: state for url, (state, _) in cards().items()}
        browser.get(gateway.url + "/dashboard")
        assert wait_for(lambda: states() == {r.url: "healthy" for r in replicas}), states()
        replicas[1].proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert wait_for(lambda: states().get(replicas[1].url) not in (None, "healthy"), timeout=10), states()
        assert time.monotonic() - stopped < 5  # marked within a few seconds
        assert states()[replicas[0].url] == "healthy"
        assert "down" in cards()[replicas[1].url][1].split()
    finally:
        if gateway is not None:
            gateway.stop()
        for r in replicas:
            r.stop()
