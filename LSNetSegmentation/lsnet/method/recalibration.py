"""RoI recalibration (RR, paper section 2.2) and its inverse (section 2.4).

Coordinates (docs/conventions.md): input pixels are edge coordinates (pixel p spans [p, p+1)), and
``affine_grid``/``grid_sample`` use ``align_corners=False`` so normalised ``x_n = 2 x / W - 1``.

Eq. 2-3.  A keypoint ``(u, v)`` = ``(4x+2, 4y+2)`` in input pixels with distances ``(l, r, t, b)``
gives the affine ``theta = [[s_x, 0, b_x], [0, s_y, b_y]]`` that maps the normalised coordinates of
the ``Hs x Ws`` RoI to normalised input coordinates::

    s_x = (l + r + alpha) / W            b_x = (u + (r - l)/2 - W/2) * 2 / W
    s_y = (t + b + alpha) / H            b_y = (v + (b - t)/2 - H/2) * 2 / H

``s_x``, ``s_y`` are exactly Eq. 3 (a fraction of the image is already a normalised half-extent).
Eq. 3 writes ``b_x``, ``b_y`` in pixels; the factor ``2/W`` (``2/H``) converts them to the normalised
units ``affine_grid`` needs — this is the only reading under which the RoI is the box.
So the sampled region is the box grown by ``alpha/2`` on every side (``alpha`` in total per axis).

Eq. 4 as printed, ``[[1/(s_x+eps), 0, -b_x], ...]``, is not the inverse of Eq. 2 unless ``s = 1``;
we use the exact inverse with the same smoothing term:
``theta^-1 = [[1/(s_x+eps), 0, -b_x/(s_x+eps)], [0, 1/(s_y+eps), -b_y/(s_y+eps)]]``, eps = 1e-7.

Bilinear sampling makes the RoI differentiable w.r.t. ``theta`` and hence w.r.t. ``(l, r, t, b)``
(the keypoint position itself is a discrete choice and carries no gradient).  Gradient decay
(section 2.5, gamma = 0.1) is :func:`decay_gradient`, a hook on theta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7


def theta_from_box(keypoints: torch.Tensor, ltrb: torch.Tensor, image_hw: tuple[int, int], alpha: float = 15.0) -> torch.Tensor:
    """Eq. 3. ``keypoints`` ``(N, 2)`` = ``(u, v)`` input pixels, ``ltrb`` ``(N, 4)`` -> theta ``(N, 2, 3)``."""
    h, w = image_hw
    l, r, t, b = ltrb.unbind(-1)
    u, v = keypoints.to(ltrb.dtype).unbind(-1)
    sx = (l + r + alpha) / w
    sy = (t + b + alpha) / h
    bx = (u + (r - l) / 2 - w / 2) * (2.0 / w)
    by = (v + (b - t) / 2 - h / 2) * (2.0 / h)
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, bx], -1), torch.stack([zero, sy, by], -1)], -2)


def theta_from_xyxy(boxes: torch.Tensor, image_hw: tuple[int, int], alpha: float = 15.0) -> torch.Tensor:
    """Same as :func:`theta_from_box` for boxes ``(N, 4)`` = ``(x0, y0, x1, y1)`` (user-drawn RoIs)."""
    u = (boxes[:, 0] + boxes[:, 2]) / 2
    v = (boxes[:, 1] + boxes[:, 3]) / 2
    half_w = (boxes[:, 2] - boxes[:, 0]) / 2
    half_h = (boxes[:, 3] - boxes[:, 1]) / 2
    return theta_from_box(torch.stack([u, v], 1), torch.stack([half_w, half_w, half_h, half_h], 1), image_hw, alpha)


def invert_theta(theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Eq. 4 (exact inverse, see module docstring): ``(N, 2, 3)`` -> ``(N, 2, 3)``."""
    sx, bx = theta[:, 0, 0], theta[:, 0, 2]
    sy, by = theta[:, 1, 1], theta[:, 1, 2]
    zero = torch.zeros_like(sx)
    return torch.stack(
        [torch.stack([1 / (sx + eps), zero, -bx / (sx + eps)], -1), torch.stack([zero, 1 / (sy + eps), -by / (sy + eps)], -1)], -2
    )


def recalibrate(images: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Sample the RoIs: ``images`` ``(N, C, H, W)`` (one image per RoI), theta ``(N, 2, 3)`` -> ``(N, C, Hs, Ws)``.

    Outside the image the RoI is zero (= the bottom of the HU window after preprocessing).
    """
    grid = F.affine_grid(theta.to(images.dtype), [images.shape[0], images.shape[1], *out_hw], align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def paste_back(roi_maps: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int], scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Section 2.4: map RoI outputs ``(N, C, Hs, Ws)`` back onto the image with theta^-1 -> ``(N, C, H', W')``.

    ``out_hw`` is the grid to paste into.  With ``scale = (1, 1)`` it is the L-Net input grid that theta
    was computed on.  To paste directly into another grid of the same field of view whose edge
    coordinates ``x'`` relate to L-Net input pixels by ``x = x' * f`` (the original slice before the
    in-plane resampling of ``preprocess.py``), pass ``scale = (f_x * W' / W, f_y * H' / H)``: the grid
    is first mapped into L-Net normalised coordinates (``x_n = a x'_n + a - 1``), then by theta^-1.
    Pixels outside every RoI get 0.
    """
    inv = invert_theta(theta.float())
    ax, ay = scale
    pre = torch.tensor([[ax, 0.0, ax - 1.0], [0.0, ay, ay - 1.0], [0.0, 0.0, 1.0]], device=theta.device)
    full = torch.cat([inv, torch.tensor([0.0, 0.0, 1.0], device=theta.device).expand(inv.shape[0], 1, 3)], 1)
    composed = (full @ pre)[:, :2, :]
    grid = F.affine_grid(composed, [roi_maps.shape[0], roi_maps.shape[1], *out_hw], align_corners=False)
    return F.grid_sample(roi_maps.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def decay_gradient(theta: torch.Tensor, gamma: float) -> torch.Tensor:
    """Scale the gradient that flows from S-Net back into L-Net through theta by ``gamma`` (section 2.5).

    Forward value unchanged; returns theta (a hook is registered when theta requires grad).
    ``gamma = 0`` stops S-Net's supervision of L-Net entirely; ``gamma = 1`` leaves it untouched.
    """
    if theta.requires_grad:
        theta.register_hook(lambda g: g * gamma)
    return theta
