"""Synthetic abdominal CT phantoms with one small, strongly varying "pancreas-like" target organ.

Used by the tests, the engine demo and optionally as extra training data.  Pure numpy/scipy, no torch,
deterministic per seed, ~0.1-0.3 s for the default size.

Orientation: the returned arrays are indexed ``[k, j, i]`` in CANONICAL orientation (direction = identity
in LPS: i -> patient Left, j -> Posterior, k -> Superior).  ``array[k]`` therefore shows the patient in
radiological convention: anterior at the top row, spine at the bottom centre, patient right (liver) on
the image left.

What the phantom resembles
    * a body ellipse (air outside, -1000 HU) with 2 mm skin (+30 HU), subcutaneous fat (-100 HU) of
      random thickness, an abdominal muscle wall (+50 HU), visceral fat in the cavity (-90 HU);
    * a lumbar vertebra at the posterior centre (cortical rim ~1000 HU, cancellous ~400 HU, spinous
      process) with paraspinal muscles, a contrast-filled aorta (~200 HU) anterior-left of it and the
      IVC (~120 HU) on the right;
    * the liver (+60 HU) on the patient right, large in superior slices and shrinking inferiorly, the
      spleen (+50 HU) posterior-left superiorly, both kidneys (+150 HU cortex, lower medulla) beside the
      spine, bowel loops (walls +40 HU, fluid +15 HU) with air pockets (-900 HU);
    * the TARGET (label 1): an elongated, lobulated organ at 40-120 HU, head on the patient right rising
      towards a tail on the patient left, along a U-shaped centre line so that some slices cut it twice
      (two separate fragments) and others once; its size (about 5 px up to ~60 % of the body width, set
      by ``target_scale``), position and slice range vary strongly with the seed;
    * texture (Gaussian-smoothed noise, ~15 HU) on all tissue plus white Gaussian noise (~12 HU).

What it does NOT resemble
    * real anatomy and its variability: shapes are ellipses and tubes, organs may touch or overlap
      (the target is painted last), no ribs, pelvis, stomach, gallbladder, vessels other than the aorta
      and IVC, no duodenum hugging the pancreatic head, no pancreatic duct;
    * real scanner physics: no beam hardening, streaks, partial-volume blur at edges, reconstruction
      kernels or metal; noise is white plus smoothed, not CT-noise-power-spectrum shaped;
    * the contrast between the target and its surroundings is higher and more uniform than the real
      pancreas against bowel and fat.
    A model that works on phantoms is therefore only *plausibly* wired correctly; accuracy on real CT
    must be measured on real CT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from lsnet.io.geometry import Volume

HU_AIR = -1000.0
HU_FAT = -100.0
HU_VISCERAL_FAT = -90.0
HU_SKIN = 30.0
HU_MUSCLE = 50.0
HU_LIVER = 60.0
HU_SPLEEN = 50.0
HU_KIDNEY_CORTEX = 150.0
HU_KIDNEY_MEDULLA = 90.0
HU_AORTA = 200.0
HU_IVC = 120.0
HU_BONE_CORTICAL = 1000.0
HU_BONE_CANCELLOUS = 400.0
HU_BOWEL_WALL = 40.0
HU_BOWEL_FLUID = 15.0
HU_BOWEL_AIR = -900.0

TARGET_SCALE_RANGE = (0.15, 1.7)
"""Range ``target_scale`` is drawn from (log-uniformly) when not given. 1.0 = an organ whose in-plane
extent (head to tail) is ~35 % of the body width; 0.15 gives a few pixels, 1.7 ~60 % of the width."""


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT: ``array`` int16 HU ``(K, J, I)``, ``label`` uint8 ``(K, J, I)`` (1 = target),
    ``spacing`` (sx, sy, sz) mm in ITK (i, j, k) order, ``target_scale`` actually used.

    Unpacks as ``array, label, spacing = make_phantom(...)``."""

    array: np.ndarray
    label: np.ndarray
    spacing: tuple
    target_scale: float

    def __iter__(self):
        return iter((self.array, self.label, self.spacing))


def _ellipse(x, y, cx, cy, ax, ay):
    """Boolean mask of the ellipse ((x-cx)/ax)^2 + ((y-cy)/ay)^2 <= 1 (broadcasting)."""
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox, amplitude) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to standard deviation ``amplitude``."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    s = float(n.std())
    return n * (amplitude / s) if s > 0 else n


