"""``lsnet web`` in a real browser: Playwright driving headless Chromium against the app on 127.0.0.1.

One app process and one browser page for the whole module (the steps build on each other: open the
sample CT, Segment, inspect, correct, download); the app is stopped at the end.  Every request the
page makes is intercepted: anything not to 127.0.0.1 is aborted and fails the last test.
Screenshots go to ``$LSNET_WEB_SCREENSHOTS`` (docs/web.md uses those of a run) or a temp folder.

Skips only when Chromium is absent (Debian package ``chromium``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from web_helpers import CHROMIUM, CHROMIUM_ARGS, SAMPLE, WAIT_MS, lsnet_web, needs_chromium, new_page, state, wait_state

pytestmark = needs_chromium

DICOM_CT = SHARED_DATA / "ircadb-1.1" / "3Dircadb1" / "3Dircadb1.1" / "PATIENT_DICOM"
"""A real abdominal DICOM CT series (IRCAD, 129 slices; shared data) for the DICOM SEG download."""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("web")
    root = base / "data"
    root.mkdir()
    shutil.copy(SAMPLE, root / "ct.nrrd")
    outside = base / "secret.nrrd"
    shutil.copy(SAMPLE, outside)
    (root / "link_out.nrrd").symlink_to(outside)
    (root / "etc_link").symlink_to("/etc")
    if DICOM_CT.is_dir():
        shutil.copytree(DICOM_CT, root / "dicom_ct")
    return root


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("LSNET_WEB_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def server(data_root, tmp_path_factory):
    with lsnet_web(data_root, tmp_path_factory.mktemp("log") / "server.log", "--upload-limit-mb", "64") as url:
        yield url


@pytest.fixture(scope="module")
def browser_page(server):
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = new_page(browser, outside, viewport={"width": 1400, "height": 850}, accept_downloads=True)
        page.goto(server)
        page.wait_for_selector("#open-sample", timeout=WAIT_MS)
        page.outside_requests = outside
        try:
            yield page
        finally:
            page.context.close()
            browser.close()


def open_path(page, path: str) -> None:
    """Type ``path`` into the data-root field and press Open (the answer is the caller's to wait for)."""
    page.locator("#path-input").fill(path)
    wait_state(page, f"s('chosen_path') === {path!r}")
    page.click("#open-path")


def segment_and_wait(page) -> None:
    """Press Segment and wait until the result is in the scene (or an error is shown)."""
    page.click("#segment")
    wait_state(page, "s('running') === true || s('has_result') === true || s('error') !== ''")
    wait_state(page, "s('has_result') === true || s('error') !== ''")


VIEW_INDEX = {"coronal": 0, "sagittal": 1, "3d": 2, "axial": 3}
"""Order of the view images in trame-slicer's Quad View layout."""


def view_image(page, view: str = "axial") -> np.ndarray:
    """Pixels of one view as the browser shows it."""
    from PIL import Image

    png = page.locator("img.image-display-area").nth(VIEW_INDEX[view]).screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def axial_image(page) -> np.ndarray:
    return view_image(page, "axial")


def slice_views_segment_pixels(page) -> int:
    """Segment-coloured pixels in the three slice views (the axial RoI box may cover the segment there)."""
    return sum(segment_colour_pixels(view_image(page, v)) for v in ("coronal", "sagittal", "axial"))


def segment_colour_pixels(img: np.ndarray) -> int:
    """Pixels close to the pancreas colour of the terminology (outline drawn at full opacity)."""
    from lsnet.io.terminology import lookup_structure

    rgb = np.array(lookup_structure(name="Pancreas").color) * 255
    return int(np.count_nonzero(np.abs(img - rgb).max(axis=2) < 40))


def test_open_sample_shows_views(browser_page, shots):
    page = browser_page
    page.click("#open-sample")
    wait_state(page, "s('opened') !== ''")
    assert "PANCREAS_0001" in state(page, "opened")
    for _ in range(50):  # bounded: until the first rendered image arrives
        img = axial_image(page)
        if (img.max(axis=2) > 40).mean() > 0.2:
            break
        page.wait_for_timeout(200)
    assert (img.max(axis=2) > 40).mean() > 0.2, "the axial view shows no CT"
    page.screenshot(path=str(shots / "web_open.png"))


def test_segment_draws_segmentation(browser_page, shots):
    page = browser_page
    before = slice_views_segment_pixels(page)
    segment_and_wait(page)
    assert state(page, "error") == ""
    assert state(page, "voxels") > 1000
    rois = state(page, "rois")
    assert len(rois) > 5
    middle = rois[len(rois) // 2]
    page.locator(".roi-row").nth(len(rois) // 2).click()
    wait_state(page, f"s('current_slice') === {middle['on_slice']} && s('selected_roi') === {middle['id']}")
    for _ in range(50):  # bounded: until the view image shows the new slice with the segment
        after = slice_views_segment_pixels(page)
        if after > before + 300:
            break
        page.wait_for_timeout(200)
    assert after > before + 300, f"no segmentation drawn in the slice views ({before} -> {after} pixels)"
    page.screenshot(path=str(shots / "web_segment.png"))


def test_heatmap_toggle(browser_page):
    page = browser_page
    page.locator("#show-heatmap").click()
    wait_state(page, "s('show_heatmap') === false")
    page.locator("#show-heatmap").click()
    wait_state(page, "s('show_heatmap') === true")


def test_move_box_and_resegment(browser_page, shots):
    page = browser_page
    rid = state(page, "selected_roi")
    size_before = next(r["size"] for r in state(page, "rois") if r["id"] == rid)
    page.click("#move-right")
    page.click("#move-grow")
    wait_state(page, f"s('rois').some(r => r.id === {rid} && r.source === 'user' && r.size !== '{size_before}')")
    page.click("#reseg")
    wait_state(page, "s('status').startsWith('Re-segmented') || s('error') !== ''")
    assert state(page, "error") == ""
    page.screenshot(path=str(shots / "web_correct.png"))


def test_add_and_delete_box(browser_page):
    page = browser_page
    n = len(state(page, "rois"))
    page.click("#add-roi")
    wait_state(page, f"s('rois').length === {n + 1}")
    assert state(page, "rois")[-1]["source"] == "user" or any(r["source"] == "user" for r in state(page, "rois"))
    voxels = state(page, "voxels")
    page.click("#delete")
    wait_state(page, f"s('rois').length === {n} && s('status').startsWith('Deleted')")
    assert state(page, "voxels") <= voxels


def test_download_seg_nrrd(browser_page, tmp_path):
    import slicerio

    page = browser_page
    with page.expect_download(timeout=WAIT_MS) as info:
        page.click("#download-seg")
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    assert path.name.endswith(".seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["Pancreas"]
    assert seg["segments"][0]["terminology"]["type"][1] == "15776009"  # SNOMED CT pancreas
    assert np.count_nonzero(seg["voxels"]) == state(page, "voxels")


def test_cancel_leaves_the_scene_unchanged(browser_page):
    page = browser_page
    voxels, n = state(page, "voxels"), len(state(page, "rois"))
    page.click("#segment")
    page.click("#cancel")  # at once: Playwright waits only until the button is enabled (the run has started)
    wait_state(page, "s('running') === false")
    assert state(page, "error").startswith("Cancelled"), (state(page, "error"), state(page, "status"))
    assert (state(page, "voxels"), len(state(page, "rois"))) == (voxels, n)


@pytest.mark.parametrize("path, words", [("../secret.nrrd", "outside the data root"),
                                         ("link_out.nrrd", "symbolic link"),
                                         ("etc_link/passwd", "symbolic link"),
                                         ("/etc/passwd", "outside the data root")])
def test_paths_outside_the_data_root_refused(browser_page, path, words):
    page = browser_page
    opened = state(page, "opened")
    open_path(page, path)
    # the message names the refused path: waiting on that, not on "any error", keeps the previous
    # case's message (still shown until the server answers this click) from passing the wait
    wait_state(page, f"(s('error') || '').includes({path!r})")
    assert words in state(page, "error") and "Refused" in state(page, "error")
    assert page.locator("#error").is_visible()
    assert state(page, "opened") == opened  # nothing else was opened


def test_dicom_seg_download_is_the_corrected_segmentation(browser_page, data_root, tmp_path):
    """DICOM input: the DICOM SEG download holds the segmentation as corrected in the page (a RoI and its
    mask deleted; the same voxels as the .seg.nrrd download), its frames referencing the source series."""
    import highdicom as hd
    import pydicom
    import slicerio

    if not (data_root / "dicom_ct").is_dir():
        pytest.skip(f"{DICOM_CT} not present (shared data)")
    page = browser_page
    open_path(page, "dicom_ct")
    wait_state(page, "s('opened') === 'dicom_ct' || (s('error') || '').includes('dicom_ct')")  # not an earlier error
    assert state(page, "error") == "" and state(page, "is_dicom") is True
    segment_and_wait(page)
    assert state(page, "error") == ""
    engine_voxels, rois = state(page, "voxels"), state(page, "rois")
    assert rois, "the engine found no RoI on this CT: nothing to correct"
    middle = len(rois) // 2
    page.locator(".roi-row").nth(middle).click()  # a correction: delete a box and the mask inside it
    wait_state(page, f"s('selected_roi') === {rois[middle]['id']}")
    page.click("#delete")
    wait_state(page, f"s('rois').length === {len(rois) - 1} && s('status').startsWith('Deleted')")
    voxels = state(page, "voxels")
    assert voxels < engine_voxels, "the correction changed nothing: this test would not tell the two SEGs apart"
    downloads = {}
    for button in ("#download-dicom-seg", "#download-seg"):
        with page.expect_download(timeout=WAIT_MS) as info:
            page.click(button)
        downloads[button] = tmp_path / info.value.suggested_filename
        info.value.save_as(downloads[button])
    seg = hd.seg.segread(str(downloads["#download-dicom-seg"]))
    sources = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in (data_root / "dicom_ct").iterdir()}
    referenced = {ref.ReferencedSOPInstanceUID for fr in seg.PerFrameFunctionalGroupsSequence
                  for ref in fr.DerivationImageSequence[0].SourceImageSequence}
    assert referenced <= sources and referenced
    assert int(np.count_nonzero(seg.pixel_array)) == voxels
    assert np.count_nonzero(slicerio.read_segmentation(str(downloads["#download-seg"]))["voxels"]) == voxels


def test_no_request_left_127_0_0_1(browser_page):
    assert browser_page.outside_requests == []
