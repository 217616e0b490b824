"""Augmentation of CT slice batches with torch ops, on whatever device the batch lives on.

Geometric (scale jitter, small rotation, small translation) and intensity (contrast, brightness,
Gaussian noise) changes suited to windowed CT slices.  One random affine per sample is applied to the
image and its mask with the SAME ``affine_grid`` (``align_corners=False``, docs/conventions.md): the
image is sampled bilinearly, the mask bilinearly then thresholded at 0.5 (so thin structures are not
shifted by nearest-neighbour rounding).  Outside the slice both are 0 (the bottom of the HU window,
background).  No left/right flips: abdominal anatomy is not mirror-symmetric.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    enabled: bool = True
    p_geometric: float = 0.8
    """Probability that a sample gets a random affine (else the identity)."""
    scale: tuple = (0.8, 1.25)
    """Zoom factor range (log-uniform); > 1 enlarges the anatomy."""
    rotate_deg: float = 10.0
    """Rotation drawn uniformly in [-rotate_deg, rotate_deg]."""
    translate: float = 0.05
    """Translation up to this fraction of the image size."""
    contrast: tuple = (0.85, 1.15)
    """Multiplier around 0.5 of the windowed intensity."""
    brightness: float = 0.05
    """Additive shift up to +-brightness (windowed units; 0.05 ~ 13 HU in the [0, 255] window)."""
    noise_std: float = 0.02
    """Gaussian noise with standard deviation drawn in [0, noise_std]."""

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown augmentation keys: {', '.join(bad)}")
        d = dict(d)
        for k in ("scale", "contrast"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["contrast"] = list(self.contrast)
        return d


def _uniform(n: int, lo: float, hi: float, device, generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def random_affine(n: int, hw: tuple, cfg: AugmentConfig, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(n, 2, 3)`` theta mapping OUTPUT normalised coordinates to INPUT normalised coordinates.

    In pixel units the output point ``p`` samples the input at ``R(-a) p / s + t`` about the image
    centre, i.e. the content is rotated by ``a`` and zoomed by ``s``.  Rotation is done in pixel space
    (aspect-correct for H != W).
    """
    h, w = hw
    a = _uniform(n, -1.0, 1.0, device, generator) * math.radians(cfg.rotate_deg)
    s = torch.exp(_uniform(n, math.log(cfg.scale[0]), math.log(cfg.scale[1]), device, generator))
    tx = _uniform(n, -cfg.translate, cfg.translate, device, generator) * 2.0
    ty = _uniform(n, -cfg.translate, cfg.translate, device, generator) * 2.0
    keep = torch.rand(n, device=device, generator=generator) >= cfg.p_geometric
    a = torch.where(keep, torch.zeros_like(a), a)
    s = torch.where(keep, torch.ones_like(s), s)
    tx = torch.where(keep, torch.zeros_like(tx), tx)
    ty = torch.where(keep, torch.zeros_like(ty), ty)
    c, si = torch.cos(a) / s, torch.sin(a) / s
    # pixel-space linear part [[c, si], [-si, c]] conjugated by diag(W/2, H/2) -> normalised coordinates
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = c
    theta[:, 0, 1] = si * (h / w)
    theta[:, 1, 0] = -si * (w / h)
    theta[:, 1, 1] = c
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return theta


def warp(images: torch.Tensor, masks: Optional[torch.Tensor], theta: torch.Tensor) -> tuple:
    """Apply ``theta`` ``(B, 2, 3)`` to ``images`` ``(B, C, H, W)`` and ``masks`` ``(B, H, W)`` or ``(B, 1, H, W)``."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is None:
        return out, None
    squeeze = masks.dim() == 3
    m = masks.unsqueeze(1) if squeeze else masks
    mg = F.grid_sample(m.to(grid.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mo = (mg >= 0.5).to(masks.dtype)
    return out, (mo.squeeze(1) if squeeze else mo)


def intensity(images: torch.Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Contrast about 0.5, brightness shift, Gaussian noise; clamped back to [0, 1]."""
    b = images.shape[0]
    dev = images.device
    shape = (b,) + (1,) * (images.dim() - 1)
    c = _uniform(b, cfg.contrast[0], cfg.contrast[1], dev, generator).view(shape)
    br = _uniform(b, -cfg.brightness, cfg.brightness, dev, generator).view(shape)
    sd = _uniform(b, 0.0, cfg.noise_std, dev, generator).view(shape)
    noise = torch.randn(images.shape, device=dev, generator=generator, dtype=images.dtype)
    return ((images - 0.5) * c + 0.5 + br + sd * noise).clamp_(0.0, 1.0)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None) -> tuple:
    """Random geometric + intensity augmentation of a batch (identity when ``cfg.enabled`` is False).

    ``images`` ``(B, C, H, W)`` float in [0, 1]; ``masks`` ``(B, H, W)`` -> the same shapes.
    """
    if not cfg.enabled:
        return images, masks
    theta = random_affine(images.shape[0], tuple(images.shape[-2:]), cfg, images.device, generator)
    images, masks = warp(images, masks, theta)
    return intensity(images, cfg, generator), masks
