"""Smoke test of benchmarks/: every script runs on a tiny input with --quick (CPU) and writes its JSON.

Speed is not checked here (docs/benchmarks.md has the measurements); what is checked is that each
script completes, records results instead of errors, that GPU-only runs skip cleanly without CUDA,
and that report.py turns the JSON into tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _run(args, tmp_path, timeout=600):  # a guard against hangs, not a speed check (a loaded 2-core CI machine is slow)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "LSNetSegmentation"), str(ROOT), env.get("PYTHONPATH", "")])
    env["LSNET_BENCH_RANDOM"] = "1"  # a random model of the bundled config: no dependency on the bundled file
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _results(path):
    doc = json.loads(Path(path).read_text())
    assert doc["env"]["torch"] and doc["env"]["date"]
    return doc, doc["results"]


def test_e2e_quick_lsnet_and_3d_peer(tmp_path):
    out = tmp_path / "e2e.json"
    _run([str(BENCH / "bench_e2e.py"), "--quick", "--systems", "lsnet,unet3d", "--workdir", str(tmp_path / "w"), "--out", str(out)], tmp_path)
    doc, res = _results(out)
    by = {r["system"]: r for r in res}
    assert set(by) == {"lsnet", "unet3d"}
    for r in by.values():
        assert "error" not in r, r.get("error")
        assert r["median_total_s"] > 0 and r["peak_rss_mb"] > 0
        assert (tmp_path / "w" / f"out_{r['system']}_synthetic_64x64x12" / "prof0" / "segmentation.seg.nrrd").is_file()
        # every row says what ran: all slices / all patches, network time measured
        assert r["network_time"] == "measured" and r["work_run"] == r["work_total"] > 0
    assert by["lsnet"]["work_unit"] == "slice" and by["lsnet"]["work_total"] == 12
    assert by["unet3d"]["patches_run"] == by["unet3d"]["patches_total"] >= 1
    st = by["lsnet"]["median_stages_s"]
    assert set(st) >= {"read", "preprocess", "lnet", "decode_rr", "snet", "postprocess", "write"}
    assert st["lnet"] > 0
    # the random model's L-Net is calibrated to fire on a quarter of the slices
    assert 0.0 < by["lsnet"]["slices_with_rois_fraction"] <= 0.6
    assert doc["model"]["weights"] == "random"


def test_networks_and_training_quick(tmp_path):
    net, tr = tmp_path / "net.json", tmp_path / "train.json"
    _run([str(BENCH / "bench_networks.py"), "--quick", "--device", "cpu", "--out", str(net)], tmp_path)
    _, res = _results(net)
    assert {r["net"] for r in res} >= {"lnet", "snet", "unet2d_resnet34"}
    assert all("error" not in r and r["slices_per_s"] > 0 and r["gflop_per_slice"] > 0 for r in res)
    _run([str(BENCH / "bench_training.py"), "--quick", "--device", "cpu", "--out", str(tr)], tmp_path)
    _, res = _results(tr)
    assert len(res) == 1 and "error" not in res[0], res[0].get("error")
    assert res[0]["slices_per_s"] > 0 and res[0]["schedule"]["all_slices_minutes"] > 0
    md = _run([str(BENCH / "report.py"), str(tmp_path)], tmp_path).stdout
    assert "Network throughput" in md and "Training throughput" in md and "| lnet |" in md


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA skip path")
def test_gpu_benchmarks_skip_cleanly_without_cuda(tmp_path):
    for script in ("bench_networks.py", "bench_training.py"):
        out = tmp_path / f"{script}.json"
        _run([str(BENCH / script), "--device", "cuda", "--out", str(out)], tmp_path, timeout=300)
        _, res = _results(out)
        assert len(res) == 1 and "no CUDA" in res[0]["skipped"]


def _e2e_3d(tmp_path, *extra):
    """The 3-D peer alone on a CT whose 1.5 mm grid (8 x 68 x 68) needs 4 patches of 64^3 (a few s on 1 core)."""
    out = tmp_path / "e2e3d.json"
    _run([str(BENCH / "bench_e2e.py"), "--slices", "12", "--hw", "128", "--repeats", "1", "--profile-all", "--patch-3d", "64",
          "--threads", "1", "--systems", "unet3d", "--workdir", str(tmp_path / "w"), "--out", str(out), *extra], tmp_path, timeout=300)
    doc, res = _results(out)
    assert len(res) == 1 and "error" not in res[0], res[0].get("error")
    md = _run([str(BENCH / "report.py"), str(out)], tmp_path).stdout
    return doc, res[0], md


def test_e2e_3d_peer_default_runs_the_whole_sliding_window(tmp_path):
    """Issue 15: the default once ran 0 of 48 patches (``starts[:0]``) and reported that as the peer's time."""
    doc, r, md = _e2e_3d(tmp_path)
    assert doc["inputs"][0]["unet3d_patches_total"] == 4  # computed from the input, not by the run
    assert r["patches_run"] >= 1
    assert r["patches_run"] == r["patches_total"] == 4
    assert r["network_time"] == "measured" and "network_measured_s" not in r["runs"][0]
    assert "| unet3d | 1 |" in md and "measured (4/4 patches)" in md and "extrapolated" not in md
    assert "command: `python benchmarks/bench_e2e.py --slices 12" in md and "git commit" in md


