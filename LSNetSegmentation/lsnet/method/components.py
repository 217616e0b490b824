"""Connected components and their boxes on the device the tensors live on (GPU or CPU).

Used for the ground truth (objects of a slice's label, section 2.1) and for decoding (activated
components of the heatmap, section 2.5) so both follow the same rule.  Connectivity is 8 (a 3x3
neighbourhood), the same as ``scipy.ndimage.label(mask, structure=np.ones((3, 3)))`` — tested.

Each component gets the id of its largest pixel index (linear index in its image + 1), on every
device.  On a GPU the ids come from iterative max-propagation: every foreground pixel starts with its
own id and repeatedly takes the maximum id in its 3x3 neighbourhood, restricted to foreground, until
nothing changes.  On the CPU that loop costs one 3x3 max-pool per step of the longest path through a
component (a quarter of a CPU training step went there), so the CPU labels with
``scipy.ndimage.label`` and then gives each component the same id as the GPU path — tested equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


def label_components(mask: torch.Tensor, check_every: int = 8) -> torch.Tensor:
    """``mask`` ``(B, H, W)`` bool -> ``(B, H, W)`` int64 ids (0 = background), unique per image:
    a component's id is its largest linear pixel index in the image + 1."""
    if mask.numel() == 0 or not bool(mask.any()):
        return torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    if mask.device.type == "cpu":
        return _label_scipy(mask)
    return label_by_propagation(mask, check_every)


def _label_scipy(mask: torch.Tensor) -> torch.Tensor:
    """CPU path of :func:`label_components` (same ids)."""
    m = mask.detach().numpy().astype(bool, copy=False)
    b, h, w = m.shape
    flat = np.arange(1, h * w + 1, dtype=np.int64)
    out = np.zeros((b, h * w), dtype=np.int64)
    for i in range(b):
        lab, n = ndimage.label(m[i], structure=_EIGHT)
        if n == 0:
            continue
        lab = lab.ravel()
        top = np.zeros(n + 1, dtype=np.int64)
        np.maximum.at(top, lab, flat)
        top[0] = 0
        out[i] = top[lab]
    return torch.from_numpy(out.reshape(b, h, w))


def label_by_propagation(mask: torch.Tensor, check_every: int = 8) -> torch.Tensor:
    """Device path of :func:`label_components`: iterative 3x3 max-propagation (any device)."""
    b, h, w = mask.shape
    if mask.numel() == 0 or not bool(mask.any()):
        return torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    fg = mask.unsqueeze(1)
    # float64 is exact for ids < 2**53; max_pool2d has no integer kernel on every device.
    ids = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float64).view(1, 1, h, w)
    lab = torch.where(fg, ids.expand(b, 1, h, w), torch.zeros((), dtype=torch.float64, device=mask.device))
    # The number of sweeps is bounded by the longest geodesic path in a component.
    for it in range(h * w):
        new = torch.where(fg, F.max_pool2d(lab, 3, 1, 1), lab)
        if (it + 1) % check_every == 0 and torch.equal(new, lab):
            break
        lab = new
    return lab.squeeze(1).long()


@dataclass
class Components:
    """Per-component statistics, flattened over the batch (``N`` components in all).

    ``batch``: ``(N,)`` image index; ``boxes``: ``(N, 4)`` ``(x0, y0, x1, y1)`` in edge coordinates
    of the labelled grid (pixel p spans [p, p+1)); ``centroid``: ``(N, 2)`` mean ``(x, y)`` of the pixel
    *centres* (p + 0.5); ``centre_cell``: ``(N, 2)`` integer ``(x, y)`` of the component pixel closest
    to the centroid (equals the centroid pixel when that pixel is in the component); ``area``: ``(N,)``;
    ``pixel_component``: for every foreground pixel (in ``torch.nonzero`` order) its component row.
    """

    batch: torch.Tensor
    boxes: torch.Tensor
    centroid: torch.Tensor
    centre_cell: torch.Tensor
    area: torch.Tensor
    labels: torch.Tensor
    pixel_index: torch.Tensor
    pixel_component: torch.Tensor

    def __len__(self) -> int:
        return int(self.batch.shape[0])


def components(mask: torch.Tensor) -> Components:
    """Label ``mask`` ``(B, H, W)`` and measure every 8-connected component."""
    labels = label_components(mask)
    dev = mask.device
    idx = torch.nonzero(labels, as_tuple=False)  # (P, 3): b, y, x
    if idx.shape[0] == 0:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        zf = torch.zeros(0, 4, dtype=torch.float32, device=dev)
        return Components(z, zf, zf[:, :2], z.view(0, 1).expand(0, 2), z, labels, idx, z)
    key = idx[:, 0] * (labels.shape[1] * labels.shape[2] + 1) + labels[idx[:, 0], idx[:, 1], idx[:, 2]]
    uniq, comp = torch.unique(key, return_inverse=True)
    n = uniq.shape[0]
    ys, xs = idx[:, 1], idx[:, 2]
    batch = torch.zeros(n, dtype=torch.long, device=dev).scatter_reduce(0, comp, idx[:, 0], "amax", include_self=False)
    big = torch.iinfo(torch.long).max
    x0 = torch.full((n,), big, device=dev).scatter_reduce(0, comp, xs, "amin")
    y0 = torch.full((n,), big, device=dev).scatter_reduce(0, comp, ys, "amin")
    x1 = torch.full((n,), -1, device=dev).scatter_reduce(0, comp, xs, "amax") + 1
    y1 = torch.full((n,), -1, device=dev).scatter_reduce(0, comp, ys, "amax") + 1
    area = torch.zeros(n, dtype=torch.long, device=dev).scatter_add(0, comp, torch.ones_like(xs))
    cx = torch.zeros(n, dtype=torch.float32, device=dev).scatter_add(0, comp, xs.float() + 0.5) / area
    cy = torch.zeros(n, dtype=torch.float32, device=dev).scatter_add(0, comp, ys.float() + 0.5) / area
    d2 = (xs.float() + 0.5 - cx[comp]) ** 2 + (ys.float() + 0.5 - cy[comp]) ** 2
    dmin = torch.full((n,), float("inf"), device=dev).scatter_reduce(0, comp, d2, "amin")
    # first pixel (in nonzero order) reaching the minimum distance of its component
    order = torch.arange(xs.shape[0], device=dev)
    cand = torch.where(d2 <= dmin[comp], order, torch.full_like(order, big))
    first = torch.full((n,), big, device=dev).scatter_reduce(0, comp, cand, "amin")
    centre_cell = torch.stack([xs[first], ys[first]], dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return Components(batch, boxes, torch.stack([cx, cy], 1), centre_cell, area, labels, idx, comp)
