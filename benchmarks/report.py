"""Turn benchmark JSON files into the markdown tables of docs/benchmarks.md.

    python benchmarks/report.py RESULTS_DIR_OR_FILES... [-o fragment.md]

Reads every ``*.json`` written by ``bench_e2e.py``, ``bench_networks.py`` and ``bench_training.py``
and prints: the environment, the end-to-end table (median time, stage split, RoIs/slice, peak RAM and
GPU memory, ratio of every peer to L-SNet measured in the same run), network throughput, training
throughput with the schedule extrapolation, and a target check.  Nothing is invented: a missing
measurement prints as "-" and an error entry as its message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

STAGES = ("read", "preprocess", "lnet", "decode_rr", "snet", "postprocess", "write")
PEER_STAGES = ("read", "preprocess", "coarse", "box_crop", "fine", "network", "postprocess", "write")


def _f(v, nd=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (int,)) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _one_line(msg: str, n: int = 160) -> str:
    """An error message as one table cell: the last line that says something, no pipes."""
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    text = lines[0] if len(lines) == 1 else f"{lines[0][:60]} ... {lines[-1]}" if lines else ""
    return text[:n].replace("|", "/")


def load(paths) -> list[dict]:
    docs = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                d = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(d, dict) and "benchmark" in d and "results" in d:
                d["_file"] = str(f)
                docs.append(d)
    return docs


def env_line(d) -> str:
    e = d.get("env", {})
    dev = (e.get("cuda") or {}).get("device") or f"CPU {e.get('cpu')} ({e.get('cpu_cores')} cores, {e.get('torch_threads')} threads)"
    return f"{e.get('date', '?')} | {dev} | torch {e.get('torch')} | commit {e.get('git_commit')} | load avg at start {e.get('loadavg_1min_at_start', '-')}"


def header(d, what: str) -> list[str]:
    """Date, machine, command and git commit of one result file (every table starts with them)."""
    e = d.get("env", {})
    cuda = (e.get("cuda") or {}).get("device")
    machine = f"{e.get('cpu')}, {e.get('cpu_cores')} cores ({e.get('torch_threads')} torch threads), {e.get('ram_gb')} GB RAM" + (f"; GPU {cuda}" if cuda else "")
    cmd = d.get("command") or "not recorded (older result file)"
    return [f"\n**{what}** (`{Path(d['_file']).name}`)\n",
            f"- date: {e.get('date', '?')}; machine: {machine}; torch {e.get('torch')}; git commit `{e.get('git_commit')}`;"
            f" 1-min load average at start {e.get('loadavg_1min_at_start', '-')}",
            f"- command: `{cmd}`"]


def network_label(r) -> str:
    """Whether a row's network time was measured on all the work or extrapolated, and from how much."""
    unit = r.get("work_unit")
    if r.get("network_time"):
        n, tot = r.get("work_run"), r.get("work_total")
        units = "patches" if unit == "patch" else "slices"
        if r["network_time"] == "measured":
            return f"measured ({n}/{tot} {units})"
        return f"**extrapolated** from {n}/{tot} {units}"
    # result files written before the label existed
    if r.get("extrapolated_from_patches"):
        return f"**extrapolated** from {r['extrapolated_from_patches']} patches"
    if r.get("system") == "unet3d":
        if r.get("patches") == 0:
            return "**ran 0 patches** (old `--max-patches-3d 0` bug: not a timing)"
        if r.get("patches") and r.get("patches") == r.get("patches_total"):
            return f"measured ({r['patches']}/{r['patches_total']} patches)"
    return "not recorded"


def _input_of(r) -> str:
    return r.get("input_label") or f"synthetic {r.get('hw')}x{r.get('hw')}x{r.get('slices')}"