def test_e2e_3d_peer_partial_window_is_labelled_extrapolated(tmp_path):
    _, r, md = _e2e_3d(tmp_path, "--max-patches-3d", "1")
    assert (r["patches_run"], r["patches_total"], r["network_time"]) == (1, 4, "extrapolated")
    run = r["runs"][0]
    assert run["stages"]["network"] > run["network_measured_s"] > 0  # scaled up to the 4 patches
    assert "**extrapolated** from 1/4 patches" in md and "measured (" not in md


def test_a_run_that_did_no_work_is_an_error_not_a_row():
    sys.path.insert(0, str(BENCH))
    from bench_e2e import work_label

    assert work_label("patch", 48, 48)["network_time"] == "measured"
    assert work_label("patch", 2, 48)["network_time"] == "extrapolated"
    for run, total in ((0, 48), (0, 0), (49, 48)):
        with pytest.raises(RuntimeError):
            work_label("patch", run, total)


def test_slicer_path_stages_from_the_real_child_process(tmp_path):
    """bench_slicer_path.py runs the module's child command (LSNetSegmentationLib.process) and splits its time."""
    out = tmp_path / "slicer_path.json"
    _run([str(BENCH / "bench_slicer_path.py"), "--slices", "12", "--hw", "64", "--repeats", "1", "--workdir", str(tmp_path / "w"),
          "--out", str(out)], tmp_path, timeout=300)
    doc, res = _results(out)
    assert len(res) == 1 and "error" not in res[0], res[0].get("error")
    r = res[0]
    run = r["runs"][0]
    assert run["slices"] == 12 and "segmentation.seg.nrrd" in run["outputs"] and "heatmap.nrrd" in run["outputs"]
    st = run["stages"]
    assert {"input_export", "child_start", "model_load", "read", "segment", "write", "child_exit"} <= set(st)
    assert st["child_start"] > 0 and st["model_load"] > 0 and st["segment"] > 0  # derived stages are consistent
    assert abs(sum(st.values()) - run["total"]) < 1e-9
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import slicer_scene

    if slicer_scene.import_error() is None:  # real slicer-core: the MRML import runs on a real scene
        assert r["mrml_import"] == "measured" and st["mrml_import"] > 0
    else:  # the import stage is never faked
        assert r["mrml_import"] == "not run" and r["mrml_import_reason"] and "mrml_import" not in st
    md = _run([str(BENCH / "report.py"), str(out)], tmp_path).stdout
    assert "Time to result after Segment" in md and "| synthetic 64x64x12 | 1 |" in md
