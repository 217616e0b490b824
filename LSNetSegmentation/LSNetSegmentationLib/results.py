"""Slicer-facing: put engine results into the scene (segmentation, heatmap, RoI markups).

Everything numeric is delegated to the plain modules (``geometry_bridge``, ``overlay_layout``,
``roi_table``); this module only talks to MRML.  ``slicer``/``vtk`` are imported inside functions so
the package imports outside Slicer.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from . import geometry_bridge, overlay_layout
from .i18n import _
from .parameters import (
    HEATMAP_INPUT_REFERENCE,
    HEATMAP_NODE_SUFFIX,
    ROI_NODE_PREFIX,
    SEGMENTATION_NODE_SUFFIX,
    SUBJECT_HIERARCHY_FOLDER,
)


def unique_name(base: str, existing) -> str:
    """``base``, or ``base (2)``, ``base (3)``... whichever is not in ``existing``."""
    existing = set(existing)
    if base not in existing:
        return base
    n = 2
    while f"{base} ({n})" in existing:
        n += 1
    return f"{base} ({n})"


def segment_names(segmentationNode) -> list[str]:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def results_folder(inputVolume) -> int:
    """Subject hierarchy folder (item id) for the results of one input, next to the input volume."""
    import slicer

    shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
    inputItem = shNode.GetItemByDataNode(inputVolume)
    parent = shNode.GetItemParent(inputItem) if inputItem else shNode.GetSceneItemID()
    name = f"{SUBJECT_HIERARCHY_FOLDER}: {inputVolume.GetName()}"
    for child in range(shNode.GetNumberOfItemChildren(parent)):
        item = shNode.GetItemByPositionUnderParent(parent, child)
        if shNode.GetItemName(item) == name:
            return item
    folder = shNode.CreateFolderItem(parent, name)
    if not folder:
        raise RuntimeError(_("Could not create the subject-hierarchy folder '{name}'.").format(name=name))
    return folder


def move_to_folder(node, folderItem: int) -> None:
    """Put ``node`` under ``folderItem``; a node without a subject-hierarchy item gets one there.

    Slicer's subject-hierarchy plugins create items for new nodes, but not in every setting (scripts
    without the GUI, slicer-core): the item ID is then 0 and ``SetItemParent`` would only log an error.
    """
    import slicer

    shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
    item = shNode.GetItemByDataNode(node)
    if item:
        shNode.SetItemParent(item, folderItem)
    else:
        shNode.CreateItem(folderItem, node)


# --- segmentation ---------------------------------------------------------------------------------
def import_segmentation(segFile, inputVolume, outputSegmentation=None, replaceExisting: bool = False):
    """Copy the segments of an engine ``.seg.nrrd`` into ``outputSegmentation`` (created if None).

    A segment whose name already exists is replaced only when ``replaceExisting`` is True; otherwise
    it is added under a new unique name, so nothing the user made is lost silently.  Names, colours
    and terminology come from ``lsnet.io.terminology`` (standard SNOMED CT codes of Slicer's General
    Anatomy list).  Returns ``(segmentationNode, [segment ids])``.
    """
    import slicer
    from lsnet.io.terminology import lookup_structure

    loaded = slicer.util.loadSegmentation(str(segFile))
    try:
        if outputSegmentation is None:
            outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(inputVolume.GetName() + SEGMENTATION_NODE_SUFFIX))
            outputSegmentation.CreateDefaultDisplayNodes()
            outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        target = outputSegmentation.GetSegmentation()
        source = loaded.GetSegmentation()
        newIds = []
        with slicer.util.NodeModify(outputSegmentation):
            for index in range(source.GetNumberOfSegments()):
                sourceId = source.GetNthSegmentID(index)
                sourceSegment = source.GetSegment(sourceId)
                name = sourceSegment.GetName()
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(loaded, sourceId, inputVolume)
                existingId = target.GetSegmentIdBySegmentName(name)
                if existingId and replaceExisting:
                    segmentId = existingId
                else:
                    segmentId = target.AddEmptySegment("", unique_name(name, segment_names(outputSegmentation)))
                segment = target.GetSegment(segmentId)
                structure = lookup_structure(name=name)
                if structure is not None:
                    segment.SetColor(*structure.color)
                    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), structure.terminology.serialize())
                else:
                    segment.SetColor(*sourceSegment.GetColor())
                # name and colour are chosen here (standard terminology): Slicer must not regenerate them
                segment.SetNameAutoGenerated(False)
                segment.SetColorAutoGenerated(False)
                slicer.util.updateSegmentBinaryLabelmapFromArray(mask, outputSegmentation, segmentId, inputVolume)
                newIds.append(segmentId)
        outputSegmentation.CreateClosedSurfaceRepresentation()  # shown in 3D too
        return outputSegmentation, newIds
    finally:
        slicer.mrmlScene.RemoveNode(loaded)


def canonical_mask(segmentationNode, segmentId, inputVolume, canonicalizer):
    """``(array in input order, canonical view of it)`` of one segment on the input volume's grid."""
    import slicer

    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, inputVolume)
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    return mask, canonicalizer.view(mask)


