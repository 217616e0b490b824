"""Benchmark of ``lsnet web`` in a real browser (issue 14's "first views < 3 s, Segment < 15 s").

Measures, against the app on 127.0.0.1 driven by Playwright + headless Chromium:

* ``page_load_with_new_session_s``: the page's address -> its controls (the gateway starts this browser's
  session process: slicer-core, trame, the scene);
* ``open_to_first_view_s``: click "Open sample CT" -> the axial view image shows the CT (pixels);
* ``segment_to_result_s``: click "Segment" -> the result is in the scene (``has_result`` in the state,
  set after ``LSNetSegmentationLib.results`` has imported segmentation, heatmap and RoIs).

Run on an IDLE machine (numbers taken while training or other tests run are meaningless)::

    OMP_NUM_THREADS=2 python benchmarks/bench_web.py --repeats 3 [--json out.json]

Prints one JSON object (median and all runs, machine facts).  Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "LSNetSegmentation" / "Resources" / "SampleData" / "PANCREAS_0001_reduced.nrrd"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_root: Path, port: int):
    proc = subprocess.Popen([sys.executable, "-m", "lsnet.app.cli", "web", "--data-root", str(data_root), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("lsnet web did not start")


def axial_shows_ct(page) -> bool:
    import numpy as np
    from PIL import Image

    png = page.locator("img.image-display-area").nth(3).screenshot()
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return float((img.max(axis=2) > 40).mean()) > 0.2


def one_run(chromium: str, url: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        t_load = time.perf_counter()
        page.goto(url)  # through the gateway: a new browser starts a session process of its own
        page.wait_for_selector("#open-sample", timeout=120_000)
        t_load = time.perf_counter() - t_load
        t0 = time.perf_counter()
        page.click("#open-sample")
        for _ in range(3000):
            if axial_shows_ct(page):
                break
        t_open = time.perf_counter() - t0
        t1 = time.perf_counter()
        page.click("#segment")
        page.wait_for_function("() => window.trame.state.get('has_result') === true || window.trame.state.get('error') !== ''",
                               timeout=600_000, polling=50)
        t_seg = time.perf_counter() - t1
        error = page.evaluate("() => window.trame.state.get('error')")
        browser.close()
    return {"page_load_with_new_session_s": round(t_load, 2), "open_to_first_view_s": round(t_open, 2), "segment_to_result_s": round(t_seg, 2), "error": error}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="app starts (one browser run each)")
    ap.add_argument("--chromium", default=os.environ.get("LSNET_CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(SAMPLE, root / "ct.nrrd")
        for _ in range(args.repeats):
            port = free_port()
            proc = start_app(root, port)
            try:
                runs.append(one_run(args.chromium, f"http://127.0.0.1:{port}/"))
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
    out = {
        "benchmark": "lsnet web (per-user gateway): page load with a new session; sample CT open -> first view; "
                     "Segment -> result in scene",
        "median_page_load_with_new_session_s": statistics.median(r["page_load_with_new_session_s"] for r in runs),
        "median_open_to_first_view_s": statistics.median(r["open_to_first_view_s"] for r in runs),
        "median_segment_to_result_s": statistics.median(r["segment_to_result_s"] for r in runs),
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "loadavg_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
