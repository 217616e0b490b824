"""``lsnet web`` with several users: each browser session has its own scene in its own process.

The gateway (``LSNetSegmentationWeb.gateway``) is started as a user would (``lsnet web``), with two
sessions at most and a short idle time-out; headless Chromium opens it from separate browser contexts
(separate cookies, as two people on two machines).  Checked: what one user opens or uploads never shows
in the other's page; uploads (a good file, a refused name, a file over the limit) in the browser; a third
browser gets the "all sessions in use" page until a closed session times out; requests without a
session cookie are refused; a session whose process died is replaced on the next page load; stopping
the gateway stops every session process.
"""

from __future__ import annotations

import http.cookiejar
import os
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import SimpleITK as sitk

from web_helpers import (CHROMIUM, CHROMIUM_ARGS, SAMPLE, WAIT_MS, lsnet_web, needs_chromium, new_page, session_pids,
                         state, wait_state)

pytestmark = needs_chromium

IDLE_MIN = 0.1  # 6 s: a closed page's session ends quickly in this test (default 30 min)


def wait_until_closed_sessions_end() -> None:
    """Past the idle time-out (and the gateway's check period, a quarter of it): closed pages' sessions are gone."""
    time.sleep(60 * IDLE_MIN + 3)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions") / "data"
    root.mkdir()
    (root / "ct.nrrd").write_bytes(SAMPLE.read_bytes())
    return root


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """A small CT-like NRRD for the upload (under the 2 MB limit of this gateway)."""
    path = tmp_path_factory.mktemp("upload") / "small case.nrrd"
    rng = np.random.default_rng(0)
    arr = (rng.normal(40, 20, (12, 96, 96))).astype(np.int16)
    arr[:, :8] = -1000
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def gateway(data_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("log") / "gateway.log"
    with lsnet_web(data_root, log_path, "--max-sessions", "2", "--idle-timeout-min", str(IDLE_MIN),
                   "--upload-limit-mb", "2") as url:
        yield url, log_path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_app(browser, url, outside):
    page = new_page(browser, outside, viewport={"width": 1200, "height": 800})
    page.goto(url)
    page.wait_for_selector("#open-sample", timeout=WAIT_MS)
    return page


def test_two_users_do_not_see_each_others_data(browser, gateway, small_ct):
    url, log_path = gateway
    outside: list[str] = []
    a, b = open_app(browser, url, outside), open_app(browser, url, outside)
    try:
        a.locator("#upload").set_input_files(str(small_ct))
        wait_state(a, "(s('opened') || '').startsWith('upload')")
        assert state(a, "opened") == "upload small_case.nrrd" and state(a, "error") == ""
        time.sleep(1.0)  # were the scenes shared, B's state would follow within a message round trip
        assert state(b, "opened") == ""
        b.click("#open-sample")
        wait_state(b, "(s('opened') || '').startsWith('sample')")
        assert state(a, "opened") == "upload small_case.nrrd"
        assert len(session_pids(log_path)) == 2  # one process per browser
        assert outside == []
    finally:
        a.context.close()
        b.context.close()


def test_uploads_refused_with_a_message(browser, gateway, tmp_path):
    url, _ = gateway
    wait_until_closed_sessions_end()  # the previous test's sessions: this one gets a slot
    page = open_app(browser, url, [])
    try:
        wrong = tmp_path / "notes.txt"
        wrong.write_text("not an image")
        page.locator("#upload").set_input_files(str(wrong))
        wait_state(page, "(s('error') || '').includes('notes.txt')")
        assert state(page, "error").startswith("Upload refused") and state(page, "opened") == ""
        page.locator("#upload").set_input_files(str(SAMPLE))  # 5.2 MB over this gateway's 2 MB
        wait_state(page, "(s('error') || '').includes('over the limit')")
        assert state(page, "opened") == ""
    finally:
        page.context.close()


def test_a_full_server_says_so_until_a_session_ends(browser, gateway):
    url, _ = gateway
    wait_until_closed_sessions_end()
    a, b = open_app(browser, url, []), open_app(browser, url, [])
    third = new_page(browser, [])
    try:
        response = third.goto(url)
        assert response.status == 503 and "All sessions are in use" in third.content()
        b.context.close()  # B leaves; after the idle time-out its slot is free again
        wait_until_closed_sessions_end()
        third.goto(url)
        third.wait_for_selector("#open-sample", timeout=WAIT_MS)
        assert state(third, "opened") == ""
    finally:
        for page in (a, third):
            page.context.close()


def test_requests_without_a_session_are_refused(gateway):
    url, _ = gateway
    for path in ("ws", "vue.global.js", "assets/anything.js"):
        request = urllib.request.Request(url + path, headers={"Cookie": "lsnet_session=not-a-session"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 403


def test_a_dead_session_is_replaced_and_the_gateway_stops_its_sessions(data_root, tmp_path):
    log_path = tmp_path / "gateway.log"
    with lsnet_web(data_root, log_path) as url:
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(url, timeout=120) as r:  # the page (/ -> index.html): starts one session process
            assert r.status == 200 and [c.name for c in jar] == ["lsnet_session"]
        pids = session_pids(log_path)
        assert len(pids) == 1 and _alive(pids[0])
        os.kill(pids[0], signal.SIGKILL)  # the session process dies: the next page load gets a new one
        _wait_gone(pids[0])
        with opener.open(url, timeout=120) as r:
            assert r.status == 200
        pids = session_pids(log_path)
        assert len(pids) == 2 and _alive(pids[1])
    _wait_gone(pids[1])  # the gateway stopped: so did its session
    assert not _alive(pids[1])


def _wait_gone(pid: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not a running session (its parent, the gateway, is gone or reaping it)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