def write_mask(mask, segmentationNode, segmentId, inputVolume) -> None:
    import slicer

    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, segmentId, inputVolume)


# --- heatmap ---------------------------------------------------------------------------------------
def find_heatmap(inputVolume):
    """The heatmap volume an earlier run made for ``inputVolume`` (node reference), or None."""
    import slicer

    for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if node.GetNodeReferenceID(HEATMAP_INPUT_REFERENCE) == inputVolume.GetID():
            return node
    return None


def load_heatmap(heatmapFile, inputVolume, previous=None):
    """Load the engine's heatmap (probabilities in [0, 1]) as a scalar volume.

    ``previous`` (the heatmap of an earlier run on the same input) is updated in place -- same node,
    ID, display settings and folder -- so runs never pile up heatmap copies; heatmaps of other inputs
    are never touched.  The node references its input (``HEATMAP_INPUT_REFERENCE``).
    """
    import slicer
    import vtk

    node = slicer.util.loadVolume(str(heatmapFile), {"show": False, "name": inputVolume.GetName() + HEATMAP_NODE_SUFFIX})
    if previous is not None and previous.GetScene() is not None and previous is not node:
        ijkToRAS = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijkToRAS)
        with slicer.util.NodeModify(previous):
            previous.SetIJKToRASMatrix(ijkToRAS)
            previous.SetAndObserveImageData(node.GetImageData())
        slicer.mrmlScene.RemoveNode(node)
        node = previous
    node.SetNodeReferenceID(HEATMAP_INPUT_REFERENCE, inputVolume.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def heatmap_color_node_id() -> Optional[str]:
    """The preferred heatmap colour map present in the scene (``overlay_layout.HEATMAP_COLOR_NODE_IDS``).

    Logs a warning when it falls back from Inferno, and when none is present (the display keeps its
    current colour map then, instead of pointing at a missing node).
    """
    import slicer

    colorNodeId = overlay_layout.pick_color_node_id(lambda i: slicer.mrmlScene.GetNodeByID(i) is not None)
    if colorNodeId != overlay_layout.HEATMAP_COLOR_NODE_ID:
        logging.warning("LSNet: colour map %s is not in the scene; the heatmap uses %s.",
                        overlay_layout.HEATMAP_COLOR_NODE_ID, colorNodeId or "the default grey map")
    return colorNodeId


def apply_heatmap_display(heatmapNode, inputVolume, show: bool, opacity: float) -> None:
    """Colour map, [0, 1] window, low-heat threshold and foreground opacity (``overlay_layout``)."""
    import slicer

    settings = overlay_layout.heatmap_display(show, opacity)
    colorNodeId = heatmap_color_node_id()
    display = heatmapNode.GetDisplayNode()
    with slicer.util.NodeModify(display):
        if colorNodeId:
            display.SetAndObserveColorNodeID(colorNodeId)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(settings.window_min, settings.window_max)
        display.AutoThresholdOff()
        display.SetThreshold(settings.lower_threshold, settings.upper_threshold)
        display.ApplyThresholdOn()
    slicer.util.setSliceViewerLayers(background=inputVolume, foreground=heatmapNode,
                                     foregroundOpacity=settings.foreground_opacity, fit=False)


# --- RoI markups -------------------------------------------------------------------------------------
class RoiMarkups:
    """Markups ROI nodes for the rows of a ``RoiTableModel``, created lazily per viewed slice.

    Each box becomes a box ROI one slice thick, so slice views show it only on its own slice; nodes
    are made for the slice being viewed (and kept once made, since the user may have edited them).
    """

    def __init__(self, table, canonicalizer, folderItem: Optional[int] = None):
        self.table = table
        self.canonicalizer = canonicalizer
        self.folderItem = folderItem
        self.nodes: dict[int, object] = {}
        self.selectedId: Optional[int] = None
        self.visible = True
        self.currentSlice: Optional[int] = None

    def _create(self, rowId: int):
        import slicer

        box = self.table.row(rowId).box
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{ROI_NODE_PREFIX} {rowId}")
        node.CreateDefaultDisplayNodes()
        node.SetAttribute("LSNetSegmentation.RoiId", str(rowId))
        self._place(node, box)
        display = node.GetDisplayNode()
        display.SetRotationHandleVisibility(False)  # boxes stay aligned with the slice grid
        display.SetFillOpacity(0.1)  # the segment inside the box stays visible
        display.SetVisibility3D(False)
        node.SetLocked(False)
        if self.folderItem is not None:
            move_to_folder(node, self.folderItem)
        self.nodes[rowId] = node
        self._style(rowId)
        return node

    def _place(self, node, box) -> None:
        import slicer

        center, axes, size = geometry_bridge.box_roi_geometry(box, self.canonicalizer.ijk_to_ras)
        if np.linalg.det(axes) < 0:
            axes = axes * np.array([1.0, 1.0, -1.0])  # a box is symmetric: keep the frame right-handed
        objectToNode = np.eye(4)
        objectToNode[:3, :3] = axes
        objectToNode[:3, 3] = center
        with slicer.util.NodeModify(node):
            node.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(objectToNode))
            node.SetSize(*size)

    def _style(self, rowId: int) -> None:
        node = self.nodes.get(rowId)
        if node is None:
            return
        box = self.table.row(rowId).box
        display = node.GetDisplayNode()
        color = overlay_layout.roi_color(box, rowId == self.selectedId)
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        node.SetName(f"{ROI_NODE_PREFIX} {rowId} ({overlay_layout.roi_label(box)})")

    def node(self, rowId: int, create: bool = True):
        if rowId not in self.nodes and create:
            return self._create(rowId)
        return self.nodes.get(rowId)

    def show_slice(self, sliceIndex: Optional[int]) -> None:
        """Make the RoIs of ``sliceIndex`` exist and be visible; hide the others."""
        self.currentSlice = sliceIndex
        wanted = overlay_layout.visible_roi_ids(self.table.rows(), sliceIndex, self.visible)
        current = {rowId for rowId, n in self.nodes.items() if n.GetDisplayVisibility()}
        toShow, toHide = overlay_layout.visibility_changes(current, wanted)
        for rowId in toShow:
            self.node(rowId).SetDisplayVisibility(True)
        for rowId in toHide:
            self.nodes[rowId].SetDisplayVisibility(False)

    def select(self, rowId: Optional[int]) -> None:
        previous, self.selectedId = self.selectedId, rowId
        for r in (previous, rowId):
            if r is not None and r in self.nodes:
                self._style(r)

    def box_from_node(self, rowId: int):
        """The row's box as currently drawn (the user may have moved or resized the ROI)."""
        node = self.nodes.get(rowId)
        old = self.table.row(rowId).box
        if node is None:
            return old
        center = [0.0, 0.0, 0.0]
        node.GetCenterWorld(center)
        size = [0.0, 0.0, 0.0]
        node.GetSizeWorld(size)
        box = geometry_bridge.box_from_roi_geometry(
            center, size, self.canonicalizer.ijk_to_ras, self.canonicalizer.shape,
            score=old.score, margin_px=old.margin_px, source=old.source)
        moved = not np.allclose([box.slice_index, box.x0, box.y0, box.x1, box.y1],
                                [old.slice_index, old.x0, old.y0, old.x1, old.y1], atol=1e-3)
        if moved and box.source != "user":
            from dataclasses import replace

            box = replace(box, source="user")
        return box

    def refresh(self, rowId: int) -> None:
        """Re-place a node after its row's box changed in the table."""
        node = self.nodes.get(rowId)
        if node is not None:
            self._place(node, self.table.row(rowId).box)
            self._style(rowId)

    def remove(self, rowId: int) -> None:
        import slicer

        node = self.nodes.pop(rowId, None)
        if node is not None and node.GetScene() is not None:
            slicer.mrmlScene.RemoveNode(node)
        if self.selectedId == rowId:
            self.selectedId = None

    def clear(self) -> None:
        for rowId in list(self.nodes):
            self.remove(rowId)


