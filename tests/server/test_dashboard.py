"""/dashboard in a real headless Chromium (Debian's chromium and chromedriver, driven by
Selenium) against the live server, while 32 streamed requests with a shared prefix run:
blocks appear, shared blocks are marked, the grid empties when the requests finish; and
/v1/kv_cache behind the API key."""
from __future__ import annotations

import concurrent.futures
import re
import shutil
import time

import httpx
import pytest

from server_testing import API_KEY

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def test_kv_cache_route_is_behind_the_api_key_and_the_page_is_static(server):
    assert httpx.get(server.base_url + "/v1/kv_cache", timeout=30).status_code == 401
    with server.http() as http:
        view = http.get("/v1/kv_cache").json()
        page = httpx.get(server.base_url + "/dashboard", timeout=30)
    assert view["num_blocks"] == 128 and len(view["owner"]) == 128
    assert view["block_size"] == 16 and set(view["queues"]) == {"running", "waiting", "swapped"}
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "v1/kv_cache" in page.text
    assert not re.search(r"https?://", page.text)  # no CDN, no outside address: works offline


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1300,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def _pool_view(driver) -> dict:
    return driver.execute_script("return window.kvDashboard.state.view;")


def _pool(driver) -> dict:
    return driver.execute_script(
        "const d = document.getElementById('pool').dataset;"
        "return {used: +d.used || 0, shared: +d.shared || 0, cachedFree: +d.cachedFree || 0,"
        " polls: +document.body.dataset.polls || 0,"
        " rows: document.querySelectorAll('tr.request').length,"
        " error: document.getElementById('error').textContent};")


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="no Chromium here: .ci/run installs Debian's chromium and "
                           "chromium-driver where it can (apt)")
def test_the_dashboard_shows_blocks_taken_shared_and_given_back(server, tmp_path):
    pytest.importorskip("selenium")
    driver = _browser()
    try:
        driver.get(f"{server.base_url}/dashboard#key={API_KEY}&poll=250")
        deadline = time.monotonic() + 30
        while _pool(driver)["polls"] < 1:
            assert time.monotonic() < deadline, "the page never fetched /v1/kv_cache"
            time.sleep(0.2)
        prefix = "You are a helpful assistant. Answer every question in one line. " * 4

        def stream(i: int) -> int:
            with server.client() as client:
                chunks = client.completions.create(
                    model=server.model, prompt=prefix + f"Question {i}:", max_tokens=120,
                    temperature=0.0, stream=True, extra_body={"ignore_eos": True})
                return sum(1 for _ in chunks)

        seen = {"used": 0, "shared": 0, "rows": 0}
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(stream, i) for i in range(32)]
            shot = False
            while not all(f.done() for f in futures):
                now = _pool(driver)
                for key in seen:
                    seen[key] = max(seen[key], now[key])
                if not shot and now["shared"] > 0:
                    driver.save_screenshot(str(tmp_path / "dashboard_busy.png"))
                    shot = True
                time.sleep(0.25)
            assert all(f.result() > 0 for f in futures)
        assert seen["used"] > 0, f"no block ever showed as held: {_pool(driver)}"
        assert seen["shared"] > 0, "the shared prefix's blocks never showed as shared"
        assert seen["rows"] > 0, "no request row ever showed"
        deadline = time.monotonic() + 30
        while (now := _pool(driver))["used"] or now["rows"]:
            assert time.monotonic() < deadline, f"the grid did not empty: {now}"
            time.sleep(0.25)
        assert now["cachedFree"] > 0  # the prefix stays cached on the free list
        driver.save_screenshot(str(tmp_path / "dashboard_idle.png"))
        assert (tmp_path / "dashboard_busy.png").stat().st_size > 0
        # 10,000 blocks held by 200 requests, some shared: one redraw stays well under the
        # polling period (canvas cells, not DOM nodes)
        n, reqs = 10_000, 200
        big = dict(_pool_view(driver), num_blocks=n,
                   owner=[-1 if b % 9 == 0 else -2 if b % 13 == 0 else b % reqs
                          for b in range(n)],
                   refs=[[b, 2] for b in range(0, n, 13)], cached=list(range(0, n, 9)),
                   requests=[dict(id=f"r{i}", status="running", prompt_tokens=10, tokens=20,
                                  computed=19, blocks=list(range(i, n, reqs)), host_blocks=[],
                                  preemptions=0) for i in range(reqs)])
        # (one synchronous script: the page's own polls cannot replace the view between the
        # render and the read)
        ms, used = driver.execute_script(
            "const k = window.kvDashboard; k.state.view = arguments[0];"
            "const t = performance.now(); k.render(); k.render();"
            "return [(performance.now() - t) / 2,"
            " +document.getElementById('pool').dataset.used];", big)
        assert used > 8000
        assert ms < 250, f"a redraw of 10,000 blocks took {ms:.0f} ms"
    finally:
        driver.quit()
