"""Metrics of the paper's tables, shared by training-time validation and ``evaluate.py``.

* slice DSC / precision / recall (Table 1): per slice, then averaged over slices.  On a slice whose
  ground truth is empty DSC is undefined; those slices are reported separately as the false-positive
  slice rate (share of background slices with any predicted pixel) instead.
* mIoU (Tables 3-4): for every ground-truth object (8-connected component of a slice's label, the
  objects L-Net is trained to box) the best IoU with any predicted box (0 when there is none),
  averaged over objects.
* per-volume DSC and HD95 (mm) for volumes (evaluate.py).
"""

from __future__ import annotations

import numpy as np
import torch


def slice_scores(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """``pred``/``target`` ``(B, H, W)`` binary -> per-slice tensors ``dsc``, ``precision``, ``recall``
    (NaN where undefined), ``gt_any`` and ``pred_any`` ``(B,)`` bool."""
    p = pred.flatten(1).float()
    t = target.flatten(1).float()
    tp = (p * t).sum(1)
    ps, ts = p.sum(1), t.sum(1)
    nan = torch.full_like(tp, float("nan"))
    dsc = torch.where(ts > 0, 2 * tp / (ps + ts).clamp_min(1e-9), nan)
    precision = torch.where(ps > 0, tp / ps.clamp_min(1e-9), torch.where(ts > 0, torch.zeros_like(tp), nan))
    recall = torch.where(ts > 0, tp / ts.clamp_min(1e-9), nan)
    return {"dsc": dsc, "precision": precision, "recall": recall, "gt_any": ts > 0, "pred_any": ps > 0}


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix ``(N, M)`` of boxes ``(N, 4)`` and ``(M, 4)`` in ``(x0, y0, x1, y1)``."""
    if a.numel() == 0 or b.numel() == 0:
        return torch.zeros(a.shape[0], b.shape[0], device=a.device)
    x0 = torch.maximum(a[:, None, 0], b[None, :, 0])
    y0 = torch.maximum(a[:, None, 1], b[None, :, 1])
    x1 = torch.minimum(a[:, None, 2], b[None, :, 2])
    y1 = torch.minimum(a[:, None, 3], b[None, :, 3])
    inter = (x1 - x0).clamp_min(0) * (y1 - y0).clamp_min(0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-9)


def object_best_ious(gt_boxes: torch.Tensor, gt_batch: torch.Tensor, pred_boxes: torch.Tensor, pred_batch: torch.Tensor) -> torch.Tensor:
    """For each ground-truth object ``(N,)``: its best IoU with a predicted box of the same image."""
    out = torch.zeros(gt_boxes.shape[0], device=gt_boxes.device)
    if gt_boxes.shape[0] == 0 or pred_boxes.shape[0] == 0:
        return out
    iou = box_iou(gt_boxes.float(), pred_boxes.float())
    same = gt_batch.view(-1, 1) == pred_batch.view(1, -1)
    iou = torch.where(same, iou, torch.zeros_like(iou))
    return iou.max(1).values


class MeanAccumulator:
    """Running means of named values, NaN ignored; ``result()`` -> {name: mean or None} and counts."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict = {}

    def add(self, name: str, values) -> None:
        v = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
        v = v[~torch.isnan(v)]
        self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
        self.counts[name] = self.counts.get(name, 0) + int(v.numel())

    def result(self) -> dict:
        return {k: (self.sums[k] / self.counts[k] if self.counts[k] else None) for k in self.sums}


def volume_scores(pred: np.ndarray, target: np.ndarray, spacing_kji) -> dict:
    """Per-volume scores of a ``(K, J, I)`` prediction against its label (same array order):
    ``vol_dsc``, ``hd95_mm``, ``slices_with_mask``, ``label_slices``, and the false-positive slice counts
    ``fp_slices`` (slices without foreground that get a prediction) out of ``bg_slices``."""
    on = (pred > 0).any(axis=(1, 2))
    bg = ~(target > 0).any(axis=(1, 2))
    return {"vol_dsc": volume_dsc(pred, target), "hd95_mm": hd95(pred, target, spacing_kji),
            "slices_with_mask": int(on.sum()), "label_slices": int((~bg).sum()),
            "fp_slices": int((on & bg).sum()), "bg_slices": int(bg.sum())}


def volume_dsc(pred: np.ndarray, target: np.ndarray) -> float:
    p, t = pred > 0, target > 0
    s = p.sum() + t.sum()
    return float(2 * np.logical_and(p, t).sum() / s) if s else float("nan")


def hd95(pred: np.ndarray, target: np.ndarray, spacing_kji) -> float:
    """95th percentile symmetric Hausdorff distance (mm) between the surfaces of two 3-D masks
    (NaN when either is empty)."""
    from scipy import ndimage

    p, t = pred > 0, target > 0
    if not p.any() or not t.any():
        return float("nan")
    st = ndimage.generate_binary_structure(3, 1)
    sp = p & ~ndimage.binary_erosion(p, st)
    stt = t & ~ndimage.binary_erosion(t, st)
    dt_t = ndimage.distance_transform_edt(~stt, sampling=spacing_kji)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing_kji)
    d = np.concatenate([dt_t[sp], dt_p[stt]])
    return float(np.percentile(d, 95))
