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
        t0 = time.perf_counter()
        vol = read_volume(a.input)
        t1 = time.perf_counter()
        r = seg.segment_volume(vol, heatmap=heat)
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
        pipe = peers.UNet3DPipeline(dev, cl, patch_batch=a.patch_batch_3d, max_patches=a.max_patches_3d)
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
        if info.get("patches_total", 0) > info.get("patches", 0) > 0:
            # partial sliding window (--max-patches-3d): scale the network time to all patches
            f = info["patches_total"] / info["patches"]
            run["extrapolated_from_patches"] = f"{info['patches']} of {info['patches_total']}"
            run["network_measured"] = stages["network"]
            stages["network"] = stages["network"] * f
            run["total"] = run["total"] + run["network_measured"] * (f - 1)
            run["segment"] = run["segment"] + run["network_measured"] * (f - 1)
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
    for i in range(plain):
        runs.append(one(outdir / f"plain{i}", False))
        print(f"    {a.system}: run {i + 1}/{plain} {runs[-1]['total']:.3f} s", flush=True)
    for i in range(profiled):
        runs.append(one(outdir / f"prof{i}", True))
        print(f"    {a.system}: profiled run {i + 1}/{profiled} {runs[-1]['total']:.3f} s", flush=True)
    timed = [r for r in runs if not r["profiled"]] or runs
    res["runs"] = runs
    res["n_timed_runs"] = len(timed)
    res["median_total_s"] = median([r["total"] for r in timed])
    res["median_segment_s"] = median([r["segment"] for r in timed])
    res["median_cpu_s"] = median([r.get("cpu_s") for r in timed])
    res["loadavg_1min"] = [round(r.get("loadavg_1min_before", float("nan")), 2) for r in runs]
    if "extrapolated_from_patches" in runs[0]:
        res["extrapolated_from_patches"] = runs[0]["extrapolated_from_patches"]
    prof = [r for r in runs if r["profiled"]]
    if prof and "stages" in prof[0]:
        keys = sorted({k for r in prof for k in r["stages"]})
        res["median_stages_s"] = {k: median([r["stages"].get(k) for r in prof]) for k in keys}
        res["profiled_total_s"] = median([r["total"] for r in prof])
    for key in ("rois_per_slice", "slices_with_rois_fraction", "rois", "fine_crops_per_slice", "patches", "patches_total"):
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
    res = {"system": "cli", "rc": rc, "in_process_wall_s": wall, "peak_rss_mb": round(peak_rss_mb(), 1)}
    if done:
        s = done[-1]["summary"]
        t = s["timings"]
        res["summary"] = s
        res["pipeline_s"] = t.get("read", 0.0) + t.get("total", 0.0) + t.get("write", 0.0)
    write_json(a.result, res)
    return 0 if rc == 0 else rc


# =========================================================================================== parent side
def parent_main(a) -> int:
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: GPU end-to-end benchmark skipped")
        rf = ResultFile(a.out, "e2e", vars(a))
        rf.add({"name": "e2e", "skipped": "no CUDA device (torch.cuda.is_available() is False)"})
        return 0
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rf = ResultFile(a.out, "e2e", vars(a))
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    if a.device != "cpu":
        systems = [s for s in systems if not s.startswith("lsnet_cl")]  # identical to lsnet on CUDA
    for k in a.slices:
        ct = work / f"ct_{a.hw}x{a.hw}x{k}.nrrd"
        t0 = time.perf_counter()
        common.make_ct(ct, k, a.hw)
        log(f"CT {ct.name}: {ct.stat().st_size / 2**20:.0f} MiB ({time.perf_counter() - t0:.1f} s to make)")
        model_path, model_info = common.build_bench_model(ct, work, width=a.width)
        peer_width = a.peer_width or int(model_info.get("width") or a.width)
        rf.doc["model"] = model_info
        for system in systems:
            repeats = a.repeats_large if (k > 500 and a.repeats_large) else a.repeats

            def run(system=system, k=k, repeats=repeats):
                outdir = work / f"out_{system}_{k}"
                result = work / f"child_{system}_{k}.json"
                if system == "cli":
                    cmd = [sys.executable, __file__, "--cli-child", "--input", str(ct), "--model", str(model_path), "--device", a.device,
                           "--batch-size", str(a.batch_size), "--outdir", str(outdir), "--result", str(result)]
                else:
                    cmd = [sys.executable, __file__, "--child", "--system", system, "--input", str(ct), "--model", str(model_path),
                           "--device", a.device, "--batch-size", str(a.batch_size), "--repeats", str(repeats), "--outdir", str(outdir),
                           "--result", str(result), "--peer-width", str(peer_width), "--patch-3d", str(a.patch_3d),
                           "--patch-batch-3d", str(a.patch_batch_3d), "--threads", str(a.threads)]
                    if a.max_patches_3d:
                        cmd += ["--max-patches-3d", str(a.max_patches_3d)]
                    if a.profile_all:
                        cmd += ["--profile-all"]
                    if a.peer_channels_last:
                        cmd += ["--peer-channels-last"]
                r = common.run_child(cmd, result, a.child_timeout)
                if "error" in r:
                    raise RuntimeError(r["error"] + " :: " + r.get("stderr_tail", "")[-1500:])
                return {**r, "model": model_info}

            rf.guarded("e2e", run, system=system, slices=k, hw=a.hw)
    return 0


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--slices", type=int, nargs="+", default=[300])
    ap.add_argument("--hw", type=int, default=512, help="in-plane size of the synthetic CT")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-large", type=int, default=0, help="repeats for CTs over 500 slices (0 = --repeats)")
    ap.add_argument("--systems", default="lsnet,lsnet_noheat,lsnet_cl,unet2d,coarse_to_fine,unet3d,cli")
    ap.add_argument("--batch-size", type=int, default=8, help="slices per batch (CLI default 8)")
    ap.add_argument("--width", type=int, default=32, help="width of the random L-SNet when no bundled model exists")
    ap.add_argument("--peer-width", type=int, default=0, help="width of the 2-D peers (0 = the L-SNet model's width)")
    ap.add_argument("--patch-3d", type=int, default=128)
    ap.add_argument("--patch-batch-3d", type=int, default=1)
    ap.add_argument("--max-patches-3d", type=int, default=0, help="stop the 3-D sliding window after N patches (0 = all; time then is partial)")
    ap.add_argument("--peer-channels-last", action="store_true", help="channels-last peers on the CPU too (always on CUDA)")
    ap.add_argument("--profile-all", action="store_true", help="every run profiled (CPU: no synchronisation cost)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--child-timeout", type=float, default=900)
    ap.add_argument("--workdir", default="/tmp/lsnet_bench")
    ap.add_argument("--out", default="benchmarks/results/e2e.json")
    ap.add_argument("--quick", action="store_true", help="tiny input (smoke test): 12 slices of 64 x 64, 1 repeat, one 64^3 3-D patch")
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
    if a.quick:
        a.slices, a.hw, a.repeats, a.repeats_large, a.patch_3d, a.max_patches_3d = [12], 64, 1, 1, 64, 1
    if a.child:
        return child_main(a)
    if a.cli_child:
        return cli_child_main(a)
    return parent_main(a)


if __name__ == "__main__":
    sys.exit(main())
