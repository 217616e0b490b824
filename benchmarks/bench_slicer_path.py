"""What a user waits for after clicking Segment: the Slicer module's path, stage by stage.

    python benchmarks/bench_slicer_path.py --device cpu --slices 300 \
        --real-ct /work/shared/data/pancreas-ct/PANCREAS_0001 --repeats 3 --out results/slicer_path_cpu.json

``LSNetSegmentationLogic.process()`` (``LSNetSegmentationLib/logic.py``) writes the input volume to an
uncompressed ``input.nrrd``, starts ``python -m lsnet.app.cli segment input.nrrd -o out --progress-json``
in a child process (``LSNetSegmentationLib.process``: the same command line, environment and reader
thread are used here), polls its JSON events, then imports the outputs into the scene
(``loadResults``: segmentation, heatmap, RoI table).  Stages, per run:

* ``input_export``  the input written as an uncompressed ``.nrrd`` with SimpleITK.  **Stand-in** for
                    ``slicer.util.exportNode`` (same file format and compression; Slicer's own writer
                    is not timed here);
* ``child_start``   from ``Popen`` to the CLI entering its segment command: interpreter start, the
                    (torch-free) CLI import, argument parsing, pipe latency.  Derived: (time the ``done``
                    event arrived - spawn time) - the CLI's own ``summary.seconds``;
* ``model_load``    **import of torch and the engine** (the CLI imports them lazily, inside its timed
                    section), weights checked and read, model built and moved to the device: the CLI's
                    ``summary.seconds - (read + segment + write)``.  The CLI reports no split of the two;
* ``read``, ``segment``, ``write``  the CLI's own ``summary.timings`` (``read``, ``total``, ``write``);
* ``child_exit``    from the ``done`` event to the process having exited and its output drained;
* ``mrml_import``   ``LSNetSegmentationLogic.loadResults`` on the finished run - **only** when ``slicer``
                    is importable with a scene (inside Slicer, or slicer-core with a scene helper);
                    otherwise the row says "not run" and why, and its time to result excludes it.

The child's peak RAM is its ``VmHWM`` (``/proc/PID/status``) sampled while polling every 20 ms: a
lower bound of the true peak (the last sample before exit).  No timing is ever asserted by a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the engine on sys.path)
from common import ENGINE, ResultFile, log, median  # noqa: E402

STAGES = ("input_export", "child_start", "model_load", "read", "segment", "write", "child_exit", "mrml_import")
POLL_S = 0.02


def _vm_hwm_mb(pid: int):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


_SCENE = None  # keeps the real-scene helper alive for the whole benchmark


def slicer_scene_or_reason():
    """``(logic_class, None)`` when the Slicer module's logic can run against a real scene, else ``(None, why)``.

    Inside Slicer the application's scene is used; elsewhere a real slicer-core scene is built with the
    test suite's helper (``Testing/slicer_scene.py``: real MRML and module logics, shims for Qt only)."""
    global _SCENE
    try:
        import slicer  # noqa: F401
    except ImportError as e:
        return None, f"`import slicer` failed ({e})"
    if getattr(slicer, "mrmlScene", None) is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
        try:
            import slicer_scene

            why = slicer_scene.import_error()
            if why:
                return None, why
            _SCENE = slicer_scene.RealScene()
        except Exception as e:  # noqa: BLE001 - any failure means: no import stage, said in the row
            return None, f"no real scene could be built ({type(e).__name__}: {e})"
    try:
        from LSNetSegmentationLib.logic import LSNetSegmentationLogic
    except Exception as e:  # noqa: BLE001 - any failure means: no import stage
        return None, f"module logic not importable: {type(e).__name__}: {e}"
    return LSNetSegmentationLogic, None