def e2e_tables(docs) -> list[str]:
    out = []
    for d in [d for d in docs if d["benchmark"] == "e2e"]:
        res = [r for r in d["results"] if r.get("name") == "e2e"]
        skipped = [r for r in d["results"] if r.get("skipped")]
        if not res and not skipped:
            continue
        out += header(d, "End-to-end, CT file in -> segmentation files out")
        m = d.get("model") or {}
        if m:
            desc = f"bundled model `{m.get('name')}` (width {m.get('width')})" if m.get("weights") == "bundled" else (
                f"random weights, width {m.get('width')}, KP bias {_f(m.get('kp_bias'), 3)} calibrated to fire on {_f(100 * m.get('fire_fraction_target', 0), 0)} % of slices")
            out.append(f"- L-SNet model: {desc}; batch {d['args'].get('batch_size')} slices; peers: random weights (speed only)")
        for it in d.get("inputs") or []:
            out.append(f"- input {it['label']}: {it.get('path')}, {' x '.join(str(v) for v in reversed(it.get('shape_kji', [])))} voxels, "
                       f"spacing {' x '.join(_f(v, 3) for v in it.get('spacing_xyz_mm', []))} mm; 3-D peer window {it.get('unet3d_patches_total')} patches of {it.get('unet3d_patch', 128)}^3")
        for r in skipped:
            out.append(f"- skipped: {r['skipped']}")
        if not res:
            continue
        base = {_input_of(r): r["median_total_s"] for r in res if r.get("system") == "lsnet" and r.get("median_total_s")}
        by_input: dict[str, list] = {}
        for r in res:
            by_input.setdefault(_input_of(r), []).append(r)
        out.append("")
        out.append("| input | system | runs | median total (s) | min - max (s) | x L-SNet | network time | peak RAM (MB) | CPU s (median) |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for label, rows in by_input.items():
            for r in rows:
                if "error" in r:
                    out.append(f"| {label} | {r.get('system')} | error: {_one_line(r['error'])} | | | | | | |")
                    continue
                if r.get("system") == "cli":
                    t = r.get("pipeline_s")
                    ratio = t / base[label] if label in base and t else None
                    out.append(f"| {label} | `lsnet segment` CLI (in-process, cold: first call) | 1 | {_f(t)} | - | {_f(ratio)} | {network_label(r)} | {_f(r.get('peak_rss_mb'), 0)} | - |")
                    continue
                t = r.get("median_total_s")
                ratio = t / base[label] if label in base and t else None
                rng = f"{_f(r.get('min_total_s'))} - {_f(r.get('max_total_s'))}" if r.get("min_total_s") is not None else "-"
                name = r.get("system") + (f" ({r['single_run_reason']})" if r.get("single_run_reason") else "")
                out.append(f"| {label} | {name} | {r.get('n_timed_runs')} | {_f(t)} | {rng} | {_f(ratio)} | {network_label(r)} | {_f(r.get('peak_rss_mb'), 0)} | {_f(r.get('median_cpu_s'), 1)} |")
        out.append("\nStage split (seconds, median of the profiled runs):\n")
        out.append("| input | system | read | preprocess | L-Net / network | decode+RR / box+crop | S-Net / fine | postprocess | write | RoIs/slice |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for label, rows in by_input.items():
            for r in rows:
                if "error" in r or r.get("system") == "cli":
                    continue
                st = r.get("median_stages_s") or {}
                if r.get("system", "").startswith("lsnet"):
                    cells = [st.get(k) for k in STAGES]
                elif "coarse" in st:
                    cells = [st.get("read"), st.get("preprocess"), st.get("coarse"), st.get("box_crop"), st.get("fine"), st.get("postprocess"), st.get("write")]
                else:
                    cells = [st.get("read"), st.get("preprocess"), st.get("network"), None, None, st.get("postprocess"), st.get("write")]
                rps = r.get("rois_per_slice", r.get("fine_crops_per_slice"))
                out.append(f"| {label} | {r.get('system')} | " + " | ".join(_f(c) for c in cells) + f" | {_f(rps)} |")
        loads = [f"{r.get('system')} ({_input_of(r)}): {r.get('loadavg_1min')}" for r in res if r.get("loadavg_1min")]
        if loads:
            out.append(f"\nLoad average (1 min) before each run: {'; '.join(loads)}.")
    return out


def slicer_path_tables(docs) -> list[str]:
    """``bench_slicer_path.py``: what a user waits for after clicking Segment, stage by stage."""
    out = []
    for d in [d for d in docs if d["benchmark"] == "slicer_path"]:
        res = [r for r in d["results"] if r.get("name") == "slicer_path"]
        if not res:
            continue
        out += header(d, "Time to result after Segment (the Slicer module's path)")
        out.append(f"- {d.get('method', '')}")
        out.append("")
        out.append("| input | runs | time to result (s, median) | min - max | input export (SimpleITK stand-in) | child start | import torch + engine, load model | read | segment | write outputs | child exit | MRML import | peak RAM child (MB) |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res:
            if "error" in r:
                out.append(f"| {r.get('input_label')} | error: {_one_line(r['error'])} |" + " |" * 11)
                continue
            st = r.get("median_stages_s", {})
            imp = r.get("mrml_import")
            imp_cell = _f(st.get("mrml_import")) if imp == "measured" else f"not run: {r.get('mrml_import_reason', imp)}"
            out.append(f"| {r.get('input_label')} | {r.get('n_runs')} | {_f(r.get('median_total_s'))}{'' if imp == 'measured' else ' (without import)'} | "
                       f"{_f(r.get('min_total_s'))} - {_f(r.get('max_total_s'))} | "
                       + " | ".join(_f(st.get(k)) for k in ("input_export", "child_start", "model_load", "read", "segment", "write", "child_exit"))
                       + f" | {imp_cell} | {_f(r.get('peak_rss_child_mb'), 0)} |")
    return out


def network_tables(docs) -> list[str]:
    out = []
    for d in [d for d in docs if d["benchmark"] == "networks"]:
        res = [r for r in d["results"] if r.get("name") == "throughput"]
        skipped = [r for r in d["results"] if r.get("skipped")]
        out.append(f"\n**Network throughput** (`{Path(d['_file']).name}`): {env_line(d)}  ")
        out.append(f"Input {d['args'].get('size')} x {d['args'].get('size')}, width {d['args'].get('width')}; GFLOP/slice {d.get('gflop_per_slice')}; peak used {d.get('peak_tflops_used')} TFLOP/s (dense bf16).\n")
        for r in skipped:
            out.append(f"- skipped: {r['skipped']}")
        if not res:
            continue
        out.append("| net | mode | dtype | channels-last | batch | ms/batch | slices/s | TFLOP/s | % of peak | compile s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in res:
            if "error" in r:
                out.append(f"| {r.get('net')} | {r.get('mode', r.get('phase'))} | {r.get('dtype')} | {r.get('channels_last')} | {r.get('batch')} | error: {r['error'][:120].replace('|', '/')} | | | | |")
                continue
            sps = r.get("slices_per_s", r.get("patches_per_s"))
            unit = "" if "slices_per_s" in r else " patches"
            frac = r.get("fraction_of_peak")
            out.append(
                f"| {r['net']}{' ' + r['input'] if r.get('input') else ''} | {r.get('mode')} | {r.get('dtype')} | {r.get('channels_last')} | {r.get('batch')} | {_f(r.get('ms_per_batch'))} | {_f(sps, 1)}{unit} | {_f(r.get('tflops'))} | {_f(100 * frac if frac is not None else None, 1)} | {_f(r.get('compile_s'), 1)} |"
            )
    return out


def training_tables(docs) -> list[str]:
    out = []
    for d in [d for d in docs if d["benchmark"] == "training"]:
        res = [r for r in d["results"] if r.get("name") == "train_step"]
        out.append(f"\n**Training throughput** (`{Path(d['_file']).name}`): {env_line(d)}  ")
        for r in [r for r in d["results"] if r.get("skipped")]:
            out.append(f"- skipped: {r['skipped']}")
        if not res:
            continue
        sch = next((r["schedule"]["assumption"] for r in res if "schedule" in r), "")
        out.append(f"Alternating L-SNet step, bf16 autocast, fused Adam x 2, {d['args'].get('size')} x {d['args'].get('size')}; schedule: {sch}.\n")
        out.append("| width | batch | channels-last | s/iter | slices/s | peak GPU (MB) | 60 epochs, all slices (min) | 60 epochs, pancreas slices only (min) |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in res:
            if "error" in r:
                out.append(f"| {r.get('width')} | {r.get('batch')} | {r.get('channels_last')} | error: {r['error'][:120].replace('|', '/')} | | | | |")
                continue
            s = r["schedule"]
            out.append(f"| {r['width']} | {r['batch']} | {r['channels_last']} | {_f(r['s_per_iter'], 4)} | {_f(r['slices_per_s'], 1)} | {_f(r.get('peak_gpu_mb'), 0)} | {_f(s['all_slices_minutes'], 1)} | {_f(s['pancreas_slices_only_minutes'], 1)} |")
    return out


def target_check(docs) -> list[str]:
    out = ["\n**Targets** (issue 4):\n"]
    for d in [d for d in docs if d["benchmark"] == "e2e"]:
        cuda = bool((d.get("env") or {}).get("cuda")) and d["args"].get("device") != "cpu"
        res = {(r.get("system"), r.get("slices")): r for r in d["results"] if r.get("name") == "e2e" and "error" not in r}
        for (sysname, k), r in sorted(res.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
            if not sysname or not sysname.startswith("lsnet"):
                continue
            t = r.get("median_total_s")
            ram = r.get("peak_rss_mb")
            if cuda and k == 300:
                st = r.get("median_stages_s") or {}
                nets = (st.get("lnet") or 0) + (st.get("snet") or 0)
                peer = res.get(("unet3d", 300))
                ratio = peer["median_total_s"] / t if peer and t else None
                how = f" [3-D peer network time {network_label(peer)}]" if peer else ""
                out.append(f"- {sysname} GPU 300 slices: {_f(t)} s (target < 1.0 s: {'met' if t and t < 1.0 else 'MISSED'}); networks {_f(nets, 3)} s (target < 0.1 s: {'met' if nets < 0.1 else 'MISSED'}); 3-D peer / L-SNet = {_f(ratio)} (target >= 6: {'met' if ratio and ratio >= 6 else 'MISSED'}){how}")
            elif not cuda and k == 300:
                out.append(f"- {sysname} CPU 300 slices: {_f(t)} s (target < 45 s: {'met' if t and t < 45 else 'MISSED'}); peak RAM {_f(ram, 0)} MB (target < 3072 MB: {'met' if ram and ram < 3072 else 'MISSED'})")
            elif not cuda and k and k >= 1000:
                out.append(f"- {sysname} CPU {k} slices: {_f(t)} s; peak RAM {_f(ram, 0)} MB (target < 6144 MB: {'met' if ram and ram < 6144 else 'MISSED'})")
        for (sysname, k), r in res.items():
            if sysname == "cli" and not cuda:
                ram = r.get("peak_rss_mb")
                lim = 3072 if k <= 300 else 6144
                out.append(f"- `lsnet segment` CLI CPU {k} slices: pipeline {_f(r.get('pipeline_s'))} s; peak RAM {_f(ram, 0)} MB (target < {lim} MB: {'met' if ram and ram < lim else 'MISSED'})")
    for d in [d for d in docs if d["benchmark"] == "training"]:
        best = max((r.get("slices_per_s", 0) for r in d["results"] if r.get("name") == "train_step" and "error" not in r), default=None)
        if best:
            out.append(f"- training: best {_f(best, 0)} slices/s (target >= 2000: {'met' if best >= 2000 else 'MISSED'})")
    return out


def render(docs) -> str:
    lines = []
    lines += e2e_tables(docs)
    lines += slicer_path_tables(docs)
    lines += network_tables(docs)
    lines += training_tables(docs)
    lines += target_check(docs)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("-o", "--output")
    a = ap.parse_args(argv)
    text = render(load(a.paths))
    if a.output:
        Path(a.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
