"""Ground truth of L-Net: keypoint heatmap K* (Eq. 1) and box distances T* (section 2.1).

Objects are the 8-connected components of a slice's label (``components.py``); each object's
keypoint is the centre of its bounding box (section 2.1: "the true centers of the foreground bboxes").

Cell ``(x, y)`` of the stride-4 map has its centre at input pixel ``(4x+2, 4y+2)`` (edge coordinates,
docs/conventions.md), so a box centre ``u_c`` in input pixels lies at cell coordinate
``x_c = (u_c - 2) / 4``.  Centres are *not* rounded to cells (open choice: no quantisation, the
tolerance beta already absorbs sub-cell offsets).

Eq. 1:  ``K*_{x,y} = min(1, sum_c exp(-(dx^2 + dy^2) / (2 delta)))`` with
``dx = max(0, |x - x_c| - beta)``, ``dy = max(0, |y - y_c| - beta)``, distances in cells.

``T*_{x,y} = (l*, r*, t*, b*)`` = distances in input pixels from ``(4x+2, 4y+2)`` to the left, right,
top and bottom edges of the box of the object whose Gaussian term is largest at ``(x, y)`` (open
choice for overlapping objects).  T* is used only where ``K* >= 0.5`` (Eq. 5); there a distance can be
negative for an object smaller than the tolerance region — it is kept as is (the DIoU loss handles it).
"""

from __future__ import annotations

import torch

from lsnet.method.components import components

STRIDE = 4


def cell_centres(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-pixel centres of the stride-4 cells: ``u (w,)`` = 4x+2, ``v (h,)`` = 4y+2."""
    u = torch.arange(w, device=device, dtype=torch.float32) * STRIDE + STRIDE / 2
    v = torch.arange(h, device=device, dtype=torch.float32) * STRIDE + STRIDE / 2
    return u, v


def targets_from_boxes(
    boxes: torch.Tensor, batch: torch.Tensor, batch_size: int, out_hw: tuple[int, int], delta: float = 20.0, beta: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 heatmap and T* from object boxes.

    Args:
        boxes: ``(N, 4)`` object boxes ``(x0, y0, x1, y1)`` in input pixels (edge coordinates).
        batch: ``(N,)`` image index of each box.
        batch_size: B.  out_hw: ``(H/4, W/4)``.
    Returns:
        ``K*`` ``(B, 1, H/4, W/4)`` in [0, 1] and ``T*`` ``(B, 4, H/4, W/4)`` (zeros where no object).
    """
    h, w = out_hw
    dev = boxes.device
    kstar = torch.zeros(batch_size, 1, h, w, device=dev)
    tstar = torch.zeros(batch_size, 4, h, w, device=dev)
    if boxes.shape[0] == 0:
        return kstar, tstar
    u, v = cell_centres(h, w, dev)
    xs = (u - STRIDE / 2) / STRIDE  # cell indices as float
    ys = (v - STRIDE / 2) / STRIDE
    cu = (boxes[:, 0] + boxes[:, 2]) / 2
    cv = (boxes[:, 1] + boxes[:, 3]) / 2
    xc = (cu - STRIDE / 2) / STRIDE
    yc = (cv - STRIDE / 2) / STRIDE
    dx = (xs.view(1, 1, w) - xc.view(-1, 1, 1)).abs().sub(beta).clamp_min(0)
    dy = (ys.view(1, h, 1) - yc.view(-1, 1, 1)).abs().sub(beta).clamp_min(0)
    g = torch.exp(-(dx**2 + dy**2) / (2 * delta))  # (N, h, w)
    for b in range(batch_size):
        sel = batch == b
        if not bool(sel.any()):
            continue
        gb = g[sel]
        kstar[b, 0] = gb.sum(0).clamp(max=1.0)
        owner = gb.argmax(0)  # (h, w) index into this image's objects
        bx = boxes[sel][owner]  # (h, w, 4)
        uu = u.view(1, w).expand(h, w)
        vv = v.view(h, 1).expand(h, w)
        tstar[b] = torch.stack([uu - bx[..., 0], bx[..., 2] - uu, vv - bx[..., 1], bx[..., 3] - vv], 0)
    return kstar, tstar


def targets_from_masks(masks: torch.Tensor, delta: float = 20.0, beta: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets straight from label masks.

    ``masks``: ``(B, H, W)`` (any dtype, > 0 = foreground) with H, W multiples of 4.
    Returns ``K*`` ``(B, 1, H/4, W/4)``, ``T*`` ``(B, 4, H/4, W/4)`` and the object boxes
    ``(N, 5)`` = ``(b, x0, y0, x1, y1)``.
    """
    b, h, w = masks.shape
    comp = components(masks > 0)
    kstar, tstar = targets_from_boxes(comp.boxes, comp.batch, b, (h // STRIDE, w // STRIDE), delta, beta)
    return kstar, tstar, torch.cat([comp.batch.float().unsqueeze(1), comp.boxes], 1)