def _paint_target(
    rng: np.random.Generator,
    shape,
    spacing,
    body_ax: float,
    body_ay: float,
    scale: float,
    cx0: float,
    cy0: float,
    lobulation: np.ndarray,
) -> np.ndarray:
    """Target organ as a union of ellipsoids along a U-shaped 3-D centre line.

    Returns a float field ``(K, J, I)`` > 0 inside the organ (before lobulation noise), built only
    inside the bounding box of each ellipsoid so the cost is independent of the volume size.
    """
    K, J, I = shape
    sx, sy, sz = spacing
    length = 0.35 * 2.0 * body_ax * scale  # head-to-tail in-plane extent, mm
    thick = max(1.2 * min(sx, sy), 0.16 * length * rng.uniform(0.8, 1.25))  # cross-section radius, mm
    # z extent grows with size but stays inside the volume (mm)
    z_extent = min((K - 4) * sz, max(3 * sz, length * rng.uniform(0.35, 0.7)))
    z_centre = rng.uniform(0.5 * z_extent + sz, K * sz - 0.5 * z_extent - sz) if K * sz > z_extent + 2 * sz else K * sz / 2
    n = 48
    t = np.linspace(0.0, 1.0, n)
    # head (t=0) on the patient right (small x), tail (t=1) on the patient left; slight anterior arch
    x = cx0 + (t - 0.5) * length
    y = cy0 - 0.25 * length * np.sin(np.pi * t) * rng.uniform(0.3, 1.0) + rng.uniform(-0.08, 0.08) * length * (t - 0.5)
    # U-shaped (or inverted) z so that slices above the minimum cut the organ twice (two fragments)
    tmin = rng.uniform(0.3, 0.7)
    zshape = (t - tmin) ** 2
    zshape = zshape / zshape.max()
    if rng.random() < 0.3:
        zshape = 1.0 - zshape
    z = z_centre - 0.5 * z_extent + z_extent * zshape
    # radius along the centre line: tapering tail, fuller head, lobules
    phase = rng.uniform(0, 2 * np.pi)
    r = thick * (1.15 - 0.5 * t) * (1.0 + 0.2 * np.sin(2 * np.pi * rng.uniform(2, 4) * t + phase))
    rz = np.maximum(r, 1.5 * sz)

    field = np.full(shape, -10.0, dtype=np.float32)
    for xc, yc, zc, rc, rzc in zip(x, y, z, r, rz):
        i0, i1 = int(np.floor((xc - rc) / sx)), int(np.ceil((xc + rc) / sx)) + 1
        j0, j1 = int(np.floor((yc - rc) / sy)), int(np.ceil((yc + rc) / sy)) + 1
        k0, k1 = int(np.floor((zc - rzc) / sz)), int(np.ceil((zc + rzc) / sz)) + 1
        i0, j0, k0 = max(i0, 0), max(j0, 0), max(k0, 0)
        i1, j1, k1 = min(i1, I), min(j1, J), min(k1, K)
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            continue
        kk = ((np.arange(k0, k1) + 0.5) * sz - zc)[:, None, None] / rzc
        jj = ((np.arange(j0, j1) + 0.5) * sy - yc)[None, :, None] / rc
        ii = ((np.arange(i0, i1) + 0.5) * sx - xc)[None, None, :] / rc
        f = 1.0 - (kk**2 + jj**2 + ii**2)
        sub = field[k0:k1, j0:j1, i0:i1]
        np.maximum(sub, f, out=sub)
    # lobulated border: perturb the implicit surface with smooth noise
    return field + 0.3 * np.clip(lobulation, -2.0, 2.0)


