"""Network throughput (slices/s) of L-Net and S-Net at 320 x 320, and the fraction of the GPU's peak.

    python benchmarks/bench_networks.py --device cuda --phase eager   --out results/networks_eager.json
    python benchmarks/bench_networks.py --device cuda --phase graphs  --out results/networks_graphs.json
    python benchmarks/bench_networks.py --device cuda --phase compile --out results/networks_compile.json

Forward passes only (inference, ``torch.inference_mode``), random weights (speed does not depend on
them), input ``(B, C, 320, 320)``.  Grid:

* ``eager``:   dtype fp32 / bf16 / fp16 (autocast, as the engine runs; fp32 convs use TF32, PyTorch's
  cuDNN default) x batch 1, 8, 32, 128 x channels-last off / on;
* ``graphs``:  bf16 channels-last, batch 8, 32, 128, the eager forward captured in a CUDA graph
  (``torch.cuda.graph``) and replayed - launch overhead removed without compiling;
* ``compile``: bf16 channels-last, batch 32 and 128, ``torch.compile`` modes
  ``max-autotune-no-cudagraphs`` and ``reduce-overhead`` (CUDA graphs); compile time is reported.

FLOPs per slice are counted once with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add
= 2 FLOPs); ``tflops`` = FLOPs/slice x slices/s and ``fraction_of_peak`` = tflops / the dense bf16
peak of the GPU (989 TFLOP/s for an H100 SXM, stated in the result's ``env``).  Peers (the 2-D
ResNet34 U-Net at 512 x 512 and the 3-D nnU-Net-sized U-Net per 128^3 patch) are included in the
eager phase at bf16 channels-last for the same accounting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
from common import ResultFile, log  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_nets(width: int, in_channels: int = 1):
    from lsnet.config import ModelConfig
    from lsnet.method.model import LSNet

    torch.manual_seed(0)
    m = LSNet(ModelConfig(width=width, in_channels=in_channels)).eval()
    return {"lnet": m.lnet, "snet": m.snet}


def flops_per_item(net, shape) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with torch.inference_mode(), fc:
        net(torch.zeros(1, *shape))
    return float(fc.get_total_flops())


def _autocast(dev, dtype):
    if dtype is None:
        return torch.autocast(dev.type, enabled=False)
    return torch.autocast(dev.type, dtype=dtype, cache_enabled=False)


def time_callable(fn, dev, min_time: float, min_iters: int = 3, warmup: int = 2, windows: int = 3) -> tuple[float, int]:
    """Seconds per call (median of 3 windows, each of >= ``min_iters`` calls lasting >= ``min_time`` s)."""
    for _ in range(warmup):
        fn()
    common.sync(dev)
    # size the window
    n = min_iters
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        common.sync(dev)
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 4096:
            break
        n = max(n * 2, int(n * min_time / max(dt, 1e-6)) + 1)
    per = [dt / n]
    for _ in range(windows - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        common.sync(dev)
        per.append((time.perf_counter() - t0) / n)
    return float(sorted(per)[len(per) // 2]), n


def measure(net, x, dev, dtype, min_time, mode="eager"):
    """Throughput of ``net(x)``; ``mode``: eager | graph (manual CUDA graph capture)."""
    with torch.inference_mode():
        if mode == "graph":
            static_x = x.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), _autocast(dev, dtype):
                for _ in range(3):
                    net(static_x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), _autocast(dev, dtype):
                net(static_x)
            fn = g.replay
        else:

            def fn():
                with _autocast(dev, dtype):
                    return net(x)

        return time_callable(fn, dev, min_time)


def _entry(name, batch, sec, n, flops, peak, **labels):
    sps = batch / sec
    tf = flops * sps / 1e12
    return {"net": name, "batch": batch, "ms_per_batch": round(sec * 1e3, 4), "slices_per_s": round(sps, 1), "iters": n,
            "gflop_per_slice": round(flops / 1e9, 3), "tflops": round(tf, 2), "fraction_of_peak": round(tf / peak, 4) if peak == peak else None, **labels}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--phase", choices=["eager", "graphs", "compile", "all"], default="eager")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--width", type=int, default=32, help="network width (32 = bundled model, 64 = paper/torchvision size)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile-batches", type=int, nargs="+", default=[32])
    ap.add_argument("--compile-modes", nargs="+", default=["reduce-overhead", "max-autotune-no-cudagraphs"])
    ap.add_argument("--min-time", type=float, default=0.25, help="seconds per timing window")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/networks.json")
    ap.add_argument("--quick", action="store_true", help="smoke test: 64 x 64, batch 2, fp32, eager, CPU ok")
    a = ap.parse_args(argv)
    if a.quick:
        a.size, a.batches, a.dtypes, a.min_time, a.phase = 64, [2], ["fp32"], 0.01, "eager"
    dev = torch.device(a.device if (a.device != "cuda" or torch.cuda.is_available()) else "cpu")
    rf = ResultFile(a.out, "networks", vars(a))
    if a.device == "cuda" and dev.type != "cuda":
        log("no CUDA device: GPU network benchmark skipped")
        rf.add({"name": "networks", "skipped": "no CUDA device (torch.cuda.is_available() is False)"})
        return 0
    peak = common.peak_tflops(torch.cuda.get_device_name(0)) if dev.type == "cuda" else float("nan")
    rf.doc["peak_tflops_used"] = peak
    nets = build_nets(a.width)
    shape = (1, a.size, a.size)
    flops = {k: flops_per_item(v, shape) for k, v in nets.items()}
    rf.doc["gflop_per_slice"] = {k: round(v / 1e9, 3) for k, v in flops.items()}
    log(f"GFLOP/slice at {a.size}x{a.size}: {rf.doc['gflop_per_slice']}")
    dtypes = [d for d in a.dtypes if dev.type == "cuda" or d != "fp16"]

    phases = ["eager", "graphs", "compile"] if a.phase == "all" else [a.phase]
    for phase in phases:
        for name, net0 in nets.items():
            if phase == "eager":
                for cl in (False, True):
                    net = net0.to(dev).to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                    for dt in dtypes:
                        for b in a.batches:
                            def run(net=net, b=b, dt=dt, cl=cl, name=name):
                                x = torch.rand(b, *shape, device=dev)
                                if cl:
                                    x = x.contiguous(memory_format=torch.channels_last)
                                sec, n = measure(net, x, dev, DTYPES[dt], a.min_time)
                                return _entry(name, b, sec, n, flops[name], peak, dtype=dt, channels_last=cl, mode="eager")

                            rf.guarded("throughput", run, phase=phase, net=name, dtype=dt, batch=b, channels_last=cl)
            elif phase == "graphs":
                if dev.type != "cuda":
                    continue
                net = net0.to(dev).to(memory_format=torch.channels_last)
                for b in [bb for bb in a.batches if bb >= 8]:
                    def run(net=net, b=b, name=name):
                        x = torch.rand(b, *shape, device=dev).contiguous(memory_format=torch.channels_last)
                        sec, n = measure(net, x, dev, torch.bfloat16, a.min_time, mode="graph")
                        return _entry(name, b, sec, n, flops[name], peak, dtype="bf16", channels_last=True, mode="cuda_graph")

                    rf.guarded("throughput", run, phase=phase, net=name, dtype="bf16", batch=b, channels_last=True)
            elif phase == "compile":
                if dev.type != "cuda":
                    continue
                for mode in a.compile_modes:
                    for b in a.compile_batches:
                        def run(net0=net0, b=b, mode=mode, name=name):
                            torch._dynamo.reset()
                            net = net0.to(dev).to(memory_format=torch.channels_last)
                            cnet = torch.compile(net, mode=mode, dynamic=False)
                            x = torch.rand(b, *shape, device=dev).contiguous(memory_format=torch.channels_last)
                            t0 = time.perf_counter()
                            with torch.no_grad(), _autocast(dev, torch.bfloat16):
                                for _ in range(3):
                                    cnet(x)
                            common.sync(dev)
                            ct = time.perf_counter() - t0

                            def fn():
                                with torch.no_grad(), _autocast(dev, torch.bfloat16):
                                    return cnet(x)

                            sec, n = time_callable(fn, dev, a.min_time)
                            return _entry(name, b, sec, n, flops[name], peak, dtype="bf16", channels_last=True, mode=f"compile:{mode}", compile_s=round(ct, 1))

                        rf.guarded("throughput", run, phase=phase, net=name, dtype="bf16", batch=b, channels_last=True, mode=mode)
        if phase == "eager" and not a.no_peers:
            _peers(rf, dev, a, peak)
    return 0


def _peers(rf, dev, a, peak):
    """Peers' networks at bf16 channels-last (CUDA) or fp32 (CPU): 2-D U-Net at 512 (320 in --quick), 3-D U-Net per patch."""
    import peers

    from lsnet.method.snet import UNetSNet

    dt = torch.bfloat16 if dev.type == "cuda" else None
    size2d = 512 if not a.quick else 64
    patch = 128
    torch.manual_seed(0)
    u2 = UNetSNet("resnet34", 1, 1, a.width).eval()
    u3 = peers.PlainUNet3D().eval()
    f2 = flops_per_item(u2, (1, size2d, size2d))
    cases = [("unet2d_resnet34", u2, (1, size2d, size2d), f2, [8, 32] if not a.quick else [1], torch.channels_last)]
    if not a.quick:  # a 3-D forward costs seconds on a CPU: not in the smoke test
        f3 = flops_per_item(u3, (1, patch, patch, patch))
        cases.append(("unet3d_nnunet", u3, (1, patch, patch, patch), f3, [1, 2] if dev.type == "cuda" else [1], torch.channels_last_3d))
    for name, net, shape, fl, batches, fmt in cases:
        net = net.to(dev).to(memory_format=fmt)
        for b in batches:
            def run(net=net, b=b, shape=shape, fl=fl, name=name, fmt=fmt):
                x = torch.rand(b, *shape, device=dev).contiguous(memory_format=fmt)
                sec, n = measure(net, x, dev, dt, a.min_time if dev.type == "cuda" else 0.01)
                e = _entry(name, b, sec, n, fl, peak, dtype="bf16" if dt is not None else "fp32", channels_last=True, mode="eager")
                e["input"] = "x".join(str(s) for s in shape[1:])
                if name.startswith("unet3d"):
                    e["patches_per_s"] = e.pop("slices_per_s")
                    e["gflop_per_patch"] = e.pop("gflop_per_slice")
                return e

            rf.guarded("throughput", run, phase="peers", net=name, batch=b)


if __name__ == "__main__":
    sys.exit(main())
