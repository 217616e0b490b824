"""Batch mode (lsnet.app.batch + ``lsnet segment`` on a folder / CSV): summary, continue after failure, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lsnet.app import batch
from lsnet.app.cli import main
from reliability_helpers import one_thread, tiny_weights  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _ct(path: Path, k: int = 3, size: int = 64) -> Path:
    a = np.full((k, size, size), -1000, np.int16)
    a[:, 16:48, 12:52] = 40
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((2.0, 2.0, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def cases_dir(tmp_path) -> Path:
    d = tmp_path / "cases"
    _ct(d / "alpha.nrrd")
    _ct(d / "sub" / "beta.nii.gz", k=2)
    (d / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")  # looks like a case, is not an image
    (d / "notes.txt").write_text("not a case")
    return d


def _run(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


def _summary(out: Path) -> dict:
    with open(out / batch.SUMMARY_NAME, newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def test_discover_cases(cases_dir, tmp_path):
    cases = batch.discover_cases(cases_dir, tmp_path / "out")
    assert [c.name for c in cases] == ["alpha", "broken", "sub/beta"]
    assert cases[2].outdir == tmp_path / "out" / "sub" / "beta"
    assert batch.is_batch_input(cases_dir, tmp_path / "out")
    assert not batch.is_batch_input(cases_dir / "alpha.nrrd")


def test_output_root_inside_input_is_skipped(cases_dir):
    out = cases_dir / "results"
    _ct(out / "alpha" / "old_result.nrrd")
    assert [c.name for c in batch.discover_cases(cases_dir, out, skip=out)] == ["alpha", "broken", "sub/beta"]


def test_folder_batch_continues_and_resumes(cases_dir, tmp_path, tiny_weights, capsys):
    out = tmp_path / "out"
    args = ["segment", str(cases_dir), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q"]
    rc, stdout, _ = _run(args, capsys)
    assert rc == 2  # one case failed
    rows = _summary(out)
    assert [rows[c]["status"] for c in ("alpha", "broken", "sub/beta")] == ["done", "failed", "done"]
    assert rows["alpha"]["slices"] == "3" and rows["sub/beta"]["slices"] == "2"
    assert "not an image" in rows["broken"]["message"]
    for header in ("CASE", "STATUS", "SLICES", "RoIs", "VOXELS", "SECONDS", "MESSAGE"):
        assert header in stdout
    assert (out / "alpha" / "segmentation.seg.nrrd").is_file() and (out / "sub" / "beta" / "boxes.json").is_file()
    assert not (out / "broken").exists() or not any((out / "broken").iterdir())
    state = json.loads((out / batch.STATE_NAME).read_text())
    assert state["cases"]["alpha"]["status"] == "done"

    # resume: done cases are skipped (files untouched), the failed one is tried again
    mtime = (out / "alpha" / "segmentation.seg.nrrd").stat().st_mtime_ns
    (cases_dir / "broken.nii.gz").unlink()
    _ct(cases_dir / "broken.nii.gz", k=1)  # the user fixed it
    rc, stdout, _ = _run(args, capsys)
    assert rc == 0
    rows = _summary(out)
    assert [rows[c]["status"] for c in ("alpha", "broken", "sub/beta")] == ["skipped", "done", "skipped"]
    assert (out / "alpha" / "segmentation.seg.nrrd").stat().st_mtime_ns == mtime
    assert "done in a previous run" in stdout

    # a deleted output makes its case run again; a changed input too
    (out / "sub" / "beta" / "boxes.json").unlink()
    _ct(cases_dir / "alpha.nrrd", k=4)
    rc, _, err = _run(args, capsys)
    rows = _summary(out)
    # alpha changed but its old outputs exist: refused (never overwritten without --overwrite)
    assert rows["alpha"]["status"] == "failed" and "--overwrite" in rows["alpha"]["message"]
    assert rows["sub/beta"]["status"] == "failed"  # its other outputs still exist: same rule
    assert rows["broken"]["status"] == "skipped"
    rc, _, _ = _run(args + ["--overwrite"], capsys)
    rows = _summary(out)
    assert rc == 0 and rows["alpha"]["slices"] == "4" and rows["sub/beta"]["status"] == "done"


def test_csv_batch(tmp_path, tiny_weights, capsys):
    a = _ct(tmp_path / "data" / "a.nrrd")
    b = _ct(tmp_path / "data" / "b.nrrd", k=2)
    listing = tmp_path / "list.csv"
    listing.write_text(f"input,output\ndata/a.nrrd,\n{b},custom/b_out\nmissing.nrrd,\n")
    out = tmp_path / "out"
    rc, _, _ = _run(["segment", str(listing), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q"], capsys)
    assert rc == 2
    rows = _summary(out)
    assert rows["a"]["status"] == "done" and rows["b"]["status"] == "done" and rows["missing"]["status"] == "failed"
    assert "not found" in rows["missing"]["message"].lower()
    assert (out / "a" / "segmentation.seg.nrrd").is_file()
    assert (tmp_path / "custom" / "b_out" / "segmentation.seg.nrrd").is_file()
    assert a.is_file()


def test_csv_without_input_column(tmp_path, capsys, tiny_weights):
    listing = tmp_path / "list.csv"
    listing.write_text("path\nx.nrrd\n")
    rc, _, err = _run(["segment", str(listing), "-o", str(tmp_path / "o"), "--weights", str(tiny_weights), "-q"], capsys)
    assert rc == 2 and "'input' column" in err


def test_run_batch_internal_error_and_cancel(tmp_path):
    cases = [batch.Case(n, tmp_path / f"{n}.nrrd", tmp_path / "o" / n) for n in ("a", "b", "c", "d")]
    for c in cases:
        _ct(c.input, k=1, size=8)

    def process(case):
        if case.name == "a":
            raise ZeroDivisionError("bug")
        if case.name == "c":
            raise KeyboardInterrupt
        return {"slices": 1, "rois": 0, "voxels": 0, "outputs": {}}

    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(cases, process, tmp_path / "o")
    rows = _summary(tmp_path / "o")
    assert [rows[n]["status"] for n in "abcd"] == ["error", "done", "cancelled", "not run"]
    assert "ZeroDivisionError" in rows["a"]["message"]
    table = batch.format_table([batch.CaseRow("a", "done", 1, 0, 0, 0.5, "x" * 200)], max_message=20)
    assert table.splitlines()[2].endswith("...") and len(table.splitlines()) == 3


def test_dicom_series_are_cases(shared_data, tmp_path, tiny_weights, capsys):
    """A folder of two DICOM series (linked) and one NRRD: three cases; --dicom-seg only for DICOM ones."""
    ct = shared_data / "dcmqi-ct-3slice" / "ct"
    if not ct.is_dir():
        pytest.skip(f"{ct} not present")
    d = tmp_path / "study"
    d.mkdir()
    (d / "ct_a").symlink_to(ct, target_is_directory=True)
    _ct(d / "phantom.nrrd", k=2)
    out = tmp_path / "out"
    rc, _, _ = _run(["segment", str(d), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q", "--dicom-seg"], capsys)
    assert rc == 0
    rows = _summary(out)
    assert rows["ct_a"]["status"] == "done" and rows["phantom"]["status"] == "done"
    assert (out / "ct_a" / "segmentation.dcm").is_file()
    assert not (out / "phantom" / "segmentation.dcm").exists()


def test_cli_batch_interrupt_keeps_finished_cases(cases_dir, tmp_path, tiny_weights, capsys, monkeypatch):
    from lsnet.app import cli

    calls = []
    original = cli._run

    def run(args, src, outdir, reporter, extra_files=None, segmenter=None):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(args, src, outdir, reporter, extra_files, segmenter)

    monkeypatch.setattr(cli, "_run", run)
    out = tmp_path / "out"
    args = ["segment", str(cases_dir), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q"]
    rc, _, err = _run(args, capsys)
    assert rc == 3 and "resume" in err and "1 finished case(s) are kept" in err
    rows = _summary(out)
    assert [rows[c]["status"] for c in ("alpha", "broken", "sub/beta")] == ["done", "cancelled", "not run"]
    monkeypatch.setattr(cli, "_run", original)
    rc, _, _ = _run(args, capsys)
    rows = _summary(out)
    assert [rows[c]["status"] for c in ("alpha", "broken", "sub/beta")] == ["skipped", "failed", "done"]
