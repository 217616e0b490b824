"""From L-Net outputs to RoIs (inference rule of section 2.5) and the training-time keypoint draw.

Inference: ``K > 0.5`` -> 8-connected components -> the centre of each component is its keypoint ->
the regressed ``(l, r, t, b)`` at that keypoint give the box.  Open choices (docs/method.md):

* "centre" of a component = the component cell closest to the component's centroid (the centroid cell
  itself when it lies in the component; a centroid can fall outside a curved component, and T is
  only trained near true centres);
* score of an RoI = the maximum heatmap value in its component;
* ``l + r`` and ``t + b`` are at least ``min_box_size`` input pixels (a zero-size box has a singular theta).

Training (section 2.5): a keypoint drawn at random among the top-3 "highest probability" keypoints.
We take the top-3 *local maxima* (3x3 max-pool non-maximum suppression) so the three candidates are
distinct keypoints rather than three neighbouring pixels of the same peak (open choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lsnet.method.components import components
from lsnet.method.heatmap import STRIDE


@dataclass
class DecodedRois:
    """RoIs of a batch in L-Net input pixels: ``batch (N,)``, ``keypoints (N, 2)`` = (4x+2, 4y+2),
    ``ltrb (N, 4)``, ``boxes (N, 4)`` = (u-l, v-t, u+r, v+b), ``scores (N,)``."""

    batch: torch.Tensor
    keypoints: torch.Tensor
    ltrb: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return int(self.batch.shape[0])


def _gather(T: torch.Tensor, batch: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    return T[batch, :, cells[:, 1], cells[:, 0]]  # (N, 4)


def rois_from_cells(T: torch.Tensor, batch: torch.Tensor, cells: torch.Tensor, scores: torch.Tensor, min_box_size: float = 4.0) -> DecodedRois:
    """RoIs at given cells ``(N, 2)`` = (x, y) of the stride-4 map; ``T`` ``(B, 4, h, w)``."""
    ltrb = _gather(T, batch, cells)
    if min_box_size > 0:
        lr = ltrb[:, 0] + ltrb[:, 1]
        tb = ltrb[:, 2] + ltrb[:, 3]
        grow_x = ((min_box_size - lr).clamp_min(0) / 2).unsqueeze(1)
        grow_y = ((min_box_size - tb).clamp_min(0) / 2).unsqueeze(1)
        ltrb = ltrb + torch.cat([grow_x, grow_x, grow_y, grow_y], 1)
    kp = cells.to(T.dtype) * STRIDE + STRIDE / 2
    boxes = torch.stack([kp[:, 0] - ltrb[:, 0], kp[:, 1] - ltrb[:, 2], kp[:, 0] + ltrb[:, 1], kp[:, 1] + ltrb[:, 3]], 1)
    return DecodedRois(batch, kp, ltrb, boxes, scores)


def decode(heatmap: torch.Tensor, T: torch.Tensor, threshold: float = 0.5, min_box_size: float = 4.0) -> DecodedRois:
    """Inference rule. ``heatmap`` = sigmoid(K logits) ``(B, 1, h, w)``; ``T`` ``(B, 4, h, w)``."""
    comp = components(heatmap[:, 0] > threshold)
    if len(comp) == 0:
        z = torch.zeros(0, dtype=torch.long, device=heatmap.device)
        return rois_from_cells(T, z, torch.zeros(0, 2, dtype=torch.long, device=heatmap.device), heatmap.new_zeros(0), min_box_size)
    vals = heatmap[:, 0][comp.pixel_index[:, 0], comp.pixel_index[:, 1], comp.pixel_index[:, 2]]
    scores = heatmap.new_zeros(len(comp)).scatter_reduce(0, comp.pixel_component, vals, "amax", include_self=False)
    return rois_from_cells(T, comp.batch, comp.centre_cell, scores, min_box_size)


def sample_topk_keypoints(heatmap: torch.Tensor, k: int = 3, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training draw: for every image one cell among its top-``k`` local maxima, uniformly.

    ``heatmap`` ``(B, 1, h, w)`` -> ``cells (B, 2)`` = (x, y) and their heatmap values ``(B,)``.
    """
    b, _, h, w = heatmap.shape
    peaks = heatmap * (F.max_pool2d(heatmap, 3, 1, 1) == heatmap)
    kk = min(k, h * w)
    vals, idx = peaks.view(b, -1).topk(kk, dim=1)
    pick = torch.randint(0, kk, (b,), device=heatmap.device, generator=generator)
    chosen = idx[torch.arange(b, device=heatmap.device), pick]
    return torch.stack([chosen % w, chosen // w], 1), vals[torch.arange(b, device=heatmap.device), pick]
