"""Tests for app.http.routes.ui: the page and its assets, then driven in headless Chromium."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from app_testing import start_app, stop_app
from fastapi.testclient import TestClient
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from app.http.routes.ui import STATIC_DIR

# Debian's packages (`apt-get install chromium chromium-driver`; .ci/run installs them): the
# driver matches the browser's version exactly and nothing is downloaded.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
READY_WITHIN_S = 90.0
WAIT_S = 30.0
GRID_PX = (8 * 30 + 2, 2 * 30 + 2)  # the page's 16 samples, 8 a row, 28 px + 2 px padding


# ---- the files ------------------------------------------------------------------------------


def test_the_page_is_served_at_the_root(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in response.text and 'href="static/style.css"' in response.text


@pytest.mark.parametrize(
    ("asset", "media_type"), [("app.js", "text/javascript"), ("style.css", "text/css")]
)
def test_assets_are_served_under_static(client: TestClient, asset: str, media_type: str) -> None:
    response = client.get(f"/static/{asset}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert response.content == (STATIC_DIR / asset).read_bytes()


def test_a_missing_asset_is_a_404(client: TestClient) -> None:
    assert client.get("/static/missing.js").status_code == 404


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN, font service or analytics: the page works offline."""
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]{2,}/", text), path.name
        assert "@import" not in text and "url(" not in text, path.name


def test_the_page_is_not_part_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/similar" in paths


# ---- in a real browser ----------------------------------------------------------------------


