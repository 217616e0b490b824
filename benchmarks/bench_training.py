"""Training throughput (slices/s) of the alternating L-SNet iteration, and the paper's schedule extrapolated.

    python benchmarks/bench_training.py --device cuda --out results/training.json

One iteration = the paper's alternating step (section 2.5) on a batch of B slices at 320 x 320, through
the engine's own training code path (``LSNet.lnet_losses`` / ``LSNet.snet_losses``):

1. ``lnet_losses`` -> backward -> Adam step on the L-Net parameters;
2. ``snet_losses`` (L-Net runs again, RoI drawn among the top-3 keypoints, RR, S-Net) -> backward ->
   Adam step on the S-Net parameters and on the L-Net parameters (which received the gamma-decayed
   gradient through theta).

Two Adam optimisers (fused on CUDA), bf16 autocast, channels-last.  Slices/s counts each slice of the
batch once per alternating iteration.  The data are phantom slices (``lsnet.samples.phantom``) already on the
device: the input pipeline is NOT measured (the training loop's loader must keep up on its own).

Schedule extrapolation (stated in the result): 60 epochs (paper section 3.1) over 80 scans x 237 axial
slices per scan on average (NIH Pancreas-CT; the paper uses "2D image slices ... only axial slices"
and does not say it drops slices without pancreas, so all slices are counted; the pancreas-only
variant, ~30 % of the slices as in patient 0001 (71 of 240), is given too).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import ResultFile, log  # noqa: E402

SCANS = 80
SLICES_PER_SCAN = 237
EPOCHS = 60
PANCREAS_SLICE_FRACTION = 71 / 240


def phantom_slices(n: int, size: int, seed: int = 0):
    """``(n, 1, size, size)`` windowed images in [0, 1] and ``(n, size, size)`` masks from phantom CTs."""
    from lsnet.samples.phantom import make_phantom

    imgs, masks = [], []
    per = max(1, min(n, 24))
    s = seed
    while sum(len(m) for m in masks) < n:
        p = make_phantom((per, size, size), (1.25, 1.25, 2.5), seed=s)
        imgs.append(np.clip(p.array.astype(np.float32) / 255.0, 0.0, 1.0))
        masks.append(p.label)
        s += 1
    x = torch.from_numpy(np.concatenate(imgs)[:n, None])
    m = torch.from_numpy(np.concatenate(masks)[:n]).float()
    return x, m


def make_step(model, dev, amp: bool):
    fused = dev.type == "cuda"
    opt_l = torch.optim.Adam(model.lnet.parameters(), lr=1e-4, fused=fused)
    opt_s = torch.optim.Adam(model.snet.parameters(), lr=1e-4, fused=fused)
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (amp and dev.type == "cuda") else (lambda: torch.autocast("cpu", enabled=False))

    def step(x, m):
        with ac():
            out = model.lnet_losses(x, m)
        opt_l.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt_l.step()
        with ac():
            out2 = model.snet_losses(x, m)
        opt_l.zero_grad(set_to_none=True)
        opt_s.zero_grad(set_to_none=True)
        out2["loss"].backward()
        opt_s.step()
        opt_l.step()
        return out["loss"].detach(), out2["loss"].detach()

    return step


def bench(width, batch, size, dev, channels_last, min_time, pool, warmup: int = 3) -> dict:
    from lsnet.config import ModelConfig
    from lsnet.method.model import LSNet

    torch.manual_seed(0)
    model = LSNet(ModelConfig(width=width)).to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = make_step(model, dev, amp=True)
    xs, ms = pool
    gen = torch.Generator(device="cpu").manual_seed(0)

    def batch_at():
        idx = torch.randint(0, xs.shape[0], (batch,), generator=gen).to(dev)
        x = xs[idx]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, ms[idx]

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step(*batch_at())
    common.sync(dev)
    n, t0 = 0, time.perf_counter()
    while True:
        losses = step(*batch_at())
        n += 1
        if n >= 2 and n % 2 == 0:
            common.sync(dev)
            if time.perf_counter() - t0 >= min_time:
                break
    dt = time.perf_counter() - t0
    sps = n * batch / dt
    total = EPOCHS * SCANS * SLICES_PER_SCAN
    return {
        "iters": n,
        "s_per_iter": round(dt / n, 4),
        "slices_per_s": round(sps, 1),
        "final_losses": [round(float(v), 4) for v in losses],
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == "cuda" else None,
        "schedule": {
            "assumption": f"{EPOCHS} epochs x {SCANS} scans x {SLICES_PER_SCAN} axial slices/scan = {total} slice-iterations",
            "all_slices_minutes": round(total / sps / 60, 2),
            "pancreas_slices_only_minutes": round(total * PANCREAS_SLICE_FRACTION / sps / 60, 2),
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--min-time", type=float, default=4.0)
    ap.add_argument("--no-cl-check", action="store_true", help="skip the channels-last-off comparison")
    ap.add_argument("--out", default="benchmarks/results/training.json")
    ap.add_argument("--quick", action="store_true", help="smoke test: CPU ok, 64 x 64, width 8, batch 2")
    a = ap.parse_args(argv)
    if a.quick:
        a.size, a.widths, a.batches, a.min_time, a.no_cl_check = 64, [8], [2], 0.0, True
    warmup = 1 if a.quick else 3
    rf = ResultFile(a.out, "training", vars(a))
    if a.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: training benchmark skipped")
        rf.add({"name": "training", "skipped": "no CUDA device (torch.cuda.is_available() is False)"})
        return 0
    dev = torch.device(a.device)
    x, m = phantom_slices(64 if not a.quick else 4, a.size)
    pool = (x.to(dev), m.to(dev))
    rf.doc["data"] = {"slices": int(x.shape[0]), "positive_fraction": round(float((m.flatten(1).amax(1) > 0).float().mean()), 3), "size": a.size}
    # channels-last backward aborts the CPU build of torch 2.13 ("double free or corruption" in the
    # first L-Net backward): channels-last on CUDA only
    cl_on = dev.type == "cuda"
    configs = [(w, b, cl_on) for w in a.widths for b in a.batches]
    if not a.no_cl_check:
        configs.append((a.widths[0], a.batches[-1], False))
    for w, b, cl in configs:
        rf.guarded("train_step", lambda w=w, b=b, cl=cl: bench(w, b, a.size, dev, cl, a.min_time, pool, warmup), width=w, batch=b, channels_last=cl, size=a.size)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