def make_phantom(
    shape: Sequence[int] = (48, 160, 160),
    spacing: Sequence[float] = (2.0, 2.0, 2.5),
    seed: int = 0,
    target_scale: Optional[float] = None,
    noise_hu: float = 12.0,
) -> Phantom:
    """Generate one synthetic abdominal CT with a labelled target organ.

    Args:
        shape: ``(K, J, I)`` = (slices, rows, columns).
        spacing: ``(sx, sy, sz)`` in mm, ITK (i, j, k) order.
        seed: everything (anatomy, target size/position, noise) is a deterministic function of it.
        target_scale: target size; 1.0 ~ 35 % of the body width head to tail. ``None`` draws it
            log-uniformly from :data:`TARGET_SCALE_RANGE`.
        noise_hu: standard deviation of the white noise.

    Returns:
        :class:`Phantom` (array int16 HU, label uint8 in {0, 1}, spacing, target_scale), canonical
        orientation (see the module docstring).
    """
    K, J, I = (int(v) for v in shape)
    if K < 1 or J < 16 or I < 16:
        raise ValueError(f"phantom shape {tuple(shape)} too small (need K >= 1, J, I >= 16)")
    sx, sy, sz = (float(v) for v in spacing)
    rng = np.random.default_rng(seed)
    if target_scale is None:
        lo, hi = TARGET_SCALE_RANGE
        target_scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    else:
        target_scale = float(target_scale)
        rng.uniform()  # keep the stream aligned with the drawn case

    W_mm, H_mm, D_mm = I * sx, J * sy, K * sz
    x = ((np.arange(I, dtype=np.float32) + 0.5) * sx)[None, None, :]
    y = ((np.arange(J, dtype=np.float32) + 0.5) * sy)[None, :, None]
    zn = (((np.arange(K, dtype=np.float32) + 0.5) * sz) / D_mm)[:, None, None]  # 0 inferior .. 1 superior

    # --- body outline, skin, fat, muscle -------------------------------------------------------
    cx, cy = W_mm / 2 + rng.uniform(-0.03, 0.03) * W_mm, H_mm / 2 + rng.uniform(-0.03, 0.03) * H_mm
    ax = 0.44 * W_mm * rng.uniform(0.85, 1.05) * (1.0 + 0.04 * np.sin(2.0 * np.pi * zn + rng.uniform(0, 6)))
    ay = 0.34 * H_mm * rng.uniform(0.85, 1.05) * (1.0 + 0.03 * np.cos(2.0 * np.pi * zn))
    fat = rng.uniform(0.04, 0.12) * float(np.min(ax))
    wall = rng.uniform(0.025, 0.045) * float(np.min(ax))
    skin = max(2.0, 0.8 * sx)
    body = _ellipse(x, y, cx, cy, ax, ay)
    in_skin = _ellipse(x, y, cx, cy, ax - skin, ay - skin)
    in_fat = _ellipse(x, y, cx, cy, ax - skin - fat, ay - skin - 0.8 * fat)
    cavity = _ellipse(x, y, cx, cy, ax - skin - fat - wall, ay - skin - 0.8 * fat - wall)

    hu = np.full((K, J, I), HU_AIR, dtype=np.float32)
    hu[body] = HU_SKIN
    hu[in_skin] = HU_FAT
    hu[in_fat] = HU_MUSCLE
    # visceral fat with patches of mesentery / collapsed bowel (soft tissue), from smooth noise
    patches = _smooth_noise(rng, (K, J, I), (1.5, 6.0 / sy, 6.0 / sx), 1.0)
    mesentery = 1.0 / (1.0 + np.exp(-3.0 * (patches - rng.uniform(0.3, 0.9))))
    hu[cavity] = (HU_VISCERAL_FAT + (HU_MUSCLE - 10.0 - HU_VISCERAL_FAT) * mesentery)[cavity]

    cav_ax = ax - skin - fat - wall  # (K,1,1) mm
    cav_ay = ay - skin - 0.8 * fat - wall
    post = cy + cav_ay  # posterior inner wall (K,1,1)

    # --- spine, paraspinal muscle ----------------------------------------------------------------
    vr = 0.15 * float(np.min(cav_ax)) * rng.uniform(0.9, 1.1)  # vertebral body radius (~20 mm)
    vcy = post - 1.05 * vr
    for side in (-1.0, 1.0):  # paraspinal muscles, partly outside the cavity
        hu[_ellipse(x, y, cx + side * 1.3 * vr, post + 0.3 * vr, 1.0 * vr, 0.9 * vr) & in_fat] = HU_MUSCLE
        hu[_ellipse(x, y, cx + side * 1.5 * vr, vcy - 0.2 * vr, 0.5 * vr, 0.9 * vr) & cavity] = HU_MUSCLE  # psoas
    hu[_ellipse(x, y, cx, vcy, vr, 0.9 * vr)] = HU_BONE_CORTICAL
    hu[_ellipse(x, y, cx, vcy, 0.82 * vr, 0.72 * vr)] = HU_BONE_CANCELLOUS
    process = (np.abs(x - cx) < 0.18 * vr) & (y > vcy + 0.8 * vr) & (y < post + 1.0 * vr)
    hu[process & body] = 0.5 * (HU_BONE_CORTICAL + HU_BONE_CANCELLOUS)

    # --- vessels ---------------------------------------------------------------------------------
    ar = 0.5 * vr
    hu[_ellipse(x, y, cx + 0.6 * vr, vcy - vr - 1.1 * ar, ar, ar)] = HU_AORTA
    hu[_ellipse(x, y, cx - 1.5 * vr, vcy - vr - 0.9 * ar, 1.1 * ar, 0.8 * ar)] = HU_IVC

    # --- liver (patient right = image left), spleen, kidneys --------------------------------------
    liver_size = np.clip(0.25 + 0.9 * zn, 0.0, 1.0) * rng.uniform(0.85, 1.1)  # grows superiorly
    lax, lay = 0.42 * cav_ax * liver_size, 0.62 * cav_ay * liver_size
    lcx, lcy = cx - cav_ax + 1.05 * lax, cy - 0.05 * cav_ay
    hu[_ellipse(x, y, lcx, lcy, lax + 1e-3, lay + 1e-3) & cavity] = HU_LIVER
    spl = np.clip((zn - rng.uniform(0.45, 0.65)) * 3.0, 0.0, 1.0)
    hu[_ellipse(x, y, cx + cav_ax - 0.25 * cav_ax, post - 0.3 * cav_ay, 0.2 * cav_ax * spl + 1e-3, 0.28 * cav_ay * spl + 1e-3) & cavity] = HU_SPLEEN
    kz0, kz1 = rng.uniform(0.1, 0.3), rng.uniform(0.55, 0.8)
    kprof = np.clip(np.sin(np.pi * np.clip((zn - kz0) / (kz1 - kz0), 0, 1)), 0, 1)
    for side in (-1.0, 1.0):
        kcx = cx + side * (2.4 * vr + 0.12 * cav_ax)
        kcy = vcy - 0.2 * vr
        kax, kay = 0.13 * cav_ax * kprof + 1e-3, 0.2 * cav_ay * kprof + 1e-3
        hu[_ellipse(x, y, kcx, kcy, kax, kay) & cavity] = HU_KIDNEY_CORTEX
        hu[_ellipse(x, y, kcx - side * 0.2 * kax, kcy, 0.55 * kax, 0.6 * kay) & cavity] = HU_KIDNEY_MEDULLA

    # --- bowel loops with air pockets (anterior cavity) -------------------------------------------
    cav2d = cavity
    for _ in range(int(rng.integers(6, 12))):
        bx = cx + rng.uniform(-0.6, 0.7) * float(np.mean(cav_ax))
        by = cy + rng.uniform(-0.8, 0.1) * float(np.mean(cav_ay))
        br = rng.uniform(0.08, 0.2) * float(np.mean(cav_ax))
        bz0 = rng.uniform(-0.2, 0.8)
        bprof = np.clip(np.sin(np.pi * np.clip((zn - bz0) / rng.uniform(0.3, 0.8), 0, 1)), 0, 1)
        loop = _ellipse(x, y, bx, by, br * bprof + 1e-3, 0.85 * br * bprof + 1e-3) & cav2d
        free = loop & (hu < 45)  # do not overwrite solid organs
        hu[free] = HU_BOWEL_WALL
        lumen = _ellipse(x, y, bx, by, 0.75 * br * bprof + 1e-3, 0.6 * br * bprof + 1e-3) & free
        hu[lumen] = HU_BOWEL_FLUID
        if rng.random() < 0.7:  # gas rises anteriorly (to small y)
            gas = lumen & (y < by - rng.uniform(0.0, 0.4) * 0.6 * br)
            hu[gas] = HU_BOWEL_AIR

    # --- target organ ------------------------------------------------------------------------------
    tcx = cx + rng.uniform(-0.15, 0.15) * float(np.mean(cav_ax))
    tcy = cy + rng.uniform(-0.25, 0.15) * float(np.mean(cav_ay))
    sigma_vox = (1.2, 2.0 / sy * 1.5, 2.0 / sx * 1.5)
    lob = _smooth_noise(rng, (K, J, I), sigma_vox, 1.0)
    field = _paint_target(rng, (K, J, I), (sx, sy, sz), float(np.mean(ax)), float(np.mean(ay)), target_scale, tcx, tcy, lob)
    label = (field > 0) & cavity
    if not label.any():
        # a tiny organ fully removed by the lobulation noise: keep its core
        label = (field - 0.3 * np.clip(lob, -2.0, 2.0) > 0.5) & cavity
    target_hu = rng.uniform(60.0, 100.0)
    hu[label] = target_hu

    # --- texture and noise -------------------------------------------------------------------------
    tissue = hu > -500
    tex = _smooth_noise(rng, (K, J, I), sigma_vox, 15.0)
    hu += np.where(tissue, tex, 0.0).astype(np.float32)
    hu[label] = np.clip(hu[label], 40.0, 120.0)
    hu += rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    array = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return Phantom(array=array, label=label.astype(np.uint8), spacing=(sx, sy, sz), target_scale=target_scale)


def make_phantom_volume(
    shape: Sequence[int] = (48, 160, 160),
    spacing: Sequence[float] = (2.0, 2.0, 2.5),
    seed: int = 0,
    target_scale: Optional[float] = None,
    noise_hu: float = 12.0,
):
    """:func:`make_phantom` wrapped as ``(image, label)`` :class:`lsnet.io.geometry.Volume` objects.

    Both volumes share one canonical geometry: direction = identity (LPS), origin centred in-plane at
    (0, 0) and z starting at 0, so physical point (i, j, k) = origin + (i*sx, j*sy, k*sz).
    """
    p = make_phantom(shape, spacing, seed, target_scale, noise_hu)
    K, J, I = p.array.shape
    sx, sy, sz = p.spacing
    origin = (-(I - 1) * sx / 2.0, -(J - 1) * sy / 2.0, 0.0)
    direction = np.eye(3)
    image = Volume(p.array, p.spacing, origin, direction)
    label = Volume(p.label, p.spacing, origin, direction)
    return image, label
