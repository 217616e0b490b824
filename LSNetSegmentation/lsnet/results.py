"""Plain data returned by the engine to every front end (CLI, Slicer module, Python).

No torch here: the Slicer module and the output writers import this without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


def present_labels(mask: np.ndarray) -> list[int]:
    """Sorted non-zero values of a label map.  Linear in the voxels and sorting only foreground voxels
    (``np.unique``/``np.bincount`` over a whole 1000-slice CT take seconds)."""
    top = int(mask.max()) if mask.size else 0
    if top == 0:
        return []
    if top == 1:
        return [1]
    return [int(v) for v in np.unique(mask[mask != 0])]


@dataclass
class RoiBox:
    """One RoI found by L-Net (or drawn by a user) on one canonical axial slice.

    Coordinates are continuous *edge* coordinates in the original canonical slice pixel grid
    (x = column i, y = row j; pixel p spans [p, p+1)), i.e. after undoing the in-plane resampling of
    ``preprocess.py``.  The box is the tight box predicted by L-Net, *without* the alpha margin of
    Eq. 3 (``margin_px`` gives the margin in the same pixels, so the region S-Net saw is the box grown by
    ``margin_px / 2`` on each side).
    """

    slice_index: int
    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    margin_px: float = 0.0
    source: str = "lnet"  # "lnet" or "user"

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def to_dict(self) -> dict[str, Any]:
        return {
            "slice_index": int(self.slice_index),
            "x0": float(self.x0),
            "y0": float(self.y0),
            "x1": float(self.x1),
            "y1": float(self.y1),
            "score": float(self.score),
            "margin_px": float(self.margin_px),
            "source": self.source,
        }


@dataclass
class SegmentationResult:
    """What ``lsnet.segment_volume`` returns.

    Attributes:
        volume: the input :class:`lsnet.io.geometry.Volume` (its geometry defines every output).
        mask: ``(K, J, I)`` uint8 in the *input* array order; 0 background, label values from the card.
        heatmap: ``(K, J, I)`` float32 in [0, 1], rounded to multiples of 1/255 (display only, see
            ``inference.HEATMAP_LEVELS``), in the input array order (L-Net's K upsampled to the
            slice grid), or None when not requested.
        boxes: all RoIs, in canonical slice coordinates (see :class:`RoiBox`).
        reorientation: maps canonical indices back to input indices (``geometry.Reorientation``).
        model_card: the card of the weights used.
        device: e.g. ``"cpu"`` or ``"cuda:0 (NVIDIA H100)"``.
        timings: seconds per stage (``read``, ``preprocess``, ``lnet``, ``snet``, ``postprocess``...).
        postprocess: what the volume step removed (``lsnet.pipeline.postprocess``: ``step``, ``removed_voxels``,
            ``removed_components``, ``removed_slices``, ``removed_rois``); empty when it did not run.
    """

    volume: Any
    mask: np.ndarray
    heatmap: Optional[np.ndarray]
    boxes: list[RoiBox]
    reorientation: Any
    model_card: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def num_voxels(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def slices_with_mask(self) -> int:
        """Canonical axial slices with at least one segmented voxel."""
        can = self.mask if self.reorientation is None else self.reorientation.to_canonical_array(self.mask)
        return int(can.any(axis=(1, 2)).sum())
