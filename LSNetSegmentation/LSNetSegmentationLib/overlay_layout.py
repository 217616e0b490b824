"""How results are shown: heatmap display settings and which RoIs are visible (plain Python).

The Slicer-facing ``results`` module applies these values to MRML display nodes; keeping the numbers
here lets CI check them (e.g. that the heatmap window covers the [0, 1] probability range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

HEATMAP_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
"""Perceptually uniform, dark at 0: low heat fades into the CT, peaks stand out (Slicer's Inferno)."""
HEATMAP_COLOR_NODE_IDS = (
    HEATMAP_COLOR_NODE_ID,
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeIron",
)
"""Heatmap colour maps in order of preference.  Inferno is read from a colour-table file, which a
Slicer build may lack; PET-Heat (procedural) and Iron (a colour table) are built by the colour logic
itself, both dark at 0."""
HEATMAP_THRESHOLD = 0.05
"""Heat below this is transparent in slice views, so the CT stays readable away from the organ."""

ROI_COLOR_LNET = (0.2, 0.8, 1.0)
ROI_COLOR_USER = (1.0, 0.85, 0.1)
ROI_COLOR_SELECTED = (1.0, 0.3, 0.3)


@dataclass(frozen=True)
class HeatmapDisplay:
    """Scalar-volume display settings of the keypoint heatmap (values are probabilities in [0, 1])."""

    color_node_id: str
    window: float
    level: float
    lower_threshold: float
    upper_threshold: float
    foreground_opacity: float

    @property
    def window_min(self) -> float:
        return self.level - self.window / 2.0

    @property
    def window_max(self) -> float:
        return self.level + self.window / 2.0


def heatmap_display(show: bool, opacity: float, threshold: float = HEATMAP_THRESHOLD) -> HeatmapDisplay:
    """Display settings; ``foreground_opacity`` is 0 when the heatmap is hidden."""
    opacity = min(1.0, max(0.0, float(opacity)))
    return HeatmapDisplay(
        color_node_id=HEATMAP_COLOR_NODE_ID,
        window=1.0,
        level=0.5,
        lower_threshold=float(threshold),
        upper_threshold=1.0,
        foreground_opacity=opacity if show else 0.0,
    )


def pick_color_node_id(exists, preferred=HEATMAP_COLOR_NODE_IDS):
    """First colour node ID of ``preferred`` for which ``exists(id)`` is true, else None.

    ``exists``: ``str -> bool`` (in Slicer: the scene has a node with that ID).
    """
    return next((node_id for node_id in preferred if exists(node_id)), None)


def roi_label(box) -> str:
    """Short label drawn next to a RoI: its L-Net score, or 'user' for drawn boxes."""
    return "user" if box.source == "user" else f"{box.score:.2f}"


def roi_color(box, selected: bool = False) -> tuple[float, float, float]:
    if selected:
        return ROI_COLOR_SELECTED
    return ROI_COLOR_USER if box.source == "user" else ROI_COLOR_LNET


def visible_roi_ids(rows: Iterable, slice_index, show: bool = True) -> set[int]:
    """Ids of the rows whose markups ROI should exist and be visible while ``slice_index`` is viewed.

    ROI nodes are created lazily: only the RoIs of the viewed slice (plus edited ones, which the caller
    keeps) are materialised, so a volume with hundreds of boxes does not create hundreds of nodes.
    """
    if not show or slice_index is None:
        return set()
    return {row.id for row in rows if row.box.slice_index == slice_index}


def visibility_changes(current: set[int], wanted: set[int]) -> tuple[set[int], set[int]]:
    """``(to_show, to_hide)`` to go from the currently shown RoI ids to the wanted ones."""
    return set(wanted) - set(current), set(current) - set(wanted)