def current_slice_center_ras(sliceNode) -> np.ndarray:
    """RAS point at the centre of a slice view (SliceToRAS translation)."""
    import slicer

    return slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())[:3, 3]


def segment_mask_summary(mask: np.ndarray) -> dict:
    """Voxel count and number of slices with foreground (for status messages and the self-test)."""
    mask = np.asarray(mask)
    return {"voxels": int(np.count_nonzero(mask)), "slices": int(np.count_nonzero(mask.reshape(mask.shape[0], -1).any(axis=1)))}


def describe_result(summary: dict, numBoxes: int, device: str, seconds: Optional[float], clearedSlices: int = 0) -> str:
    text = _("{voxels} voxels on {slices} slices, {boxes} RoIs").format(
        voxels=summary.get("voxels", 0), slices=summary.get("slices", 0), boxes=numBoxes)
    if clearedSlices:
        text += _(" (small disconnected parts dropped: {n} slices cleared)").format(n=clearedSlices)
    if device:
        text += _(" on {device}").format(device=device)
    if seconds:
        text += _(" in {seconds:.1f} s").format(seconds=seconds)
    return text


__all__ = [
    "RoiMarkups",
    "apply_heatmap_display",
    "canonical_mask",
    "current_slice_center_ras",
    "describe_result",
    "find_heatmap",
    "heatmap_color_node_id",
    "import_segmentation",
    "load_heatmap",
    "move_to_folder",
    "results_folder",
    "segment_mask_summary",
    "unique_name",
    "write_mask",
]
