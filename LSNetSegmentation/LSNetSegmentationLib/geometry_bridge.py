"""MRML geometry <-> engine geometry, as plain arrays and matrices (no Slicer, no torch).

Slicer describes a volume by a voxel array ``[k, j, i]`` (``slicer.util.arrayFromVolume``) and a 4x4
``IJKToRAS`` matrix.  The engine (``lsnet.io.geometry.Volume``) uses ITK's convention: spacing, origin and
direction in LPS, in (i, j, k) order.  The two are related by

    RAS = F @ (origin + direction @ diag(spacing) @ ijk),   F = diag(-1, -1, 1)   (LPS -> RAS).

The engine segments *canonical* axial slices: the volume permuted/flipped (no resampling) so that
i -> patient Left, j -> Posterior, k -> Superior.  :class:`Canonicalizer` gives a numpy *view* of a
Slicer array in that order (writing a canonical slice writes the Slicer array) and the canonical
IJK->RAS matrix.  RoI boxes (``lsnet.results.RoiBox``) use continuous edge coordinates of a canonical
slice: x = column, y = row, pixel p spans [p, p + 1); voxel centres are at index + 0.5.
"""

from __future__ import annotations

import itertools
from typing import Optional

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# --- IJKToRAS <-> (spacing, origin, direction) ------------------------------------------------------------
def ijk_to_ras_matrix(spacing, origin_lps, direction_lps) -> np.ndarray:
    """4x4 IJKToRAS from ITK-style geometry (spacing (i, j, k) mm, origin and direction in LPS)."""
    direction = np.asarray(direction_lps, dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.asarray(spacing, dtype=float))
    m[:3, 3] = LPS_TO_RAS @ np.asarray(origin_lps, dtype=float)
    return m


def geometry_from_ijk_to_ras(ijk_to_ras) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`ijk_to_ras_matrix`: ``(spacing (3,), origin_lps (3,), direction_lps (3, 3))``."""
    m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    lps = LPS_TO_RAS @ m[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("IJKToRAS matrix has a zero-length axis")
    return spacing, LPS_TO_RAS @ m[:3, 3], lps / spacing


def volume_from_slicer(array_kji, ijk_to_ras):
    """``lsnet.io.geometry.Volume`` from ``slicer.util.arrayFromVolume`` output and the IJKToRAS matrix."""
    from lsnet.io.geometry import Volume  # engine import stays lazy (the module loads without it)

    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras)
    return Volume(np.asarray(array_kji), tuple(spacing), tuple(origin), direction)


def ijk_to_ras_from_volume(volume) -> np.ndarray:
    """IJKToRAS of an ``lsnet.io.geometry.Volume`` (what ``SetIJKToRASMatrix`` wants)."""
    return ijk_to_ras_matrix(volume.spacing, volume.origin, volume.direction)


# --- canonical orientation -----------------------------------------------------------------------------
class Canonicalizer:
    """A Slicer volume (``(K, J, I)`` array shape + IJKToRAS) seen in the engine's canonical orientation.

    Wraps ``lsnet.io.geometry.Reorientation`` (the engine's single definition of "canonical") and adds
    the canonical IJKToRAS matrix, which places RoI boxes and slice positions in RAS.
    """

    def __init__(self, ijk_to_ras, shape_kji):
        from lsnet.io.geometry import Reorientation

        self.input_ijk_to_ras = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
        self.input_shape = tuple(int(n) for n in shape_kji)
        if len(self.input_shape) != 3:
            raise ValueError(f"expected a 3-D (K, J, I) shape, got {self.input_shape}")
        _, _, direction = geometry_from_ijk_to_ras(self.input_ijk_to_ras)
        self.reorientation = Reorientation.from_direction(direction, self.input_shape)
        self.ijk_to_ras = self.input_ijk_to_ras @ self.reorientation.canonical_to_input_ijk_matrix()
        """Canonical IJKToRAS (4x4)."""
        self.shape = tuple(self.reorientation.canonical_shape)
        """Canonical array shape ``(K, J, I)``."""

    def view(self, array_kji: np.ndarray) -> np.ndarray:
        """Canonical ``(K, J, I)`` view of an input-ordered array (no copy: writes go through)."""
        return self.reorientation.to_canonical_array(array_kji)

    def slice_of_ras(self, ras) -> Optional[int]:
        """Canonical slice index containing the RAS point, or None when outside the volume."""
        q = np.linalg.solve(self.ijk_to_ras, np.r_[np.asarray(ras, dtype=float), 1.0])[:3]
        k = int(np.floor(q[2] + 0.5))
        return k if 0 <= k < self.shape[0] else None

    @property
    def spacing(self) -> np.ndarray:
        """Canonical (i, j, k) spacing in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)


