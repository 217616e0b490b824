"""Augmentation of CT slice batches with torch ops, on whatever device the batch lives on.

Domain randomisation (ours, off by default; ``p_*`` > 0 turns each on, ``training/configs/robust_cpu.json``
uses them): the shifts a model meets on CT from other scanners and protocols, drawn per sample --
acquisition at a coarser in-plane pixel size (0.6-3 mm: down- then up-sampling), partial-volume blur
of thick slices (Gaussian), correlated low-dose noise (HU), a different contrast phase (the organ's
enhancement shifted by tens of HU inside its smoothed mask), window/offset changes (HU scale and
offset), and JPEG artefacts (the public 2-D slices are JPEG).

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
    # --- domain randomisation (ours; every p_* = 0 leaves the batch as it was) ---------------------
    p_resolution: float = 0.0
    """Probability of simulating acquisition at a pixel size drawn in ``resolution_mm``."""
    resolution_mm: tuple = (0.6, 3.0)
    p_blur: float = 0.0
    """Probability of a Gaussian blur (thick-slice partial volume), sigma drawn in ``blur_mm`` (mm)."""
    blur_mm: tuple = (0.3, 1.5)
    p_ct_noise: float = 0.0
    """Probability of correlated low-dose noise with a standard deviation drawn in ``ct_noise_hu``."""
    ct_noise_hu: tuple = (5.0, 40.0)
    p_enhancement: float = 0.0
    """Probability of shifting the organ's intensity (contrast phase) by a draw in ``enhancement_hu``."""
    enhancement_hu: tuple = (-60.0, 50.0)
    p_window: float = 0.0
    """Probability of an HU scale in ``window_scale`` and offset up to +-``window_offset_hu``."""
    window_scale: tuple = (0.9, 1.1)
    window_offset_hu: float = 30.0
    p_jpeg: float = 0.0
    """Probability of a JPEG round trip at a quality drawn in ``jpeg_quality`` (CPU, Pillow)."""
    jpeg_quality: tuple = (30, 95)
    hu_per_unit: float = 255.0
    """HU per unit of the windowed image (the width of ``ModelConfig.window``; 255 for [0, 255])."""

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown augmentation keys: {', '.join(bad)}")
        d = dict(d)
        for k in _PAIRS:
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in _PAIRS:
            d[k] = list(getattr(self, k))
        return d


_PAIRS = ("scale", "contrast", "resolution_mm", "blur_mm", "ct_noise_hu", "enhancement_hu", "window_scale", "jpeg_quality")


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


