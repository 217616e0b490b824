"""End-to-end benchmark: CT file in -> segmentation files out, L-SNet and its peers, split into stages.

    python benchmarks/bench_e2e.py --device cpu --slices 300 --repeats 3 --out results/e2e_cpu.json

For every slice count a synthetic 512 x 512 x K int16 CT is written UNCOMPRESSED (.nrrd) to
``--workdir``; every system then runs in its own child process (so its peak RAM is its own):

* ``lsnet``        the ``lsnet segment`` path through the engine's own code: ``read_volume`` ->
                   ``Segmenter.segment_volume`` -> ``write_outputs`` with the CLI's default outputs
                   (.seg.nrrd, heatmap.nrrd, boxes.json, rois.mrk.json);
* ``lsnet_noheat`` the same with ``--no-heatmap``;
* ``lsnet_cl``     CPU only: the model converted to channels-last (what the engine does on CUDA);
* ``lsnet_cl_noheat`` CPU only: both;
* ``unet2d``, ``coarse_to_fine``, ``unet3d``: the peers of ``benchmarks/peers.py`` (random weights),
                   reading the same file and writing a .seg.nrrd with the same writer;
* ``cli``          (``--cli``) the real ``lsnet.app.cli.main(["segment", ...])`` in a child: its own timings
                   (read + segment + write, excluding start-up and model loading) and its wall time.

Inputs: synthetic CTs (``--slices``), real CTs (``--real-ct PATH``, files or DICOM folders, repeatable)
and the shipped sample CT (``--sample-ct PATH``), all in one run so ratios to ``lsnet`` on the same input
come from the same session.  ``--repeat N`` runs each system N times (median, min, max); a system whose
first run takes longer than ``--single-run-over`` seconds (default 60) runs once.  ``--max-patches-3d``
0 (default) runs the 3-D peer's whole sliding window; every row records ``network_time`` ("measured"
or "extrapolated") and what ran (``work_run``/``work_total`` slices or patches; ``patches_run``/
``patches_total`` for the 3-D peer).  ``--estimate-only`` prints the expected runtime and stops.

Stage split (the ``profile`` runs): ``read``; ``preprocess`` = canonical view + output allocation +
per-batch slice stacking, window, resampling and host->device copy; ``lnet``; ``decode_rr`` = heatmap
decoding + theta + RoI sampling; ``snet``; ``postprocess`` = paste-back, max-merge, heatmap resampling,
device->host copy and storing; ``write``.  The engine is timed by wrapping its functions and module
forwards in the child process (``ProfilingSegmenter``), with ``torch.cuda.synchronize`` at every
border in profiled runs only; the headline time comes from unprofiled runs (on CUDA) so the
synchronisations do not inflate it.  Times exclude Python start-up and model loading (the first,
warm-up run on a short volume initialises cuDNN/oneDNN and is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the engine on sys.path)
import numpy as np  # noqa: E402
from common import ResultFile, current_rss_mb, log, median, peak_rss_mb, write_json  # noqa: E402

LSNET_SYSTEMS = ("lsnet", "lsnet_noheat", "lsnet_cl", "lsnet_cl_noheat")
PEER_SYSTEMS = ("unet2d", "coarse_to_fine", "unet3d")
STAGES = ("read", "preprocess", "lnet", "decode_rr", "snet", "postprocess", "write")


# ============================================================================================ child side
def work_label(unit: str, run: int, total: int) -> dict:
    """What a run did: ``network_time`` is "measured" when every unit (slice, 3-D patch) ran, "extrapolated"
    when only ``run`` of ``total`` did.  A run that did no work is an error, never a result row."""
    if total is None or total <= 0 or run <= 0:
        raise RuntimeError(f"the system ran {run} of {total} {unit}es" if unit == "patch" else f"the system ran {run} of {total} {unit}s")
    if run > total:
        raise RuntimeError(f"ran {run} {unit}(es) of {total}: inconsistent count")
    return {"network_time": "measured" if run == total else "extrapolated", "work_unit": unit, "work_run": int(run), "work_total": int(total)}


def _profiling_segmenter_class():
    import torch

    import lsnet.pipeline.inference as inf
    from lsnet.pipeline.inference import Segmenter

    class ProfilingSegmenter(Segmenter):
        """``Segmenter`` whose per-batch work is timed by stage (benchmark only; the engine is untouched).

        ``channels_last_cpu`` also converts the model to channels-last on the CPU (the engine does it on
        CUDA only), to measure that change without editing the engine.
        """

        WRAPPED = {"window": "preprocess", "to_canvas": "preprocess", "decode": "decode_rr", "theta_from_box": "decode_rr",
                   "recalibrate": "decode_rr", "paste_back": "postprocess", "canvas_to_original": "postprocess"}

        def __init__(self, *a, channels_last_cpu: bool = False, **kw):
            self._cl_cpu = channels_last_cpu
            self.profile = False
            self.acc: dict[str, float] = {}
            super().__init__(*a, **kw)
            self._wrap_functions()
            for name, mod in (("lnet", self.model.lnet), ("snet", self.model.snet)):
                mod.register_forward_pre_hook(self._pre_hook(name))
                mod.register_forward_hook(self._post_hook(name))

        def _to_device(self, device):
            super()._to_device(device)
            if self._cl_cpu and device.type == "cpu":
                self.model.to(memory_format=torch.channels_last)

        def _sync(self):
            if self.profile and self.device.type == "cuda":
                torch.cuda.synchronize()

        def _add(self, stage, dt):
            self.acc[stage] = self.acc.get(stage, 0.0) + dt

        def _wrap_functions(self):
            seg = self
            for fname, stage in self.WRAPPED.items():
                orig = getattr(inf, fname)
                if getattr(orig, "_bench_wrapped", False):
                    orig = orig._bench_orig

                def wrapper(*a, _orig=orig, _stage=stage, **kw):
                    if not seg.profile:
                        return _orig(*a, **kw)
                    seg._sync()
                    t0 = time.perf_counter()
                    r = _orig(*a, **kw)
                    seg._sync()
                    seg._add(_stage, time.perf_counter() - t0)
                    return r

                wrapper._bench_wrapped = True
                wrapper._bench_orig = orig
                setattr(inf, fname, wrapper)

        def _pre_hook(self, name):
            def hook(mod, args):
                if self.profile:
                    self._sync()
                    self._t_mod = time.perf_counter()

            return hook

        def _post_hook(self, name):
            def hook(mod, args, out):
                if self.profile:
                    self._sync()
                    self._add(name, time.perf_counter() - self._t_mod)

            return hook

        def _run_batch(self, raw, grid, want_heatmap):
            if not self.profile:
                return super()._run_batch(raw, grid, want_heatmap)
            self._sync()
            t0 = time.perf_counter()
            before = sum(self.acc.values())
            out = super()._run_batch(raw, grid, want_heatmap)  # ends with .cpu(): synchronised
            rest = time.perf_counter() - t0 - (sum(self.acc.values()) - before)
            self._add("batch_other", rest)  # H2D copy, sigmoid, zero-init, merge, D2H copy
            return out

    return ProfilingSegmenter


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all threads): less sensitive than wall time to other
    processes competing for the cores."""
    t = os.times()
    return t.user + t.system


