"""The list of detected RoIs shown in the module's table (plain Python, no Qt).

Each row is one ``lsnet.results.RoiBox`` with a stable integer id (ids survive sorting, filtering,
editing and deletion of other rows, so the Qt table, the markups ROI nodes and the re-segmentation
code can refer to a row by id).  The Qt side only copies :meth:`RoiTableModel.display_rows` into a
``QTableWidget``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from .i18n import _

COLUMNS = ("slice", "score", "size")
"""Table columns, in order."""


@dataclass
class RoiRow:
    id: int
    box: object  # lsnet.results.RoiBox


def box_size_mm(box, pixel_spacing: Optional[Sequence[float]]) -> Optional[tuple[float, float]]:
    """In-plane size ``(width, height)`` in mm, or None without a pixel spacing."""
    if pixel_spacing is None:
        return None
    return box.width * float(pixel_spacing[0]), box.height * float(pixel_spacing[1])


class RoiTableModel:
    """Rows of RoIs with sorting, filtering by slice and selection -> jump target."""

    def __init__(self, boxes: Iterable = (), pixel_spacing: Optional[Sequence[float]] = None):
        self.pixel_spacing = None if pixel_spacing is None else tuple(float(s) for s in pixel_spacing[:2])
        self._rows: list[RoiRow] = []
        self._next_id = 0
        self.sort_key = "slice"
        self.descending = False
        self.set_boxes(boxes)

    # --- content ---------------------------------------------------------------------------------------
    def set_boxes(self, boxes: Iterable) -> None:
        self._rows = []
        self._next_id = 0
        for box in boxes:
            self.add(box)

    def add(self, box) -> int:
        row = RoiRow(self._next_id, box)
        self._next_id += 1
        self._rows.append(row)
        return row.id

    def remove(self, row_id: int):
        row = self.row(row_id)
        self._rows.remove(row)
        return row.box

    def update(self, row_id: int, box) -> None:
        self.row(row_id).box = box

    def row(self, row_id: int) -> RoiRow:
        for row in self._rows:
            if row.id == row_id:
                return row
        raise KeyError(f"no RoI with id {row_id}")

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def boxes(self) -> list:
        return [row.box for row in self._rows]

    # --- views -----------------------------------------------------------------------------------------
    def set_sort(self, key: str, descending: bool = False) -> None:
        if key not in COLUMNS:
            raise ValueError(f"unknown sort key {key!r}; expected one of {COLUMNS}")
        self.sort_key, self.descending = key, bool(descending)

    def _sort_value(self, row: RoiRow):
        box = row.box
        if self.sort_key == "slice":
            return (box.slice_index, box.y0, box.x0)
        if self.sort_key == "score":
            return (box.score, -box.slice_index)
        return (box.width * box.height * (np.prod(self.pixel_spacing) if self.pixel_spacing else 1.0), box.slice_index)

    def rows(self, slice_index: Optional[int] = None) -> list[RoiRow]:
        """Sorted rows, optionally only those on one canonical slice."""
        rows = [r for r in self._rows if slice_index is None or r.box.slice_index == slice_index]
        return sorted(rows, key=self._sort_value, reverse=self.descending)

    def rows_on_slice(self, slice_index: int) -> list[RoiRow]:
        return [r for r in self._rows if r.box.slice_index == slice_index]

    def display_rows(self, slice_index: Optional[int] = None) -> list[tuple[int, tuple[str, str, str]]]:
        """``[(row id, (slice text, score text, size text)), ...]`` in display order."""
        out = []
        for row in self.rows(slice_index):
            box = row.box
            score = _("user") if box.source == "user" else f"{box.score:.2f}"
            size = box_size_mm(box, self.pixel_spacing)
            if size is None:
                size_text = f"{box.width:.0f} x {box.height:.0f} px"
            else:
                size_text = f"{size[0]:.0f} x {size[1]:.0f} mm"
            out.append((row.id, (str(box.slice_index), score, size_text)))
        return out

    def slices(self) -> list[int]:
        return sorted({r.box.slice_index for r in self._rows})

    def jump_target_ras(self, row_id: int, canonical_ijk_to_ras) -> np.ndarray:
        """RAS point at the centre of the row's box, in the middle of its slice (views centre here)."""
        box = self.row(row_id).box
        m = np.asarray(canonical_ijk_to_ras, dtype=float)
        index = np.array([(box.x0 + box.x1) / 2.0 - 0.5, (box.y0 + box.y1) / 2.0 - 0.5, float(box.slice_index), 1.0])
        return (m @ index)[:3]

    # --- persistence (stored as a node attribute, saved with the scene) ----------------------------------
    def to_json(self) -> str:
        return json.dumps([row.box.to_dict() for row in self._rows])

    @staticmethod
    def boxes_from_json(text: str) -> list:
        return boxes_from_dicts(json.loads(text) if text else [])


def boxes_from_dicts(items) -> list:
    """``RoiBox`` list from ``RoiBox.to_dict()`` dicts (progress events, the scene attribute) or from the
    records of ``boxes.json`` (``{"boxes": [{"slice_index", "canonical_xyxy", "score", ...}]}``)."""
    from lsnet.results import RoiBox

    if isinstance(items, dict):
        items = items.get("boxes", [])
    boxes = []
    for d in items:
        score = float(d.get("score", 0.0))
        x0, y0, x1, y1 = d["canonical_xyxy"] if "canonical_xyxy" in d else (d["x0"], d["y0"], d["x1"], d["y1"])
        boxes.append(
            RoiBox(
                int(d["slice_index"] if "slice_index" in d else d["slice"]),
                float(x0), float(y0), float(x1), float(y1),
                score if math.isfinite(score) else 0.0,
                float(d.get("margin_px", 0.0)),
                str(d.get("source", "lnet")),
            )
        )
    return boxes


def with_slice(box, slice_index: int):
    """Copy of a box moved to another slice (re-segmenting a slice range with one box)."""
    from dataclasses import replace

    return replace(box, slice_index=int(slice_index))
