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


def e2e_tables(docs) -> list[str]:
    out = []
    for d in [d for d in docs if d["benchmark"] == "e2e"]:
        res = [r for r in d["results"] if r.get("name") == "e2e"]
        if not res:
            continue
        out.append(f"\n**End-to-end** (`{Path(d['_file']).name}`): {env_line(d)}  ")
        m = d.get("model") or {}
        if m:
            desc = "bundled model" if m.get("weights") == "bundled" else (
                f"random weights, width {m.get('width')}, KP bias {_f(m.get('kp_bias'), 3)} calibrated to fire on {_f(100 * m.get('fire_fraction_target', 0), 0)} % of slices")
            out.append(f"L-SNet model: {desc}. Batch {d['args'].get('batch_size')} slices.\n")
        skipped = [r for r in d["results"] if r.get("skipped")]
        for r in skipped:
            out.append(f"- skipped: {r['skipped']}")
        out.append("| system | slices | runs | median total (s) | read | preprocess | L-Net | decode+RR | S-Net | postprocess | write | RoIs/slice | CPU s | peak RAM (MB) | peak GPU (MB) | x L-SNet time |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        base = {}
        for r in res:
            if r.get("system") == "lsnet" and "median_total_s" in r:
                base[r["slices"]] = r["median_total_s"]
        for r in res:
            if "error" in r:
                out.append(f"| {r.get('system')} | {r.get('slices')} | error: {r['error'][:160].replace('|', '/')} |" + " |" * 13)
                continue
            if r.get("system") == "cli":
                s = r.get("summary", {})
                t = s.get("timings", {})
                out.append(
                    f"| `lsnet segment` CLI (in-process, cold) | {r.get('slices')} | 1 | {_f(r.get('pipeline_s'))} | {_f(t.get('read'))} | {_f(t.get('preprocess'))} | network {_f(t.get('network'))} | | | {_f(t.get('postprocess'))} | {_f(t.get('write'))} | {_f(s.get('rois', 0) / max(1, s.get('slices', 1)))} | - | {_f(r.get('peak_rss_mb'), 0)} | - | "
                    f"{_f(r['pipeline_s'] / base[r['slices']]) if r.get('slices') in base and r.get('pipeline_s') else '-'} |"
                )
                continue
            st = r.get("median_stages_s") or {}
            if r.get("system", "").startswith("lsnet"):
                cells = [st.get(k) for k in STAGES]
            else:  # peers: network time in the L-Net column, fine stage in the S-Net column for the cascade
                if "coarse" in st:
                    cells = [st.get("read"), st.get("preprocess"), st.get("coarse"), st.get("box_crop"), st.get("fine"), st.get("postprocess"), st.get("write")]
                else:
                    cells = [st.get("read"), st.get("preprocess"), st.get("network"), None, None, st.get("postprocess"), st.get("write")]
            name = r.get("system")
            if r.get("extrapolated_from_patches"):
                name += f" (network extrapolated from {r['extrapolated_from_patches']} patches)"
            ratio = r["median_total_s"] / base[r["slices"]] if r.get("slices") in base and base[r["slices"]] else None
            rps = r.get("rois_per_slice", r.get("fine_crops_per_slice"))
            out.append(
                f"| {name} | {r.get('slices')} | {r.get('n_timed_runs')} | {_f(r.get('median_total_s'))} | "
                + " | ".join(_f(c) for c in cells)
                + f" | {_f(rps)} | {_f(r.get('median_cpu_s'), 1)} | {_f(r.get('peak_rss_mb'), 0)} | {_f(r.get('peak_gpu_mb'), 0)} | {_f(ratio)} |"
            )
        loads = [f"{r.get('system')}: {r.get('loadavg_1min')}" for r in res if r.get("loadavg_1min")]
        if loads:
            out.append(f"\nLoad average (1 min) before each run: {'; '.join(loads)}.")
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
                out.append(f"- {sysname} GPU 300 slices: {_f(t)} s (target < 1.0 s: {'met' if t and t < 1.0 else 'MISSED'}); networks {_f(nets, 3)} s (target < 0.1 s: {'met' if nets < 0.1 else 'MISSED'}); 3-D peer / L-SNet = {_f(ratio)} (target >= 6: {'met' if ratio and ratio >= 6 else 'MISSED'})")
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
