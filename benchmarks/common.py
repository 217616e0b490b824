"""Shared pieces of the benchmark scripts: environment record, synthetic CT, benchmark model, child runs.

Every benchmark script imports this module first; it puts the engine (``LSNetSegmentation/``) on
``sys.path``.  Results are plain JSON (one object per script run, ``{"env": ..., "results": [...]}``),
turned into markdown tables by ``benchmarks/report.py``.

Measurements that report a peak RAM run in a child process each (``run_child``): the child reports
its own ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` so the peaks of different measurements never mix.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "LSNetSegmentation"
if str(ENGINE) not in sys.path:
    sys.path.insert(0, str(ENGINE))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
"""Peak dense bf16 tensor-core throughput of an H100 SXM5 (NVIDIA datasheet, without sparsity).
The PCIe H100 is 756 TFLOP/s; ``peak_tflops()`` picks by device name."""

FIRE_FRACTION = 0.25
"""Fraction of slices on which the random-weight benchmark model's L-Net fires (see ``build_bench_model``)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ environment
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def _git_commit() -> str:
    """Short commit of the checkout, ``+uncommitted`` when tracked files differ from it (the table then
    does not describe that commit exactly)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+uncommitted" if dirty else "")


def env_info() -> dict[str, Any]:
    import torch

    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
        "cuda": None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda"] = {
            "device": p.name,
            "memory_gb": round(p.total_memory / 2**30, 1),
            "cuda_version": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "peak_bf16_dense_tflops_used": peak_tflops(p.name),
        }
    return info


def peak_tflops(device_name: str) -> float:
    """Dense bf16 peak used for the "fraction of peak" columns (stated in every result)."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756.0
    if "H100" in name or "H200" in name or "H800" in name:
        return H100_BF16_DENSE_TFLOPS
    if "A100" in name:
        return 312.0
    return float("nan")


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