# --- boxes <-> markups ROI geometry --------------------------------------------------------------------
def box_roi_geometry(box, canonical_ijk_to_ras, include_margin: bool = False):
    """Markups ROI geometry of a canonical-slice box.

    Returns ``(center_ras (3,), axes_ras (3, 3) unit columns, size_mm (3,))``: the box spans its
    pixels in-plane and exactly one slice thickness (so a slice view shows it only on its own slice).
    """
    m = np.asarray(canonical_ijk_to_ras, dtype=float)
    grow = box.margin_px / 2.0 if include_margin else 0.0
    x0, y0, x1, y1 = box.x0 - grow, box.y0 - grow, box.x1 + grow, box.y1 + grow
    center_index = np.array([(x0 + x1) / 2.0 - 0.5, (y0 + y1) / 2.0 - 0.5, float(box.slice_index), 1.0])
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    axes = m[:3, :3] / spacing
    size = np.array([x1 - x0, y1 - y0, 1.0]) * spacing
    return (m @ center_index)[:3], axes, size


def roi_corners_ras(center, axes, size) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of an oriented box (for checks and drawing)."""
    center = np.asarray(center, dtype=float)
    half = np.asarray(axes, dtype=float) * (np.asarray(size, dtype=float) / 2.0)
    return np.array([center + half @ np.array(s) for s in itertools.product((-1, 1), repeat=3)])


def box_from_roi_geometry(center_ras, size_mm, canonical_ijk_to_ras, canonical_shape, score: float = 0.0,
                          margin_px: float = 0.0, source: str = "user"):
    """Canonical-slice ``RoiBox`` of a markups ROI (center, size); clipped to the slice.

    The slice is the one containing the ROI centre.  Raises ValueError when the ROI lies outside the
    volume or has no in-plane area after clipping.
    """
    from lsnet.results import RoiBox

    m = np.asarray(canonical_ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    q = np.linalg.solve(m, np.r_[np.asarray(center_ras, dtype=float), 1.0])[:3]
    k = int(np.floor(q[2] + 0.5))
    K, J, I = canonical_shape
    if not 0 <= k < K:
        raise ValueError(f"RoI centre is outside the volume (slice {k} of {K})")
    half = np.asarray(size_mm, dtype=float)[:2] / spacing[:2] / 2.0
    cx, cy = q[0] + 0.5, q[1] + 0.5
    x0, x1 = max(0.0, cx - half[0]), min(float(I), cx + half[0])
    y0, y1 = max(0.0, cy - half[1]), min(float(J), cy + half[1])
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        raise ValueError("RoI has less than one pixel inside the slice")
    return RoiBox(k, x0, y0, x1, y1, float(score), float(margin_px), source)


def default_box_at(ras, canonicalizer: Canonicalizer, size_mm: float = 60.0, source: str = "user"):
    """A square user box of ``size_mm`` centred on ``ras`` (clipped), for "add RoI on this slice"."""
    return box_from_roi_geometry(ras, (size_mm, size_mm, 0.0), canonicalizer.ijk_to_ras, canonicalizer.shape,
                                 score=0.0, source=source)


def box_pixel_bounds(box, shape_ji, include_margin: bool = True) -> tuple[slice, slice]:
    """``(rows, cols)`` slices of the pixels a box covers in a canonical slice of shape ``(J, I)``.

    A pixel belongs to the box when any part of it does (floor of the low edge, ceil of the high edge).
    """
    grow = box.margin_px / 2.0 if include_margin else 0.0
    J, I = shape_ji
    c0 = max(0, int(np.floor(box.x0 - grow)))
    c1 = min(I, int(np.ceil(box.x1 + grow)))
    r0 = max(0, int(np.floor(box.y0 - grow)))
    r1 = min(J, int(np.ceil(box.y1 + grow)))
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def paste_box_mask(canonical_slice: np.ndarray, box, new_mask_slice: Optional[np.ndarray], label: int = 1) -> int:
    """Replace the label inside the box region of one canonical slice; returns changed pixel count.

    ``new_mask_slice`` is the S-Net result on the whole slice grid ``(J, I)`` (0 outside the box) or
    None to delete the RoI's mask.  Pixels outside the box region are never touched, so other RoIs on
    the same slice keep their masks.
    """
    rows, cols = box_pixel_bounds(box, canonical_slice.shape)
    region = canonical_slice[rows, cols]
    before = region.copy()
    if new_mask_slice is None:
        region[region == label] = 0
    else:
        new = np.asarray(new_mask_slice)[rows, cols] > 0
        region[region == label] = 0
        region[new] = label
    return int(np.count_nonzero(before != region))
