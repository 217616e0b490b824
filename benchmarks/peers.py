"""Peer segmentation pipelines for the speed comparison (random weights: speed only, never accuracy).

Three things other tools do with a CT, run on the same input, device and batch size as L-SNet:

* :class:`UNet2DPipeline` - "what a simple tool does": a ResNet34 U-Net (``lsnet.method.snet.UNetSNet``)
  on every full 512 x 512 axial slice, threshold, done.
* :class:`CoarseToFinePipeline` - the 2-D coarse-to-fine cascade L-SNet replaces (Zhou et al. 2017
  style): coarse U-Net on every full slice -> bounding box of the coarse mask padded by 15 px ->
  crop resampled to 320 x 320 -> fine U-Net -> pasted back.  Slices with an empty coarse mask skip the
  fine stage (the same skip L-SNet gets on slices without RoIs).
* :class:`UNet3DPipeline` - an nnU-Net-sized 3-D U-Net (:class:`PlainUNet3D`: 6 stages, 32..320
  channels, two conv3d-InstanceNorm-LeakyReLU per stage, strided-conv down-sampling, transposed-conv
  up-sampling) with sliding-window inference of 128^3 patches at 50 % overlap and Gaussian
  weighting, on the CT resampled to 1.5 mm isotropic; probabilities are resampled back to the
  original grid (what TotalSegmentator runs per model).  Our own ~150 lines: no MONAI/nnU-Net
  install.  This peer is *optimistic*: resampling is trilinear on the compute device (nnU-Net
  resamples on the CPU with third-order splines), no test-time mirroring.

Random weights make random masks; every head bias is shifted so the peers produce a plausible amount
of foreground (``calibrate_*``), so that the data-dependent parts (coarse boxes, mask writing) cost
what they would with a trained model.  All pipelines return ``(mask uint8 (K, J, I) canonical,
timings dict)`` and are timed with ``torch.cuda.synchronize`` at stage borders.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lsnet.method.recalibration import paste_back, recalibrate, theta_from_xyxy
from lsnet.method.snet import UNetSNet
from lsnet.pipeline.preprocess import window

PEER_WINDOW = (0.0, 255.0)  # same HU window as the bundled L-SNet model
VOXEL_FRACTION = 0.002  # foreground fraction the peer heads are calibrated to (pancreas: ~0.1-0.3 % of a CT)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _autocast(dev, amp=True):
    return torch.autocast("cuda", dtype=torch.bfloat16) if (dev.type == "cuda" and amp) else nullcontext()


def _prepare(net: nn.Module, dev: torch.device, channels_last: bool, dims: int = 2) -> nn.Module:
    net = net.eval().to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    return net


def _shift_bias(conv: nn.Conv2d | nn.Conv3d, logits: torch.Tensor, fraction: float, channel: int = 0) -> None:
    """Shift ``conv``'s bias so that ``fraction`` of ``logits`` (computed with the current bias) become > 0."""
    q = float(torch.quantile(logits.float().flatten()[:: max(1, logits.numel() // 1_000_000)], 1.0 - fraction))
    with torch.no_grad():
        conv.bias[channel] -= q


# ------------------------------------------------------------------------------------------ 2-D peers
class UNet2DPipeline:
    """ResNet34 U-Net over every full-resolution slice (no resampling)."""

    name = "unet2d"

    def __init__(self, width: int, device: torch.device, batch_size: int, channels_last: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.dev, self.bs, self.cl = device, batch_size, channels_last
        self.net = _prepare(UNetSNet("resnet34", 1, 1, width), device, channels_last)

    def _in(self, raw: np.ndarray) -> torch.Tensor:
        x = window(torch.from_numpy(np.ascontiguousarray(raw)).to(self.dev, non_blocking=True)[:, None], PEER_WINDOW)
        return x.contiguous(memory_format=torch.channels_last) if self.cl else x

    @torch.inference_mode()
    def calibrate(self, arr: np.ndarray) -> None:
        x = self._in(arr[: min(8, arr.shape[0])])
        with _autocast(self.dev):
            _shift_bias(self.net.head, self.net(x), VOXEL_FRACTION)

    @torch.inference_mode()
    def run(self, arr: np.ndarray):
        k = arr.shape[0]
        mask = np.zeros(arr.shape, np.uint8)
        t = {"preprocess": 0.0, "network": 0.0, "postprocess": 0.0}
        slices_run = 0
        for s in range(0, k, self.bs):
            t0 = time.perf_counter()
            x = self._in(arr[s : s + self.bs])
            slices_run += x.shape[0]
            _sync(self.dev)
            t1 = time.perf_counter()
            with _autocast(self.dev):
                y = self.net(x)
            _sync(self.dev)
            t2 = time.perf_counter()
            mask[s : s + self.bs] = (y[:, 0] > 0).to(torch.uint8).cpu().numpy()
            t3 = time.perf_counter()
            t["preprocess"] += t1 - t0
            t["network"] += t2 - t1
            t["postprocess"] += t3 - t2
        return mask, t, {"slices_run": slices_run, "slices_total": k}


class CoarseToFinePipeline(UNet2DPipeline):
    """Coarse U-Net on the full slice -> box of its mask + 15 px -> 320 x 320 crop -> fine U-Net -> paste."""

    name = "coarse_to_fine"
    PAD = 15.0
    FINE = 320
    FIRE_FRACTION = 0.25

    def __init__(self, width: int, device: torch.device, batch_size: int, channels_last: bool, seed: int = 0):
        super().__init__(width, device, batch_size, channels_last, seed)
        self.coarse = self.net
        self.fine = _prepare(UNetSNet("resnet34", 1, 1, width), device, channels_last)

    @torch.inference_mode()
    def calibrate(self, arr: np.ndarray) -> None:
        """Coarse: foreground on ~25 % of slices (like L-Net's RoIs); fine: ``VOXEL_FRACTION`` of a crop."""
        x = self._in(arr[:: max(1, arr.shape[0] // 16)][:16])
        with _autocast(self.dev):
            y = self.coarse(x).float()
        peak = y.amax(dim=(1, 2, 3))
        q = float(torch.quantile(peak, 1.0 - self.FIRE_FRACTION))
        with torch.no_grad():
            self.coarse.head.bias[0] -= q
            # within a firing slice keep the coarse blob small: the top voxels only
        roi = recalibrate(x, theta_from_xyxy(torch.tensor([[150.0, 150.0, 350.0, 350.0]], device=self.dev).expand(x.shape[0], 4), x.shape[-2:], 2 * self.PAD), (self.FINE, self.FINE))
        with _autocast(self.dev):
            _shift_bias(self.fine.head, self.fine(roi), 0.05)

    @torch.inference_mode()
    def run(self, arr: np.ndarray):
        k, h, w = arr.shape
        mask = np.zeros(arr.shape, np.uint8)
        t = {"preprocess": 0.0, "coarse": 0.0, "box_crop": 0.0, "fine": 0.0, "postprocess": 0.0}
        n_fine = slices_run = 0
        for s in range(0, k, self.bs):
            t0 = time.perf_counter()
            x = self._in(arr[s : s + self.bs])
            slices_run += x.shape[0]
            _sync(self.dev)
            t1 = time.perf_counter()
            with _autocast(self.dev):
                cm = self.coarse(x)[:, 0] > 0  # (B, H, W)
            _sync(self.dev)
            t2 = time.perf_counter()
            rows, cols = cm.any(2), cm.any(1)  # (B, H), (B, W)
            has = rows.any(1)
            idx = torch.nonzero(has).flatten()
            n = int(idx.numel())
            out = torch.zeros(cm.shape, dtype=torch.uint8, device=self.dev)
            if n:
                ar_h = torch.arange(h, device=self.dev)
                ar_w = torch.arange(w, device=self.dev)
                r, c = rows[idx], cols[idx]
                y0 = torch.where(r, ar_h, h).amin(1).float()
                y1 = torch.where(r, ar_h, -1).amax(1).float() + 1
                x0 = torch.where(c, ar_w, w).amin(1).float()
                x1 = torch.where(c, ar_w, -1).amax(1).float() + 1
                theta = theta_from_xyxy(torch.stack([x0, y0, x1, y1], 1), (h, w), 2 * self.PAD)  # alpha/2 = 15 px per side
                roi = recalibrate(x[idx], theta, (self.FINE, self.FINE))
                _sync(self.dev)
                t3 = time.perf_counter()
                with _autocast(self.dev):
                    fm = self.fine(roi)
                _sync(self.dev)
                t4 = time.perf_counter()
                p = paste_back(torch.sigmoid(fm.float()), theta, (h, w))[:, 0]
                out[idx] = (p > 0.5).to(torch.uint8)
            else:
                t3 = t4 = t2
            mask[s : s + self.bs] = out.cpu().numpy()
            t5 = time.perf_counter()
            n_fine += n
            t["preprocess"] += t1 - t0
            t["coarse"] += t2 - t1
            t["box_crop"] += t3 - t2
            t["fine"] += t4 - t3
            t["postprocess"] += t5 - t4
        t["network"] = t["coarse"] + t["fine"]
        return mask, t, {"fine_crops": n_fine, "fine_crops_per_slice": n_fine / k, "slices_run": slices_run, "slices_total": k}


# ------------------------------------------------------------------------------------------ 3-D peer
def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride, 1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, 1, 1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class PlainUNet3D(nn.Module):
    """nnU-Net "3d_fullres"-sized plain U-Net: ``(B, 1, D, H, W)`` -> logits ``(B, classes, D, H, W)``.

    Stages (features): 32, 64, 128, 256, 320, 320; the first stage keeps the resolution, each later
    one starts with a stride-2 conv; decoder: stride-2 transposed conv to the skip's channels,
    concatenation, two conv-IN-LeakyReLU; 1x1x1 head (deep supervision heads off, as at inference).
    """

    FEATURES = (32, 64, 128, 256, 320, 320)

    def __init__(self, in_channels: int = 1, classes: int = 2, features=FEATURES):
        super().__init__()
        self.enc = nn.ModuleList()
        cin = in_channels
        for i, f in enumerate(features):
            self.enc.append(_conv_block(cin, f, 1 if i == 0 else 2))
            cin = f
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(features) - 1, 0, -1):
            self.up.append(nn.ConvTranspose3d(features[i], features[i - 1], 2, 2))
            self.dec.append(_conv_block(2 * features[i - 1], features[i - 1], 1))
        self.head = nn.Conv3d(features[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for e in self.enc:
            x = e(x)
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], 1))
        return self.head(x)


def gaussian_importance(patch: int, device, sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """nnU-Net's patch weighting: a Gaussian with sigma = patch/8 centred in the patch, ``(P, P, P)``, max 1."""
    c = torch.arange(patch, dtype=torch.float32, device=device) - (patch - 1) / 2
    g = torch.exp(-(c**2) / (2 * (patch * sigma_scale) ** 2))
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    w = w / w.max()
    return w.clamp_min(w[w > 0].min())


def window_starts(size: int, patch: int, step: int) -> list[int]:
    """Patch start positions covering ``[0, size)`` with ``step`` (last one flush with the end)."""
    if size <= patch:
        return [0]
    n = int(math.ceil((size - patch) / step)) + 1
    return sorted({min(i * step, size - patch) for i in range(n)})


class UNet3DPipeline:
    """Resample to 1.5 mm -> sliding window 128^3, 50 % overlap, Gaussian weights -> resample back -> argmax."""

    name = "unet3d_sliding_window"
    TARGET_MM = 1.5
    PATCH = 128
    CT_CLIP = (-160.0, 240.0)  # abdominal soft-tissue clip, then z-score (nnU-Net "CT" normalisation)

    def __init__(self, device: torch.device, channels_last: bool, patch_batch: int = 1, seed: int = 0, max_patches: int | None = None):
        """``max_patches``: ``None`` or ``0`` = the whole sliding window (every patch); ``N > 0`` = stop after
        the first ``N`` patches (a partial window: :meth:`run` reports ``patches < patches_total`` and the
        caller must label its network time as extrapolated)."""
        if max_patches is not None and max_patches < 0:
            raise ValueError(f"max_patches must be None, 0 (every patch) or a positive count, not {max_patches}")
        torch.manual_seed(seed)
        self.dev, self.cl, self.pb = device, channels_last, patch_batch
        self.net = _prepare(PlainUNet3D(), device, channels_last, dims=3)
        self.max_patches = max_patches or None  # 0 -> None: every patch

    def _norm(self, arr: np.ndarray, spacing_ijk) -> torch.Tensor:
        k, h, w = arr.shape
        sx, sy, sz = (float(v) for v in spacing_ijk)
        shape = (max(1, round(k * sz / self.TARGET_MM)), max(1, round(h * sy / self.TARGET_MM)), max(1, round(w * sx / self.TARGET_MM)))
        vol = torch.from_numpy(np.ascontiguousarray(arr)).to(self.dev)
        lo, hi = self.CT_CLIP
        x = ((vol.float().clamp_(lo, hi) - 40.0) / 100.0)[None, None]
        del vol
        return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)

    @torch.inference_mode()
    def calibrate(self, arr: np.ndarray, spacing_ijk) -> None:
        x = self._norm(arr, spacing_ijk)
        p = self.PATCH
        d, h, w = x.shape[-3:]
        sl = x[..., max(0, d // 2 - p // 2) : max(0, d // 2 - p // 2) + p, max(0, h // 2 - p // 2) : max(0, h // 2 - p // 2) + p, max(0, w // 2 - p // 2) : max(0, w // 2 - p // 2) + p]
        sl = F.pad(sl, (0, p - sl.shape[-1], 0, p - sl.shape[-2], 0, p - sl.shape[-3]))
        if self.cl:
            sl = sl.contiguous(memory_format=torch.channels_last_3d)
        with _autocast(self.dev):
            y = self.net(sl).float()
        _shift_bias(self.net.head, y[:, 1] - y[:, 0], VOXEL_FRACTION, channel=1)

    @torch.inference_mode()
    def run(self, arr: np.ndarray, spacing_ijk):
        t = {}
        t0 = time.perf_counter()
        x = self._norm(arr, spacing_ijk)
        p, step = self.PATCH, self.PATCH // 2
        pad = [max(0, p - s) for s in x.shape[-3:]]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        d, h, w = x.shape[-3:]
        starts = [(a, b, c) for a in window_starts(d, p, step) for b in window_starts(h, p, step) for c in window_starts(w, p, step)]
        n_total = len(starts)
        if self.max_patches:
            starts = starts[: self.max_patches]
        if not starts:  # never report a window that ran no patch
            raise RuntimeError("3-D sliding window ran no patch")
        gauss = gaussian_importance(p, self.dev)
        acc = torch.zeros((2, d, h, w), dtype=torch.float32, device=self.dev)
        norm = torch.zeros((d, h, w), dtype=torch.float32, device=self.dev)
        _sync(self.dev)
        t1 = time.perf_counter()
        for i in range(0, len(starts), self.pb):
            chunk = starts[i : i + self.pb]
            xb = torch.cat([x[..., a : a + p, b : b + p, c : c + p] for a, b, c in chunk])
            if self.cl:
                xb = xb.contiguous(memory_format=torch.channels_last_3d)
            with _autocast(self.dev):
                y = self.net(xb).float()
            for j, (a, b, c) in enumerate(chunk):
                acc[:, a : a + p, b : b + p, c : c + p] += y[j] * gauss
                norm[a : a + p, b : b + p, c : c + p] += gauss
        _sync(self.dev)
        t2 = time.perf_counter()
        fg = (acc[1] - acc[0]) / norm  # weighted logit margin; > 0 <=> argmax = foreground
        del acc, norm
        fg = fg[: d - pad[0], : h - pad[1], : w - pad[2]]
        mask = self._resample_back(fg, arr.shape)
        t3 = time.perf_counter()
        t.update({"preprocess": t1 - t0, "network": t2 - t1, "postprocess": t3 - t2})
        info = {"patches": len(starts), "patches_total": n_total, "resampled_shape": list(x.shape[-3:])}
        return mask, t, info

    def _resample_back(self, fg: torch.Tensor, shape) -> np.ndarray:
        """Trilinear resampling of ``fg`` (D, H, W) onto ``shape`` (K, J, I), in chunks of output slices -> uint8 mask."""
        k, hh, ww = shape
        d = fg.shape[0]
        mask = np.zeros(shape, np.uint8)
        chunk = 32
        for s in range(0, k, chunk):
            e = min(k, s + chunk)
            src = (torch.arange(s, e, device=fg.device, dtype=torch.float32) + 0.5) * d / k - 0.5
            src = src.clamp(0, d - 1)
            lo = src.floor().long()
            hi = (lo + 1).clamp(max=d - 1)
            wgt = (src - lo.float())[:, None, None]
            need = torch.unique(torch.cat([lo, hi]))
            planes = F.interpolate(fg[need][:, None], size=(hh, ww), mode="bilinear", align_corners=False)[:, 0]
            pos = torch.searchsorted(need, lo), torch.searchsorted(need, hi)
            out = planes[pos[0]] * (1 - wgt) + planes[pos[1]] * wgt
            mask[s:e] = (out > 0).to(torch.uint8).cpu().numpy()
        return mask