@pytest.fixture
def live_server(trained_checkpoint: Path, tmp_path: Path) -> Iterator[str]:
    """`python -m app` serving the trained checkpoint on a free loopback port, ready."""
    app = start_app(
        tmp_path / "server.log",
        *("--checkpoints", str(trained_checkpoint), "--device", "cpu"),
        ready_within_s=READY_WITHIN_S,
    )
    try:
        yield app.base
    finally:
        stop_app(app, graceful=True)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    """Headless Chromium from Debian's packages, with a fresh profile and no network of its own."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed: apt-get install chromium chromium-driver "
            "(.ci/run does)"
        )
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1500",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: webdriver.Chrome, script: str, *args: Any) -> Any:
    """Poll a JavaScript expression (`return ...`) until it is truthy; return its value."""
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: d.execute_script(script, *args), message=script
    )


def text_of(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


@pytest.mark.slow
def test_the_page_works_in_a_real_browser(
    live_server: str, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    browser.get(f"{live_server}/")
    wait_for(browser, "return document.getElementById('model').options.length > 0")
    assert "conditional" in text_of(browser, "model-info")

    # A grid of 16 digits, 8 a row, is there as soon as the page opens, from the fitted prior.
    grid_loaded = (
        "const img = document.getElementById('sample-image');"
        "return img.complete && img.naturalWidth > 0 && [img.naturalWidth, img.naturalHeight];"
    )
    assert tuple(wait_for(browser, grid_loaded)) == GRID_PX
    assert text_of(browser, "sample-caption").endswith(" · fitted prior")
    first = browser.find_element(By.ID, "sample-image").get_attribute("src")

    # Sample again with a seed and the standard prior: a new grid, and the caption says so.
    browser.find_element(By.ID, "sample-seed").send_keys("7")
    Select(browser.find_element(By.ID, "sample-prior")).select_by_value("standard")
    browser.find_element(By.ID, "sample-button").click()
    wait_for(browser, "return document.getElementById('sample-image').src !== arguments[0]", first)
    assert tuple(wait_for(browser, grid_loaded)) == GRID_PX
    assert text_of(browser, "sample-caption") == "seed 7 · standard prior"

    # Interpolate, then step through the frames with the keyboard.
    browser.find_element(By.ID, "interp-button").click()
    wait_for(browser, "return document.getElementById('interp-strip').children.length === 12")
    slider = browser.find_element(By.ID, "interp-slider")
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert text_of(browser, "interp-index") == "3 / 12"
    assert wait_for(browser, "return document.getElementById('interp-frame').naturalWidth") == 28

    # Draw a "1" on the pad: its reconstruction, score, digit and neighbours appear.
    pad = browser.find_element(By.ID, "pad")
    stroke = ActionChains(browser).move_to_element_with_offset(pad, 5, -95).click_and_hold()
    for _ in range(19):
        stroke = stroke.move_by_offset(-1, 10)
    stroke.release().perform()
    wait_for(browser, "return document.getElementById('neighbours').children.length === 8")
    wait_for(
        browser,
        "return /^\\d+\\.\\d\\d/.test(document.getElementById('anomaly-score').textContent)",
    )
    assert re.fullmatch(r"\d \(\d+\.\d%\)", text_of(browser, "predicted-digit"))
    assert text_of(browser, "predicted-digit").startswith("1 ")
    assert re.match(r"0\.\d{4} mean squared", text_of(browser, "recon-error"))
    for element_id in ("input-image", "recon-image", "heatmap-image"):
        script = f"return document.getElementById('{element_id}').naturalWidth === 28"
        assert wait_for(browser, script)
    labels = [li.text.split()[0] for li in browser.find_elements(By.CSS_SELECTOR, "#neighbours li")]
    assert labels.count("1") >= 6, labels
    assert browser.find_element(By.ID, "draw-error").get_attribute("hidden") is not None

    # An API error is shown with the server's own message, not swallowed. Enter submits.
    seed = browser.find_element(By.ID, "sample-seed")
    seed.clear()
    seed.send_keys("-1", Keys.ENTER)
    wait_for(browser, "return !document.getElementById('sample-error').hidden")
    error = text_of(browser, "sample-error")
    assert "422" in error and "query.seed" in error and "greater than or equal to 0" in error

    # Latency from /metrics: after two polls the routes used above have a p50 and a p99.
    wait_for(
        browser,
        "return [...document.querySelectorAll('#latency-rows td')]"
        ".some(td => td.textContent === '/similar')",
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#latency-rows tr")
    cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert cells[0][0] == "all API routes"
    assert any(re.fullmatch(r"[\d.]+ ms", row[2]) for row in cells), cells
    assert_latency_table_is_histogram_quantile(browser)

    # Offline: everything the page loaded came from this server.
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(url.startswith((live_server, "data:", "blob:")) for url in resources), resources
    # No script errors (the 422 above is logged by Chromium as a failed resource load).
    errors = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]
    assert not errors, errors

    # The whole page, beyond the window, for a person to look at (DevTools' own capture).
    layout = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": layout["width"], "height": layout["height"], "scale": 1}
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot", {"captureBeyondViewport": True, "clip": clip}
    )
    screenshot = tmp_path / "page.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    assert screenshot.stat().st_size > 10_000


# ---- the page's p50 / p99, against Prometheus' histogram_quantile ----------------------------


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile on cumulative `buckets` (upper bound -> count, +Inf
    included), as promql/quantile.go computes it; None where Prometheus answers NaN."""
    bounds = sorted(buckets)
    total = buckets[math.inf]
    if total <= 0 or len(bounds) < 2:
        return None
    rank = q * total
    # The first bucket, the +Inf one excluded, holding the rank; none: the +Inf bucket.
    b = next((i for i, le in enumerate(bounds[:-1]) if buckets[le] >= rank), len(bounds) - 1)
    if b == len(bounds) - 1:
        return bounds[-2]
    start, end, count = 0.0, bounds[b], buckets[bounds[b]]
    if b > 0:
        start, count, rank = (
            bounds[b - 1],
            count - buckets[bounds[b - 1]],
            rank - buckets[bounds[b - 1]],
        )
    return start + (end - start) * rank / count


NO_VALUE = "\u2013"  # the en dash the page shows for a quantile of no requests


def assert_close_ms(shown: str, seconds: float | None, where: str) -> None:
    if seconds is None:
        assert shown == NO_VALUE, where
        return
    # The page rounds to 0.01 ms below 10 ms, else to 0.1 ms.
    shown_ms = float(shown.removesuffix(" ms"))
    assert shown_ms == pytest.approx(seconds * 1000, abs=0.051), (where, shown, seconds)