def run_once(vol, workdir: Path, weights, device: str, batch_size: int, timeout: float, logic_class=None) -> dict:
    """One click on Segment, staged (see the module docstring)."""
    from LSNetSegmentationLib import process

    import SimpleITK as sitk

    workdir.mkdir(parents=True, exist_ok=True)
    inp, outdir = workdir / "input.nrrd", workdir / "out"
    t0 = time.perf_counter()
    sitk.WriteImage(vol.to_sitk(), str(inp), useCompression=False)
    t_export = time.perf_counter() - t0
    cmd = process.build_segment_command(sys.executable, inp, outdir, weights=str(weights) if weights else None,
                                        device=device, batch_size=batch_size)
    env = process.child_environment(os.environ, ENGINE)
    proc = process.SegmentationProcess(cmd, env=env)
    t_spawn = time.perf_counter()
    proc.start()
    first, hwm, logs = {}, None, []
    deadline = t_spawn + timeout
    while True:
        for ev in proc.poll():
            first.setdefault(ev.kind, time.perf_counter())
            if ev.kind == "log":
                logs.append(ev.text)
        if proc.running:
            hwm = _vm_hwm_mb(proc.proc.pid) or hwm
        if proc.finished:
            break
        if time.perf_counter() > deadline:
            proc.cancel()
            raise TimeoutError(f"child did not finish within {timeout:.0f} s")
        time.sleep(POLL_S)
    t_end = time.perf_counter()
    if not proc.succeeded:
        raise RuntimeError(f"child failed (rc {proc.returncode}): {proc.error_message() or ''.join(logs)[-1500:]}")
    summary = proc.done_event.data["summary"]
    tim = summary["timings"]
    secs = float(summary["seconds"])
    t_done = first["done"] - t_spawn
    stages = {
        "input_export": t_export,
        "child_start": t_done - secs,
        "model_load": secs - tim["read"] - tim["total"] - tim["write"],
        "read": tim["read"],
        "segment": tim["total"],
        "write": tim["write"],
        "child_exit": t_end - first["done"],
    }
    run = {"stages": stages, "first_progress_s": (first["progress"] - t_spawn) if "progress" in first else None,
           "slices": summary["slices"], "rois": summary["rois"], "voxels": summary["voxels"], "peak_rss_child_mb": hwm,
           "outputs": sorted(Path(p).name for p in proc.done_event.data.get("outputs", {}).values())}
    if logic_class is not None:
        import slicer

        node = slicer.util.loadVolume(str(inp))
        logic = logic_class()
        logic._outputDir = workdir  # loadResults reads <_outputDir>/out, as after startSegmentation
        t1 = time.perf_counter()
        logic.loadResults(proc, node, None, replaceExisting=False, showHeatmap=True, heatmapOpacity=0.5)
        stages["mrml_import"] = time.perf_counter() - t1
    run["total"] = sum(stages.values())
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (what the module passes)")
    ap.add_argument("--slices", type=int, nargs="*", default=[300], help="synthetic CTs (512 x 512 x K); none: only real CT")
    ap.add_argument("--hw", type=int, default=512)
    ap.add_argument("--real-ct", action="append", default=[], metavar="PATH", help="a real CT (file or DICOM folder); repeatable")
    ap.add_argument("--sample-ct", metavar="PATH", help="the reduced sample CT shipped with the extension (any path)")
    ap.add_argument("--weights", help="model file (default: the benchmark model: the bundled one, or random with LSNET_BENCH_RANDOM=1)")
    ap.add_argument("--batch-size", type=int, default=8, help="the module's default is 8")
    ap.add_argument("--repeats", "--repeat", dest="repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800, help="per run, seconds")
    ap.add_argument("--workdir", default="/tmp/lsnet_bench_slicer")
    ap.add_argument("--out", default="benchmarks/results/slicer_path.json")
    a = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    from lsnet.io.volume import read_volume

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inputs = []
    for k in a.slices:
        inputs.append((f"synthetic {a.hw}x{a.hw}x{k}", common.make_ct(work / f"ct_{a.hw}x{a.hw}x{k}.nrrd", k, a.hw)))
    inputs += [(f"real CT {Path(p).name}", Path(p)) for p in a.real_ct]
    if a.sample_ct:
        inputs.append((f"sample CT {Path(a.sample_ct).name}", Path(a.sample_ct)))
    if not inputs:
        raise SystemExit("no input: give --slices, --real-ct or --sample-ct")
    logic_class, why_not = slicer_scene_or_reason()
    rf = ResultFile(a.out, "slicer_path", vars(a))
    rf.doc["command"] = "python benchmarks/bench_slicer_path.py " + " ".join(shlex.quote(x) for x in argv)
    rf.doc["method"] = ("child process = LSNetSegmentationLib.process (the module's command line and reader); input export = "
                        "SimpleITK uncompressed .nrrd (stand-in for slicer.util.exportNode); child start and model load derived "
                        "from the CLI's done event; " + ("MRML import = LSNetSegmentationLogic.loadResults in a real scene"
                                                        if logic_class else f"MRML import not run: {why_not}"))
    weights = a.weights
    if not weights:
        weights, info = common.build_bench_model(inputs[0][1], work)
        rf.doc["model"] = info
    for label, path in inputs:
        def bench(label=label, path=path):
            vol = read_volume(path)  # in Slicer the volume is already in the scene: not timed
            runs = []
            for i in range(a.repeats):
                runs.append(run_once(vol, work / f"run_{''.join(c if c.isalnum() else '_' for c in label)}_{i}", weights, a.device,
                                     a.batch_size, a.timeout, logic_class))
                log(f"    {label}: run {i + 1}/{a.repeats} {runs[-1]['total']:.2f} s")
            keys = [k for k in STAGES if k in runs[0]["stages"]]
            return {"runs": runs, "n_runs": len(runs), "median_total_s": median([r["total"] for r in runs]),
                    "min_total_s": min(r["total"] for r in runs), "max_total_s": max(r["total"] for r in runs),
                    "median_stages_s": {k: median([r["stages"][k] for r in runs]) for k in keys},
                    "peak_rss_child_mb": max((r["peak_rss_child_mb"] or 0) for r in runs) or None,
                    "mrml_import": "measured" if logic_class else "not run", "mrml_import_reason": why_not,
                    "slices": runs[0]["slices"], "rois": runs[0]["rois"]}

        rf.guarded("slicer_path", bench, input_label=label, input_path=str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