def _gpu_mem_reset(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb(dev):
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None


def _child_lsnet(a, dev, res):
    import torch

    from lsnet.architectures import load_model
    from lsnet.io.outputs import write_outputs
    from lsnet.io.volume import read_volume

    heat = not a.system.endswith("noheat")
    Seg = _profiling_segmenter_class()
    model, card = load_model(a.model, device="cpu")
    seg = Seg(model=model, card=card, device=str(dev), batch_size=a.batch_size, channels_last_cpu=a.system.startswith("lsnet_cl"))
    res["rss_after_load_mb"] = round(current_rss_mb(), 1)
    res["gpu_weights_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1) if dev.type == "cuda" else None

    def one(outdir, profile):
        seg.profile = profile
        seg.acc = {}
        _gpu_mem_reset(dev)
        c0, la = _cpu_s(), os.getloadavg()[0]
        done = {"run": 0, "total": None}

        def progress(d, total, info):
            done["run"], done["total"] = d, total

        t0 = time.perf_counter()
        vol = read_volume(a.input)
        t1 = time.perf_counter()
        r = seg.segment_volume(vol, heatmap=heat, progress=progress)
        t2 = time.perf_counter()
        write_outputs(r, outdir, overwrite=True, heatmap=heat)
        t3 = time.perf_counter()
        run = {"total": t3 - t0, "read": t1 - t0, "segment": t2 - t1, "write": t3 - t2, "profiled": profile, "gpu_peak_mb": _gpu_peak_mb(dev),
               "cpu_s": _cpu_s() - c0, "loadavg_1min_before": la,
               "volume_step": r.timings.get("volume_step"), "slices_with_mask": r.slices_with_mask}
        if profile:
            acc = dict(seg.acc)
            tim = r.timings
            inner = sum(acc.values())
            # canonical view + allocation (engine timing) + stack_channels and storing per batch
            loop_host = tim["total"] - tim["preprocess"] - inner - tim.get("postprocess", 0.0)
            run["stages"] = {
                "read": t1 - t0,
                "preprocess": tim["preprocess"] + acc.get("preprocess", 0.0),
                "lnet": acc.get("lnet", 0.0),
                "decode_rr": acc.get("decode_rr", 0.0),
                "snet": acc.get("snet", 0.0),
                "postprocess": acc.get("postprocess", 0.0) + acc.get("batch_other", 0.0) + tim.get("postprocess", 0.0) + max(0.0, loop_host),
                "write": t3 - t2,
            }
            run["stage_detail"] = {"engine_timings": {k: round(v, 4) for k, v in tim.items()}, "wrapped": {k: round(v, 4) for k, v in acc.items()}, "host_loop": round(loop_host, 4)}
        k = r.mask.shape[0]
        run.update(work_label("slice", done["run"], done["total"]))  # canonical slices the engine ran
        run["rois"] = len(r.boxes)
        run["rois_per_slice"] = len(r.boxes) / k
        run["slices_with_rois_fraction"] = len({b.slice_index for b in r.boxes}) / k
        run["mask_voxels"] = int(r.num_voxels)
        del r, vol
        return run

    _warmup(a, dev, lambda v: seg.segment_volume(v, heatmap=heat), snet=seg.model.snet, cfg=seg.config)
    return one


def _warmup(a, dev, fn, snet=None, cfg=None):
    """One short run (2 batches from the middle of the CT) so cuDNN/oneDNN set-up is not timed."""
    import torch

    from lsnet.io.geometry import Volume
    from lsnet.io.volume import read_volume

    vol = read_volume(a.input)
    k = vol.array.shape[0]
    n = min(k, 2 * a.batch_size)
    s = max(0, k // 2 - n // 2)
    fn(Volume(np.ascontiguousarray(vol.array[s : s + n]), vol.spacing, vol.origin, vol.direction))
    if snet is not None:
        with torch.inference_mode():
            x = torch.zeros(2, cfg.in_channels, cfg.roi_size, cfg.roi_size, device=dev)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    snet(x)
            else:
                snet(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _child_peer(a, dev, res):
    import peers
    import torch

    from lsnet.io.geometry import to_canonical
    from lsnet.io.outputs import write_outputs
    from lsnet.io.volume import read_volume
    from lsnet.results import SegmentationResult

    cl = dev.type == "cuda" or a.peer_channels_last
    vol0 = read_volume(a.input)
    can0, _ = to_canonical(vol0)
    if a.system == "unet2d":
        pipe = peers.UNet2DPipeline(a.peer_width, dev, a.batch_size, cl)
        pipe.calibrate(can0.array[can0.array.shape[0] // 2 :])
    elif a.system == "coarse_to_fine":
        pipe = peers.CoarseToFinePipeline(a.peer_width, dev, a.batch_size, cl)
        pipe.calibrate(np.asarray(can0.array[: common.BLOCK_SLICES]))
    else:
        peers.UNet3DPipeline.PATCH = a.patch_3d
        pipe = peers.UNet3DPipeline(dev, cl, patch_batch=a.patch_batch_3d, max_patches=a.max_patches_3d or None)
        pipe.calibrate(np.asarray(can0.array), can0.spacing)
    res["peer"] = {"system": pipe.name, "width": a.peer_width if a.system != "unet3d" else "32..320", "channels_last": cl, "weights": "random (bias-calibrated)"}
    res["rss_after_load_mb"] = round(current_rss_mb(), 1)
    card = {"name": f"peer-{pipe.name}"}

    def segment(vol):
        can, reo = to_canonical(vol)
        if a.system == "unet3d":
            m, t, info = pipe.run(np.asarray(can.array), can.spacing)
        else:
            m, t, info = pipe.run(can.array)
        return SegmentationResult(vol, np.ascontiguousarray(reo.to_input_array(m)), None, [], reo, card, str(dev), t), info

    def one(outdir, profile):
        _gpu_mem_reset(dev)
        c0, la = _cpu_s(), os.getloadavg()[0]
        t0 = time.perf_counter()
        vol = read_volume(a.input)
        t1 = time.perf_counter()
        r, info = segment(vol)
        t2 = time.perf_counter()
        write_outputs(r, outdir, overwrite=True, heatmap=False, boxes_json=False, markups=False)
        t3 = time.perf_counter()
        stages = {"read": t1 - t0, "write": t3 - t2}
        stages.update({k: v for k, v in r.timings.items()})
        run = {"total": t3 - t0, "read": t1 - t0, "segment": t2 - t1, "write": t3 - t2, "profiled": profile,
               "gpu_peak_mb": _gpu_peak_mb(dev), "stages": stages, "mask_voxels": int(np.count_nonzero(r.mask)), **info,
               "cpu_s": _cpu_s() - c0, "loadavg_1min_before": la}
        if a.system == "unet3d":
            run.update(work_label("patch", info["patches"], info["patches_total"]))
        else:
            run.update(work_label("slice", info["slices_run"], info["slices_total"]))
        if run["network_time"] == "extrapolated":
            # partial sliding window (--max-patches-3d N): scale the network time to all patches
            f = run["work_total"] / run["work_run"]
            run["network_measured_s"] = stages["network"]
            stages["network"] = stages["network"] * f
            run["total"] = run["total"] + run["network_measured_s"] * (f - 1)
            run["segment"] = run["segment"] + run["network_measured_s"] * (f - 1)
        del r, vol
        return run

    del vol0, can0
    if a.system != "unet3d":
        _warmup(a, dev, lambda v: segment(v))
    elif dev.type == "cuda":
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            p = a.patch_3d
            pipe.net(torch.zeros(a.patch_batch_3d, 1, p, p, p, device=dev).contiguous(memory_format=torch.channels_last_3d))
        torch.cuda.synchronize()
    return one


def child_main(a) -> int:
    import torch

    from lsnet.pipeline.device import describe, resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    res = {"system": a.system, "device": describe(dev), "batch_size": a.batch_size, "input": a.input}
    t_load = time.perf_counter()
    one = _child_lsnet(a, dev, res) if a.system in LSNET_SYSTEMS else _child_peer(a, dev, res)
    res["setup_and_warmup_s"] = round(time.perf_counter() - t_load, 3)
    runs = []
    outdir = Path(a.outdir)
    plain = a.repeats if dev.type == "cuda" or not a.profile_all else 0
    profiled = 1 if dev.type == "cuda" or not a.profile_all else a.repeats
    plan = [("plain", i, False) for i in range(plain)] + [("prof", i, True) for i in range(profiled)]
    for kind, i, prof in plan:
        runs.append(one(outdir / f"{kind}{i}", prof))
        n = plain if not prof else profiled
        print(f"    {a.system}: {'profiled ' if prof else ''}run {i + 1}/{n} {runs[-1]['total']:.3f} s", flush=True)
        if a.single_run_over and runs[-1]["total"] > a.single_run_over and len(runs) < len(plan):
            # a system over the limit runs once: its one run is both the timed and the staged run
            res["single_run_reason"] = f"first run {runs[-1]['total']:.0f} s > --single-run-over {a.single_run_over:g} s"
            print(f"    {a.system}: {res['single_run_reason']}: no more runs", flush=True)
            break
    timed = [r for r in runs if not r["profiled"]] or runs
    res["runs"] = runs
    res["n_timed_runs"] = len(timed)
    res["median_total_s"] = median([r["total"] for r in timed])
    res["min_total_s"] = min(r["total"] for r in timed)
    res["max_total_s"] = max(r["total"] for r in timed)
    labels = {(r["network_time"], r["work_unit"], r["work_run"], r["work_total"]) for r in runs}
    if len(labels) != 1:
        raise RuntimeError(f"runs of {a.system} did different work: {sorted(labels)}")
    for key in ("network_time", "work_unit", "work_run", "work_total"):
        res[key] = runs[0][key]
    if res["work_unit"] == "patch":
        res["patches_run"], res["patches_total"] = res["work_run"], res["work_total"]
    res["median_segment_s"] = median([r["segment"] for r in timed])
    res["median_cpu_s"] = median([r.get("cpu_s") for r in timed])
    res["loadavg_1min"] = [round(r.get("loadavg_1min_before", float("nan")), 2) for r in runs]
    prof = [r for r in runs if r["profiled"]]
    if prof and "stages" in prof[0]:
        keys = sorted({k for r in prof for k in r["stages"]})
        res["median_stages_s"] = {k: median([r["stages"].get(k) for r in prof]) for k in keys}
        res["profiled_total_s"] = median([r["total"] for r in prof])
    for key in ("rois_per_slice", "slices_with_rois_fraction", "rois", "fine_crops_per_slice", "resampled_shape"):
        if key in runs[0]:
            res[key] = runs[0][key]
    res["peak_gpu_mb"] = max((r["gpu_peak_mb"] or 0) for r in runs) if dev.type == "cuda" else None
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_json(a.result, res)
    return 0


def cli_child_main(a) -> int:
    """Run the real CLI in this process and record its summary and this process's peak RSS."""
    import contextlib
    import io

    from lsnet.app.cli import main

    argv = ["segment", a.input, "-o", a.outdir, "--weights", a.model, "--device", a.device, "--batch-size", str(a.batch_size), "--overwrite", "--progress-json"]
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    wall = time.perf_counter() - t0
    done = [json.loads(ln) for ln in buf.getvalue().splitlines() if ln.startswith("{") and '"done"' in ln]
    if rc != 0 or not done:
        raise RuntimeError(f"lsnet segment exited with {rc} and {'a' if done else 'no'} done event: {buf.getvalue()[-1500:]}")
    res = {"system": "cli", "rc": rc, "in_process_wall_s": wall, "peak_rss_mb": round(peak_rss_mb(), 1)}
    s = done[-1]["summary"]
    t = s["timings"]
    res["summary"] = s
    res["pipeline_s"] = t["read"] + t["total"] + t["write"]
    res.update(work_label("slice", s["slices"], s["slices"]))  # the CLI segments every slice or fails
    write_json(a.result, res)
    return 0 if rc == 0 else rc


# =========================================================================================== parent side
EST_S_PER_SLICE = {"lsnet": 7.0 / 300, "lsnet_noheat": 4.7 / 300, "lsnet_cl": 7.0 / 300, "lsnet_cl_noheat": 4.7 / 300,
                   "unet2d": 19.0 / 300, "coarse_to_fine": 122.0 / 300, "cli": 7.0 / 300}
"""Seconds per 512 x 512 slice on an idle 2-core CPU, from docs/benchmarks.md (history; coarse_to_fine only
from a loaded run, so an upper bound): used only to print a runtime estimate, never as a result."""
EST_S_PER_PATCH_3D = 9 * 60 / 48
"""One 128^3 patch of the 3-D peer on 2 cores: the full window of the 300-slice CT (48 patches) took ~9 min."""
EST_SETUP_S = 15.0  # child start-up, model load, warm-up (per system and input)


def input_list(a, work: Path) -> list[dict]:
    """The inputs of this run: synthetic CTs (``--slices``), then ``--real-ct`` and ``--sample-ct`` paths."""
    items = []
    for k in a.slices:
        ct = work / f"ct_{a.hw}x{a.hw}x{k}.nrrd"
        t0 = time.perf_counter()
        common.make_ct(ct, k, a.hw)
        log(f"CT {ct.name}: {ct.stat().st_size / 2**20:.0f} MiB ({time.perf_counter() - t0:.1f} s to make)")
        items.append({"label": f"synthetic {a.hw}x{a.hw}x{k}", "kind": "synthetic", "path": ct})
    for path in a.real_ct:
        items.append({"label": f"real CT {Path(path).name}", "kind": "real", "path": Path(path)})
    if a.sample_ct:
        items.append({"label": f"sample CT {Path(a.sample_ct).name}", "kind": "sample", "path": Path(a.sample_ct)})
    for it in items:
        if not it["path"].exists():
            raise SystemExit(f"input not found: {it['path']}")
    return items


def describe_input(path, patch: int = 128) -> dict:
    """Shape (K, J, I), spacing (x, y, z) mm and the 3-D peer's patch count of an input (reads it once)."""
    import peers

    from lsnet.io.geometry import to_canonical
    from lsnet.io.volume import read_volume

    can, _ = to_canonical(read_volume(path))
    k, h, w = can.array.shape
    sx, sy, sz = (float(v) for v in can.spacing)
    t = peers.UNet3DPipeline.TARGET_MM
    shape = (max(1, round(k * sz / t)), max(1, round(h * sy / t)), max(1, round(w * sx / t)))
    del can
    return {"shape_kji": [k, h, w], "spacing_xyz_mm": [sx, sy, sz], "unet3d_resampled_shape": list(shape),
            "unet3d_patch": patch, "unet3d_patches_total": patches_3d(shape, patch)}


def patches_3d(shape, patch: int = 128) -> int:
    import peers

    n = 1
    for size in shape:
        n *= len(peers.window_starts(max(size, patch), patch, patch // 2))
    return n


def estimate_seconds(systems, inputs: list[dict], repeats: int, single_run_over: float, max_patches_3d: int, patch: int) -> dict:
    """Rough runtime of the run from the figures above (printed at start; not a measurement)."""
    per = {}
    for it in inputs:
        d = it["info"]
        k = d["shape_kji"][0] * d["shape_kji"][1] * d["shape_kji"][2] / (512 * 512)  # in 512 x 512 slices
        for s in systems:
            if s == "unet3d":
                shape = d["unet3d_resampled_shape"]
                n = patches_3d(shape, patch)
                n = min(n, max_patches_3d) if max_patches_3d else n
                one = n * EST_S_PER_PATCH_3D * (patch / 128) ** 3 + 5
            else:
                one = EST_S_PER_SLICE.get(s, 0.05) * k
            runs = 1 if (s == "cli" or (single_run_over and one > single_run_over)) else repeats
            per[(s, it["label"])] = EST_SETUP_S + one * runs
    return per


def parent_main(a) -> int:
    import shlex

    import torch

    command = "python benchmarks/bench_e2e.py " + " ".join(shlex.quote(x) for x in (a.argv or []))
    if a.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: GPU end-to-end benchmark skipped")
        rf = ResultFile(a.out, "e2e", vars(a))
        rf.doc["command"] = command
        rf.add({"name": "e2e", "skipped": "no CUDA device (torch.cuda.is_available() is False)"})
        return 0
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    if a.device != "cpu":
        systems = [s for s in systems if not s.startswith("lsnet_cl")]  # identical to lsnet on CUDA
    inputs = input_list(a, work)
    for it in inputs:
        it["info"] = describe_input(it["path"], a.patch_3d)
    est = estimate_seconds(systems, inputs, a.repeats, a.single_run_over, a.max_patches_3d, a.patch_3d)
    log(f"estimated runtime (from older idle-CPU figures; not a measurement): ~{sum(est.values()) / 60:.0f} min for "
        f"{len(systems)} systems x {len(inputs)} inputs")
    for (s, label), sec in est.items():
        log(f"    {s:>16} on {label}: ~{sec / 60:.1f} min")
    if a.estimate_only:
        return 0
    rf = ResultFile(a.out, "e2e", vars(a))
    rf.doc["command"] = command
    rf.doc["inputs"] = [{"label": it["label"], "kind": it["kind"], "path": str(it["path"]), **it["info"]} for it in inputs]
    rf.doc["estimate_min"] = round(sum(est.values()) / 60, 1)
    model_path, model_info = common.build_bench_model(inputs[0]["path"], work, width=a.width)
    peer_width = a.peer_width or int(model_info.get("width") or a.width)
    rf.doc["model"] = model_info
    for it in inputs:
        ct, info = it["path"], it["info"]
        k = info["shape_kji"][0]
        tag = "".join(c if c.isalnum() else "_" for c in it["label"])
        for system in systems:
            repeats = a.repeats_large if (k > 500 and a.repeats_large) else a.repeats

            def run(system=system, repeats=repeats, tag=tag, ct=ct):
                outdir = work / f"out_{system}_{tag}"
                result = work / f"child_{system}_{tag}.json"
                if system == "cli":
                    cmd = [sys.executable, __file__, "--cli-child", "--input", str(ct), "--model", str(model_path), "--device", a.device,
                           "--batch-size", str(a.batch_size), "--outdir", str(outdir), "--result", str(result)]
                else:
                    cmd = [sys.executable, __file__, "--child", "--system", system, "--input", str(ct), "--model", str(model_path),
                           "--device", a.device, "--batch-size", str(a.batch_size), "--repeats", str(repeats), "--outdir", str(outdir),
                           "--result", str(result), "--peer-width", str(peer_width), "--patch-3d", str(a.patch_3d),
                           "--patch-batch-3d", str(a.patch_batch_3d), "--threads", str(a.threads),
                           "--max-patches-3d", str(a.max_patches_3d), "--single-run-over", str(a.single_run_over)]
                    if a.profile_all:
                        cmd += ["--profile-all"]
                    if a.peer_channels_last:
                        cmd += ["--peer-channels-last"]
                r = common.run_child(cmd, result, a.child_timeout)
                if "error" in r:
                    raise RuntimeError(r["error"] + " :: " + r.get("stderr_tail", "")[-1500:])
                return {**r, "model": model_info}

            rf.guarded("e2e", run, system=system, slices=k, hw=info["shape_kji"][2], input_label=it["label"], input_kind=it["kind"])
    return 0


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--slices", type=int, nargs="*", default=[300], help="synthetic CTs of these slice counts (none: only --real-ct/--sample-ct)")
    ap.add_argument("--real-ct", action="append", default=[], metavar="PATH", help="a real CT (file or DICOM folder); repeatable")
    ap.add_argument("--sample-ct", metavar="PATH", help="the reduced sample CT shipped with the extension (any path)")
    ap.add_argument("--hw", type=int, default=512, help="in-plane size of the synthetic CT")
    ap.add_argument("--repeats", "--repeat", dest="repeats", type=int, default=3, help="runs per system (median, min and max reported)")
    ap.add_argument("--single-run-over", type=float, default=60.0, metavar="S",
                    help="a system whose first run takes longer than S seconds runs once (0 = always --repeats)")
    ap.add_argument("--repeats-large", type=int, default=0, help="repeats for CTs over 500 slices (0 = --repeats)")
    ap.add_argument("--systems", default="lsnet,lsnet_noheat,lsnet_cl,unet2d,coarse_to_fine,unet3d,cli")
    ap.add_argument("--batch-size", type=int, default=8, help="slices per batch (CLI default 8)")
    ap.add_argument("--width", type=int, default=32, help="width of the random L-SNet when no bundled model exists")
    ap.add_argument("--peer-width", type=int, default=0, help="width of the 2-D peers (0 = the L-SNet model's width)")
    ap.add_argument("--patch-3d", type=int, default=128)
    ap.add_argument("--patch-batch-3d", type=int, default=1)
    ap.add_argument("--max-patches-3d", type=int, default=0,
                    help="0 (default) = the full 3-D sliding window, every patch; N > 0 = stop after N patches and scale the network "
                         "time to all of them (the row then says network_time=extrapolated, N/total patches)")
    ap.add_argument("--peer-channels-last", action="store_true", help="channels-last peers on the CPU too (always on CUDA)")
    ap.add_argument("--profile-all", action="store_true", help="every run profiled (CPU: no synchronisation cost)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--child-timeout", type=float, default=1800)
    ap.add_argument("--estimate-only", action="store_true", help="print the runtime estimate and stop")
    ap.add_argument("--workdir", default="/tmp/lsnet_bench")
    ap.add_argument("--out", default="benchmarks/results/e2e.json")
    ap.add_argument("--quick", action="store_true", help="tiny input (smoke test): 12 slices of 64 x 64, 1 repeat, 64^3 3-D patches (all of them)")
    # child modes
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cli-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--outdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.max_patches_3d < 0 or a.repeats < 1:
        raise SystemExit("--max-patches-3d must be >= 0 (0 = every patch) and --repeats >= 1")
    if a.quick:
        a.slices, a.hw, a.repeats, a.repeats_large, a.patch_3d = [12], 64, 1, 1, min(a.patch_3d, 64)
    if a.child:
        return child_main(a)
    if a.cli_child:
        return cli_child_main(a)
    return parent_main(a)


if __name__ == "__main__":
    sys.exit(main())