class ResultFile:
    """``{"env", "benchmark", "args", "results": [...]}`` rewritten after every result (nothing is lost on a crash)."""

    def __init__(self, path, benchmark: str, args: dict):
        self.path = Path(path)
        self.doc = {"benchmark": benchmark, "env": env_info(), "args": args, "results": []}
        write_json(self.path, self.doc)

    def add(self, entry: dict) -> None:
        self.doc["results"].append(entry)
        write_json(self.path, self.doc)

    def guarded(self, name: str, fn: Callable[[], dict], **labels) -> Optional[dict]:
        """Run one benchmark; on any exception record ``{"error": ...}`` and go on with the next one."""
        log(f"start {name} {labels or ''}")
        t0 = time.perf_counter()
        try:
            res = fn()
            entry = {"name": name, **labels, **res}
        except Exception as e:  # noqa: BLE001 - a benchmark must not lose the others
            entry = {"name": name, **labels, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            log(f"ERROR in {name}: {type(e).__name__}: {e}")
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
        entry["bench_seconds"] = round(time.perf_counter() - t0, 2)
        self.add(entry)
        log(f"done  {name} in {entry['bench_seconds']} s")
        return entry


# --------------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(xs)) if xs else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# ---------------------------------------------------------------------------------------- synthetic CT
CT_SPACING = (0.8, 0.8, 1.0)
"""(sx, sy, sz) mm of the synthetic CT: NIH Pancreas-CT is 0.66-0.98 mm in-plane, 1.0 mm slices (patient 0001)."""

BLOCK_SLICES = 40


def make_ct(path, slices: int, hw: int = 512, seed: int = 0, spacing=CT_SPACING) -> Path:
    """Write a synthetic abdominal CT ``(slices, hw, hw)`` int16 HU as an UNCOMPRESSED file (.nrrd/.nii).

    A ``BLOCK_SLICES``-slice phantom (``lsnet.samples.phantom.make_phantom``: body, organs, a pancreas-like
    target, noise) is generated once and mirrored back and forth along k to the requested length, so
    generating 1000 slices costs the time and memory of 40.  Reuses an existing file of that name.
    """
    import SimpleITK as sitk

    from lsnet.samples.phantom import make_phantom

    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    block = make_phantom((min(BLOCK_SLICES, slices), hw, hw), spacing, seed=seed, target_scale=1.0).array
    reps = int(math.ceil(slices / block.shape[0]))
    parts = [block if r % 2 == 0 else block[::-1] for r in range(reps)]
    arr = np.ascontiguousarray(np.concatenate(parts, 0)[:slices])
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin((-(hw - 1) * spacing[0] / 2, -(hw - 1) * spacing[1] / 2, 0.0))
    tmp = path.with_name(".tmp-" + path.name)
    sitk.WriteImage(img, str(tmp), useCompression=False)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------- benchmark model
def bundled_weights() -> Optional[Path]:
    from lsnet.io.weights import default_weights_path

    p = default_weights_path()
    return p if p.exists() else None


def _engine_canvas_batch(vol_array: np.ndarray, spacing_xy, config, idx):
    """Slices ``idx`` of a canonical array preprocessed exactly as ``Segmenter`` does -> ``(B, C, Hc, Wc)``."""
    import torch

    from lsnet.pipeline.preprocess import slice_grid, stack_channels, to_canvas, window

    grid = slice_grid(vol_array.shape[1:], spacing_xy, config.spacing, config.pad_multiple)
    raw = np.concatenate([stack_channels(vol_array, int(k), int(k) + 1, config.in_channels) for k in idx])
    return to_canvas(window(torch.from_numpy(raw), config.window), grid)


def calibrate_kp_bias(model, slices_hu: np.ndarray, spacing_xy, fire_fraction: float = FIRE_FRACTION) -> dict:
    """Set L-Net's KP-head bias so that the heatmap exceeds the 0.5 threshold on ~``fire_fraction`` of ``slices_hu``.

    A randomly initialised L-Net fires nowhere (prior bias -4.6) or everywhere, so its timing says
    nothing about S-Net's share.  We shift the bias so that the per-slice maximum logit is positive on
    the wanted fraction of the calibration slices; the actual RoIs/slice are measured and reported.
    """
    import torch

    c = model.config
    conv = model.lnet.kp_head[-1]
    with torch.inference_mode():
        x = _engine_canvas_batch(slices_hu, spacing_xy, c, range(slices_hu.shape[0]))
        logits, _ = model.lnet(x)
        per_slice_max = (logits.float().amax(dim=(1, 2, 3)) - conv.bias.float()).cpu().numpy()
    q = float(np.quantile(per_slice_max, 1.0 - fire_fraction))
    with torch.no_grad():
        conv.bias.fill_(-q + 1e-3 * abs(q))
    fired = float(np.mean(per_slice_max - q + 1e-3 * abs(q) > 0))
    return {"kp_bias": float(conv.bias.item()), "calibration_slices": int(slices_hu.shape[0]), "calibration_fire_fraction": fired}


def build_bench_model(ct_path, workdir, width: int = 32, seed: int = 0, fire_fraction: float = FIRE_FRACTION) -> tuple[Path, dict]:
    """The model the end-to-end benchmark runs: the bundled one when present, else a random one.

    Returns ``(weights path, info)``; a random model is calibrated (``calibrate_kp_bias``) on
    ``BLOCK_SLICES`` slices of the benchmark CT and saved in float32 to ``workdir`` so that child
    processes and the ``lsnet`` CLI load exactly the same network.
    """
    import torch

    from lsnet.config import ModelConfig
    from lsnet.io.weights import save_model
    from lsnet.method.model import LSNet

    bundled = bundled_weights()
    if bundled is not None and not os.environ.get("LSNET_BENCH_RANDOM"):
        from lsnet.io.weights import read_model_card

        card = read_model_card(bundled)
        return bundled, {"weights": "bundled", "path": str(bundled), "width": card["config"].get("width"), "name": card.get("name")}
    out = Path(workdir) / f"bench_random_w{width}_s{seed}.safetensors"
    info_path = out.with_suffix(".info.json")
    if out.exists() and info_path.exists():
        return out, json.loads(info_path.read_text())
    torch.manual_seed(seed)
    model = LSNet(ModelConfig(width=width)).eval()
    from lsnet.io.geometry import to_canonical
    from lsnet.io.volume import read_volume

    can, _ = to_canonical(read_volume(ct_path))  # a file or a DICOM folder
    n = min(BLOCK_SLICES, can.array.shape[0])
    cal = calibrate_kp_bias(model, np.array(can.array[:n]), tuple(float(v) for v in can.spacing[:2]), fire_fraction)
    info = {"weights": "random", "width": width, "seed": seed, "fire_fraction_target": fire_fraction, **cal}
    save_model(model, out, {"name": f"benchmark-random-w{width}", "description": "random weights, KP bias calibrated (benchmarks only)"}, dtype="float32")
    info["path"] = str(out)
    info_path.write_text(json.dumps(info, indent=2))
    return out, info


# ------------------------------------------------------------------------------------------- children
def run_child(cmd: list[str], result_path, timeout: float, env: Optional[dict] = None) -> dict:
    """Run a child Python benchmark; returns the JSON it wrote to ``result_path`` (or an error entry)."""
    result_path = Path(result_path)
    if result_path.exists():
        result_path.unlink()
    t0 = time.perf_counter()
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = os.pathsep.join([str(ENGINE), str(ROOT), e.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, env=e)
    except subprocess.TimeoutExpired as ex:
        tail = (ex.stderr or b"")[-1500:] if isinstance(ex.stderr, bytes) else (ex.stderr or "")[-1500:]
        return {"error": f"timeout after {timeout:.0f} s", "stderr_tail": str(tail)}
    wall = time.perf_counter() - t0
    if proc.stdout:
        sys.stdout.write(proc.stdout[-3000:])
        sys.stdout.flush()
    if proc.returncode != 0 or not result_path.exists():
        return {"error": f"child exited with code {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    res = json.loads(result_path.read_text())
    res["child_wall_s"] = round(wall, 3)
    return res