def gaussian_blur(images: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with one sigma (pixels) per sample ``(B,)``."""
    b, c, h, w = images.shape
    r = int(math.ceil(3 * float(sigma_px.max()))) if len(sigma_px) else 0
    if r < 1:
        return images
    x = torch.arange(-r, r + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-0.5 * (x[None] / sigma_px.to(images.dtype).clamp(min=1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, 2r+1)
    y = images.reshape(1, b * c, h, w)
    kk = k.repeat_interleave(c, 0)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), kk.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), kk.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def coarser_pixels(images: torch.Tensor, pixel_mm: float, mm) -> torch.Tensor:
    """``(N, C, H, W)`` with ``pixel_mm`` mm pixels as if acquired at ``mm`` mm pixels: down-sampled
    (antialiased) and up-sampled back, bilinear; unchanged unless ``mm`` is coarser (``pixel_mm / mm < 0.95``)."""
    f = float(pixel_mm / mm)
    if f >= 0.95:
        return images
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                          align_corners=False, antialias=True)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def unit_correlated_noise(white: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """White noise ``(B, C, H, W)`` blurred by ``sigma_px`` (CT noise is spatially correlated) and scaled
    to unit standard deviation per sample."""
    n = gaussian_blur(white, torch.full((white.shape[0],), float(sigma_px), device=white.device))
    return n / n.flatten(1).std(1).clamp(min=1e-6).view(-1, 1, 1, 1)


def _chosen(b: int, p: float, device, generator) -> torch.Tensor:
    return torch.rand(b, device=device, generator=generator) < p


def domain_shift(images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, pixel_mm: float,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The domain randomisation of the module docstring on ``images`` ``(B, C, H, W)`` in [0, 1] whose
    pixels are ``pixel_mm`` mm; ``masks`` ``(B, H, W)`` locate the organ for the contrast-phase shift."""
    b = images.shape[0]
    dev = images.device
    hu = float(cfg.hu_per_unit)
    out = images
    if cfg.p_resolution > 0:
        pick = _chosen(b, cfg.p_resolution, dev, generator)
        mm = torch.exp(_uniform(b, math.log(cfg.resolution_mm[0]), math.log(cfg.resolution_mm[1]), dev, generator))
        out = torch.cat([coarser_pixels(out[i : i + 1], pixel_mm, mm[i]) if bool(pick[i]) else out[i : i + 1]
                         for i in range(b)])
    if cfg.p_blur > 0:
        pick = _chosen(b, cfg.p_blur, dev, generator)
        sigma = _uniform(b, cfg.blur_mm[0], cfg.blur_mm[1], dev, generator) / pixel_mm
        out = torch.where(pick.view(-1, 1, 1, 1), gaussian_blur(out, sigma), out)
    if cfg.p_enhancement > 0:
        pick = _chosen(b, cfg.p_enhancement, dev, generator).float()
        shift = _uniform(b, cfg.enhancement_hu[0], cfg.enhancement_hu[1], dev, generator) / hu
        soft = gaussian_blur(masks.unsqueeze(1).float(), torch.full((b,), 1.5 / pixel_mm, device=dev))
        out = out + (pick * shift).view(-1, 1, 1, 1) * soft * (out > 0).to(out.dtype)
    if cfg.p_ct_noise > 0:
        pick = _chosen(b, cfg.p_ct_noise, dev, generator).float()
        sd = _uniform(b, cfg.ct_noise_hu[0], cfg.ct_noise_hu[1], dev, generator) / hu
        n = unit_correlated_noise(torch.randn(out.shape, device=dev, generator=generator, dtype=out.dtype), 0.7)
        out = out + (pick * sd).view(-1, 1, 1, 1) * n
    if cfg.p_window > 0:
        pick = _chosen(b, cfg.p_window, dev, generator)
        s = torch.where(pick, _uniform(b, cfg.window_scale[0], cfg.window_scale[1], dev, generator), torch.ones(b, device=dev))
        o = torch.where(pick, _uniform(b, -cfg.window_offset_hu, cfg.window_offset_hu, dev, generator) / hu, torch.zeros(b, device=dev))
        out = out * s.view(-1, 1, 1, 1) + o.view(-1, 1, 1, 1)
    out = out.clamp(0.0, 1.0)
    if cfg.p_jpeg > 0:
        pick = _chosen(b, cfg.p_jpeg, dev, generator)
        q = _uniform(b, cfg.jpeg_quality[0], cfg.jpeg_quality[1], dev, generator)
        if bool(pick.any()):
            out = out.clone()
            for i in torch.nonzero(pick).flatten().tolist():
                for ch in range(out.shape[1]):
                    out[i, ch] = jpeg_round_trip(out[i, ch], int(q[i]))
    return out


def jpeg_round_trip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """``(H, W)`` in [0, 1] -> the same after 8-bit JPEG encoding at ``quality`` (Pillow)."""
    import io

    import numpy as np
    from PIL import Image

    a = (image.detach().float().cpu().numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=int(quality))
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
    return torch.from_numpy(back).to(image.device, image.dtype)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None,
                  pixel_mm: float = 1.0) -> tuple:
    """Random geometric + domain + intensity augmentation of a batch (identity when ``cfg.enabled`` is False).

    ``images`` ``(B, C, H, W)`` float in [0, 1] with ``pixel_mm`` mm pixels; ``masks`` ``(B, H, W)`` ->
    the same shapes.
    """
    if not cfg.enabled:
        return images, masks
    theta = random_affine(images.shape[0], tuple(images.shape[-2:]), cfg, images.device, generator)
    images, masks = warp(images, masks, theta)
    if any(getattr(cfg, k) > 0 for k in ("p_resolution", "p_blur", "p_enhancement", "p_ct_noise", "p_window", "p_jpeg")):
        images = domain_shift(images, masks, cfg, pixel_mm, generator)
    return intensity(images, cfg, generator), masks
