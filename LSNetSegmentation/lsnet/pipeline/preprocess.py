"""Slice preprocessing: HU window and the in-plane scale policy (choices the paper leaves open).

Window.  HU are clipped to ``config.window`` (default [0, 255] HU, the window of the public 2-D NIH
slices the bundled model learns from) and mapped linearly to [0, 1].

Scale policy.  Every canonical axial slice is resampled in-plane to a fixed physical pixel size
``config.spacing`` (1.25 mm by default: a 512 x 0.8 mm slice becomes ~328 px, close to the paper's
H = W = 320) and padded on the right/bottom with 0 to a multiple of 32 (L-Net down-samples 5 times).
Why physical spacing rather than a fixed 320 x 320 resize: organ size in pixels then no longer depends
on the scanner's field of view, so a 64 px / 3 mm slice and a 1024 px / 0.5 mm slice both present the
pancreas at the scale the networks were trained on.  The whole field of view is kept (no crop), so
L-Net sees the same context whatever the input size; memory grows with the field of view, not with the
pixel count (a 1024 x 0.5 mm slice becomes 410 -> 416 px).

Geometry.  With original size ``(H0, W0)`` and resampled size ``(Hr, Wr) = round(H0 * sy / s)``...,
the canvas pixel (edge) coordinate is ``u = x * f_x`` with ``f_x = Wr / W0`` exactly (bilinear
resizing with align_corners=False maps pixel edges to pixel edges), and padding does not move the
origin.  ``SliceGrid`` carries these numbers; tests check the round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def window(hu, lo_hi: tuple[float, float]):
    """HU -> [0, 1] float32 (numpy array or tensor)."""
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


@dataclass(frozen=True)
class SliceGrid:
    """Geometry of one slice through preprocessing.

    ``original_hw`` (H0, W0); ``resized_hw`` (Hr, Wr); ``canvas_hw`` (Hc, Wc) multiples of 32;
    ``f`` = (f_x, f_y) = (Wr / W0, Hr / H0): canvas pixel coordinates = original ones * f.
    """

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    canvas_hw: tuple[int, int]

    @property
    def f(self) -> tuple[float, float]:
        return self.resized_hw[1] / self.original_hw[1], self.resized_hw[0] / self.original_hw[0]

    def paste_scale(self) -> tuple[float, float]:
        """``scale`` argument of ``recalibration.paste_back`` to paste canvas-frame RoIs into the original grid."""
        fx, fy = self.f
        return fx * self.original_hw[1] / self.canvas_hw[1], fy * self.original_hw[0] / self.canvas_hw[0]

    def to_original_xyxy(self, boxes: torch.Tensor) -> torch.Tensor:
        fx, fy = self.f
        return boxes / boxes.new_tensor([fx, fy, fx, fy])

    def to_canvas_xyxy(self, boxes: torch.Tensor) -> torch.Tensor:
        fx, fy = self.f
        return boxes * boxes.new_tensor([fx, fy, fx, fy])


def slice_grid(original_hw: tuple[int, int], spacing_xy: tuple[float, float], target_spacing: float, pad_multiple: int = 32) -> SliceGrid:
    """The scale policy (module docstring). ``spacing_xy`` = (column spacing, row spacing) in mm."""
    h0, w0 = int(original_hw[0]), int(original_hw[1])
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    hr = max(1, int(round(h0 * sy / target_spacing)))
    wr = max(1, int(round(w0 * sx / target_spacing)))
    hc = max(pad_multiple, int(math.ceil(hr / pad_multiple)) * pad_multiple)
    wc = max(pad_multiple, int(math.ceil(wr / pad_multiple)) * pad_multiple)
    return SliceGrid((h0, w0), (hr, wr), (hc, wc))


def to_canvas(slices: torch.Tensor, grid: SliceGrid) -> torch.Tensor:
    """``(B, C, H0, W0)`` windowed slices -> ``(B, C, Hc, Wc)`` resampled and zero-padded."""
    x = slices
    if tuple(x.shape[-2:]) != grid.resized_hw:
        down = grid.resized_hw[0] < grid.original_hw[0] or grid.resized_hw[1] < grid.original_hw[1]
        x = F.interpolate(x, size=grid.resized_hw, mode="bilinear", align_corners=False, antialias=down)
    ph = grid.canvas_hw[0] - grid.resized_hw[0]
    pw = grid.canvas_hw[1] - grid.resized_hw[1]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


def canvas_to_original(maps: torch.Tensor, grid: SliceGrid) -> torch.Tensor:
    """Resample canvas-aligned maps ``(B, C, h, w)`` (any h, w covering the canvas, e.g. the stride-4
    heatmap) onto the original slice grid ``(B, C, H0, W0)`` with bilinear interpolation."""
    ax, ay = grid.paste_scale()
    theta = maps.new_tensor([[ax, 0.0, ax - 1.0], [0.0, ay, ay - 1.0]]).float().expand(maps.shape[0], 2, 3)
    g = F.affine_grid(theta, [maps.shape[0], maps.shape[1], *grid.original_hw], align_corners=False)
    return F.grid_sample(maps.float(), g, mode="bilinear", padding_mode="border", align_corners=False)


def stack_channels(volume_kji: np.ndarray, start: int, stop: int, in_channels: int) -> np.ndarray:
    """Slices ``start:stop`` as ``(B, C, J, I)``; with C = 3 (2.5-D) channels are k-1, k, k+1, clamped at the ends."""
    if in_channels == 1:
        return np.asarray(volume_kji[start:stop])[:, None]
    if in_channels != 3:
        raise ValueError("in_channels must be 1 (single slice) or 3 (2.5-D)")
    k = volume_kji.shape[0]
    idx = np.arange(start, stop)
    chans = [np.clip(idx + d, 0, k - 1) for d in (-1, 0, 1)]
    return np.stack([np.asarray(volume_kji[c]) for c in chans], axis=1)
