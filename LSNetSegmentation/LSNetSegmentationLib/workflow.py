"""The Segment -> inspect -> correct workflow on a scene, shared by both front ends.

``LSNetSegmentationLogic`` (the desktop module, ``logic.py``) and the web app's session
(``LSNetSegmentationWeb/session.py``) call these functions, so what a Segment run puts into MRML and
what a correction changes cannot drift apart between them.  No Qt here: ``slicer`` (MRML,
``slicer.util``) and ``vtk`` are imported inside the functions, like ``results.py``, so importing this
module needs neither Slicer nor PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from . import geometry_bridge, parameters, process, results, roi_table


@dataclass
class LSNetResult:
    """What one Segment run put in the scene."""

    inputVolume: object
    segmentationNode: object
    segmentIds: list
    heatmapNode: object
    table: roi_table.RoiTableModel
    canonicalizer: geometry_bridge.Canonicalizer
    folderItem: int
    summary: dict = field(default_factory=dict)


def canonicalizer_of(volume_node) -> geometry_bridge.Canonicalizer:
    """The canonical-slice geometry of a volume node (its IJK->RAS and array shape)."""
    import slicer
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return geometry_bridge.Canonicalizer(slicer.util.arrayFromVTKMatrix(ijk_to_ras), slicer.util.arrayFromVolume(volume_node).shape)


def mask_summary(result: LSNetResult) -> dict:
    """Voxels / slices / volume of the result's first segment now (``results.segment_mask_summary``)."""
    import slicer

    if not result.segmentIds:
        return {}
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, result.segmentIds[0], result.inputVolume)
    return results.segment_mask_summary(mask) if mask is not None else {}


def load_results(output_dir: Path, outputs: Optional[dict], input_volume, output_segmentation=None,
                 replace_existing: bool = False, show_heatmap: bool = True,
                 heatmap_opacity: float = parameters.DEFAULT_HEATMAP_OPACITY, boxes_seen: Iterable = ()) -> LSNetResult:
    """Put the outputs of a finished ``lsnet segment`` run (``output_dir``; ``outputs`` = the done
    event's file map) into the scene: the segmentation (with terminology; replacing same-named segments
    only when ``replace_existing``), the heatmap (updated in place when this input already has one),
    both in the input's results folder, and the RoI table (``boxes.json``, else the ``boxes_seen``
    progress events), stored on the segmentation node."""
    paths = process.output_paths(Path(output_dir), outputs)
    folder = results.results_folder(input_volume)
    segmentation, segment_ids = results.import_segmentation(paths["seg_nrrd"], input_volume, output_segmentation,
                                                            replace_existing)
    results.move_to_folder(segmentation, folder)
    heatmap = None
    if paths["heatmap"].exists():
        heatmap = results.load_heatmap(paths["heatmap"], input_volume, results.find_heatmap(input_volume))
        results.move_to_folder(heatmap, folder)
        results.apply_heatmap_display(heatmap, input_volume, show_heatmap, heatmap_opacity)
    boxes = (roi_table.RoiTableModel.boxes_from_json(paths["boxes_json"].read_text(encoding="utf-8"))
             if paths["boxes_json"].exists() else list(boxes_seen))
    canonicalizer = canonicalizer_of(input_volume)
    table = roi_table.RoiTableModel(boxes, pixel_spacing=canonicalizer.spacing[:2])
    result = LSNetResult(input_volume, segmentation, segment_ids, heatmap, table, canonicalizer, folder)
    result.summary = mask_summary(result)
    store_boxes(result)
    return result


def store_boxes(result: LSNetResult) -> None:
    """Keep the RoI list with the segmentation (saved with the scene)."""
    result.segmentationNode.SetAttribute(parameters.BOXES_ATTRIBUTE, result.table.to_json())


def engine_volume(result: LSNetResult):
    """The input volume node as the engine's ``Volume`` (a view of the node's voxels, its geometry)."""
    import slicer

    return geometry_bridge.volume_from_slicer(slicer.util.arrayFromVolume(result.inputVolume),
                                              result.canonicalizer.input_ijk_to_ras)


def resegment_boxes(result: LSNetResult, segmenter, boxes) -> int:
    """S-Net (``segmenter.segment_box``) inside each box (one canonical slice each); the mask is replaced
    inside the boxes only.  Returns the number of voxels that changed."""
    volume = engine_volume(result)
    segment_id = result.segmentIds[0]
    mask, canonical = results.canonical_mask(result.segmentationNode, segment_id, result.inputVolume, result.canonicalizer)
    changed = 0
    for box in boxes:
        slice_mask, _probability = segmenter.segment_box(volume, box.slice_index, box)
        changed += geometry_bridge.paste_box_mask(canonical[box.slice_index], box, slice_mask)
    results.write_mask(mask, result.segmentationNode, segment_id, result.inputVolume)
    return changed


def delete_box_mask(result: LSNetResult, box) -> int:
    """Erase the segment inside a box on its slice; returns the erased voxels."""
    segment_id = result.segmentIds[0]
    mask, canonical = results.canonical_mask(result.segmentationNode, segment_id, result.inputVolume, result.canonicalizer)
    changed = geometry_bridge.paste_box_mask(canonical[box.slice_index], box, None)
    results.write_mask(mask, result.segmentationNode, segment_id, result.inputVolume)
    return changed
