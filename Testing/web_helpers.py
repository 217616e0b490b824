"""Shared pieces of the browser tests of ``lsnet web`` (Playwright + headless Chromium on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "LSNetSegmentation" / "Resources" / "SampleData" / "PANCREAS_0001_reduced.nrrd"
CHROMIUM = os.environ.get("LSNET_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 120_000  # upper bound of a wait for the page (not a performance check)

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason=f"Chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def lsnet_web(data_root: Path, log_path: Path, *options: str):
    """``lsnet web`` (the per-user gateway unless ``options`` say otherwise) on a free port; yields its URL.

    Waits (bounded, ~2 minutes) for the port to accept connections; stops the process group at the end
    (SIGTERM, then SIGKILL) and fails the test if it exited early.
    """
    port = free_port()
    log = log_path.open("w")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lsnet.app.cli", "web", "--data-root", str(data_root),
                             "--port", str(port), *options],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        for _ in range(240):
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"lsnet web exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("lsnet web did not start listening")
        yield f"http://127.0.0.1:{port}/"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


def session_pids(log_path: Path) -> list[int]:
    """Pids of the session processes the gateway's log says it started."""
    return [int(m) for m in re.findall(r"session \S+ started: pid (\d+)", log_path.read_text())]


def new_page(browser, outside: list, **context_options):
    """A page in a fresh browser context (its own cookies) that aborts, and records, any request that is
    not to 127.0.0.1."""
    context = browser.new_context(**context_options)

    def route(r):
        host = urlparse(r.request.url).hostname
        if r.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("websocket", lambda ws: None if urlparse(ws.url).hostname == "127.0.0.1" else outside.append(ws.url))
    return page


def state(page, key):
    return page.evaluate("(k) => window.trame.state.get(k)", key)


def wait_state(page, expression: str):
    page.wait_for_function(f"() => {{ const s = (k) => window.trame.state.get(k); return {expression}; }}", timeout=WAIT_MS)