def assert_latency_table_is_histogram_quantile(browser: webdriver.Chrome) -> None:
    """The page's latency table against histogram_quantile of the same two /metrics polls it
    was computed from (read in one script, so no poll can land in between)."""
    state = browser.execute_script(
        "const plain = (m) => Object.fromEntries([...m].map(([route, buckets]) =>"
        "  [route, [...buckets].map(([le, n]) => [le === Infinity ? 'inf' : le, n])]));"
        "return {before: plain(snapshots[0]), now: plain(snapshots[snapshots.length - 1]),"
        "  notApi: [...NOT_API],"
        "  rows: [...document.querySelectorAll('#latency-rows tr')]"
        "    .map(tr => [...tr.children].map(td => td.textContent))};"
    )

    def buckets(raw: list[list[Any]]) -> dict[float, float]:
        return {math.inf if le == "inf" else float(le): float(n) for le, n in raw}

    expected: dict[str, dict[float, float]] = {}
    for route, raw in state["now"].items():
        if route in state["notApi"]:
            continue
        before = buckets(state["before"].get(route, []))
        recent = {le: n - before.get(le, 0.0) for le, n in buckets(raw).items()}
        if recent[math.inf] > 0:
            expected[route] = recent
    everything: dict[float, float] = {}
    for recent in expected.values():
        for le, n in recent.items():
            everything[le] = everything.get(le, 0.0) + n
    rows = {row[0]: row[1:] for row in state["rows"]}
    assert set(rows) == {"all API routes", *expected}, (rows, expected)
    for route, recent in [("all API routes", everything), *expected.items()]:
        count, p50, p99 = rows[route]
        assert int(count) == recent[math.inf], route
        assert_close_ms(p50, histogram_quantile(0.5, recent), f"{route} p50")
        assert_close_ms(p99, histogram_quantile(0.99, recent), f"{route} p99")
    # Edge cases the traffic above does not reach, through the page's own function.
    cases = [
        {0.001: 0, 0.0025: 10, 0.005: 20, math.inf: 20},  # ranks inside finite buckets
        {0.001: 0, 0.0025: 0, 0.005: 0, math.inf: 7},  # all past the last finite bound
        {0.001: 3, 0.0025: 3, 0.005: 3, math.inf: 3},  # all in the first bucket
        {0.001: 0, math.inf: 0},  # no requests
    ]
    for case in cases:
        for q in (0.5, 0.99):
            shown = browser.execute_script(
                "return quantile(arguments[0], new Map(arguments[1].map("
                "  ([le, n]) => [le === 'inf' ? Infinity : le, n])));",
                q,
                [["inf" if le == math.inf else le, n] for le, n in case.items()],
            )
            expected_q = histogram_quantile(q, case)
            if expected_q is None:
                assert shown is None, (case, q)
            else:
                assert shown == pytest.approx(expected_q, rel=1e-9), (case, q, shown)


@pytest.mark.slow
def test_the_page_asks_for_a_key_when_the_server_needs_one(
    trained_checkpoint: Path, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    key = "page-key-0123456789abcdef"
    app = start_app(
        tmp_path / "server.log",
        *("--checkpoints", str(trained_checkpoint), "--device", "cpu"),
        ready_within_s=READY_WITHIN_S,
        settings={"api_keys": f"page:user:{key}"},
    )
    try:
        browser.get(f"{app.base}/")
        wait_for(browser, "return !document.getElementById('key-form').hidden")
        assert "needs an API key" in text_of(browser, "global-error")
        browser.find_element(By.ID, "api-key").send_keys(key, Keys.ENTER)
        # With the key the page starts as it does on an open server: models, then a grid.
        wait_for(browser, "return document.getElementById('model').options.length > 0")
        grid_loaded = (
            "const img = document.getElementById('sample-image');"
            "return img.complete && img.naturalWidth > 0 && [img.naturalWidth, img.naturalHeight];"
        )
        assert tuple(wait_for(browser, grid_loaded)) == GRID_PX
        assert browser.find_element(By.ID, "key-form").get_attribute("hidden") is not None
        assert browser.find_element(By.ID, "global-error").get_attribute("hidden") is not None
    finally:
        stop_app(app, graceful=True)
