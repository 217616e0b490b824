"""Writing a :class:`~lsnet.results.SegmentationResult` to files 3D Slicer (and other tools) open.

Files (all in the *input* geometry, so they overlay the CT they came from):

=================================  ==============================================================
``<prefix>segmentation.seg.nrrd``  Slicer segmentation (slicerio): one segment per label, standard
                                   name, colour and terminology (``lsnet.io.terminology``).
``<prefix>segmentation.nii.gz``    plain labelmap (optional, ``nifti=True``).
``<prefix>heatmap.nrrd``           L-Net heatmap, float32 in [0, 1] (when the result has one).
``<prefix>boxes.json``             every RoI: canonical box + its 8 corners in input IJK and RAS.
``<prefix>rois.mrk.json``          Slicer markups: one ROI box per 3-D connected object of the mask.
=================================  ==============================================================

Writing is all-or-nothing: every target is checked first (existing files are an :class:`OutputError`
unless ``overwrite=True``), each file is written under a hidden temporary name in the output folder and
only renamed into place (``os.replace``) once all of them were written; on any failure the temporaries
are removed.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from lsnet.errors import OutputError
from lsnet.io.geometry import LPS_TO_RAS, Reorientation, Volume, apply_affine
from lsnet.io.terminology import DEFAULT_LABELS, structure_for_label
from lsnet.results import RoiBox, SegmentationResult, present_labels

logger = logging.getLogger(__name__)

MARKUPS_SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)

BOXES_COORDINATES_DOC = (
    "slice_index: axial slice k of the canonical (LPS-aligned) volume. canonical_xyxy: x0, y0, x1, y1 in "
    "edge pixel coordinates of that canonical slice (x = column i, y = row j; pixel p spans [p, p+1)). "
    "ijk_corners: the 8 box corners in INPUT image index coordinates (i, j, k; voxel centres are integers; "
    "the box spans its slice +/- 0.5), ordered k-major then j then i (i fastest). ras_corners: the same "
    "corners in RAS millimetres (3D Slicer world coordinates)."
)

FILE_NAMES = {
    "seg_nrrd": "segmentation.seg.nrrd",
    "nifti": "segmentation.nii.gz",
    "heatmap": "heatmap.nrrd",
    "boxes_json": "boxes.json",
    "markups": "rois.mrk.json",
}


# --------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------
def labels_from_card(model_card: Optional[dict]) -> list:
    """Label list ``[{"value", "name", "snomed"}]`` of a model card (``card['config']['labels']``),
    falling back to Pancreas = 1."""
    labels = ((model_card or {}).get("config") or {}).get("labels") or DEFAULT_LABELS
    return [dict(lab) for lab in labels]


def _labels_for_mask(mask: np.ndarray, labels: list) -> list:
    """``labels`` plus a generic entry for each value present in ``mask`` but not listed."""
    listed = {int(lab.get("value", 1)) for lab in labels}
    extra = [{"value": v, "name": f"Label {v}"} for v in present_labels(np.asarray(mask)) if v not in listed]
    return labels + extra


# --------------------------------------------------------------------------------------------------
# boxes: canonical slice boxes -> input IJK / RAS
# --------------------------------------------------------------------------------------------------
def _reorientation_of(volume: Volume, reorientation: Optional[Reorientation]) -> Reorientation:
    return reorientation if reorientation is not None else Reorientation.from_direction(volume.direction, volume.shape)


def box_corners_canonical_ijk(box: RoiBox) -> np.ndarray:
    """``(8, 3)`` corners of ``box`` in canonical index coordinates (i, j, k; voxel centres integer).

    Edge coordinate x maps to index i = x - 0.5; the box covers its slice k +/- 0.5.  Order: k-major,
    then j, then i (i varies fastest).
    """
    i0, i1 = box.x0 - 0.5, box.x1 - 0.5
    j0, j1 = box.y0 - 0.5, box.y1 - 0.5
    k0, k1 = box.slice_index - 0.5, box.slice_index + 0.5
    return np.array([[i, j, k] for k in (k0, k1) for j in (j0, j1) for i in (i0, i1)], dtype=np.float64)


def box_corners_ijk(box: RoiBox, reorientation: Reorientation) -> np.ndarray:
    """``(8, 3)`` corners of a canonical slice box in INPUT index coordinates (i, j, k)."""
    return reorientation.canonical_ijk_to_input_ijk(box_corners_canonical_ijk(box))


def box_corners_lps(box: RoiBox, volume: Volume, reorientation: Optional[Reorientation] = None) -> np.ndarray:
    """``(8, 3)`` corners of a canonical slice box in LPS mm."""
    reo = _reorientation_of(volume, reorientation)
    return apply_affine(volume.ijk_to_lps(), box_corners_ijk(box, reo))


def box_corners_ras(box: RoiBox, volume: Volume, reorientation: Optional[Reorientation] = None) -> np.ndarray:
    """``(8, 3)`` corners of a canonical slice box in RAS mm (Slicer world coordinates)."""
    reo = _reorientation_of(volume, reorientation)
    return apply_affine(volume.ijk_to_ras(), box_corners_ijk(box, reo))


def boxes_to_records(boxes: Iterable[RoiBox], volume: Volume, reorientation: Optional[Reorientation] = None) -> list:
    """JSON-ready records of ``boxes`` (see :data:`BOXES_COORDINATES_DOC`)."""
    reo = _reorientation_of(volume, reorientation)
    ijk_to_ras = volume.ijk_to_ras()
    records = []
    for box in boxes:
        ijk = box_corners_ijk(box, reo)
        records.append(
            {
                "slice_index": int(box.slice_index),
                "score": float(box.score),
                "source": box.source,
                "margin_px": float(box.margin_px),
                "canonical_xyxy": [float(box.x0), float(box.y0), float(box.x1), float(box.y1)],
                "ijk_corners": np.round(ijk, 6).tolist(),
                "ras_corners": np.round(apply_affine(ijk_to_ras, ijk), 6).tolist(),
            }
        )
    return records


def _model_identity(card: Optional[dict]) -> dict:
    card = card or {}
    return {"name": card.get("name"), "sha256": card.get("sha256")}


def boxes_document(result: SegmentationResult) -> dict:
    """The content of ``boxes.json``."""
    vol: Volume = result.volume
    reo = _reorientation_of(vol, result.reorientation)
    return {
        "version": 1,
        "model": _model_identity(result.model_card),
        "coordinate_system": BOXES_COORDINATES_DOC,
        "input_geometry": {
            "shape_kji": list(vol.shape),
            "spacing_ijk": list(vol.spacing),
            "origin_lps": list(vol.origin),
            "direction_lps": vol.direction.tolist(),
            "ijk_to_ras": vol.ijk_to_ras().tolist(),
        },
        "reorientation": reo.to_dict(),
        "postprocess": dict(result.postprocess),
        "boxes": boxes_to_records(result.boxes, vol, reo),
    }


# --------------------------------------------------------------------------------------------------
# ROI markups: one box per 3-D connected object
# --------------------------------------------------------------------------------------------------
def mask_components(mask: np.ndarray, label_value: int = 1) -> list:
    """3-D connected components (26-connectivity) of ``mask == label_value``, largest first.

    Returns ``[(bbox, voxels)]`` with ``bbox = ((k0, k1), (j0, j1), (i0, i1))`` inclusive voxel index
    ranges in the array of ``mask`` (``(K, J, I)``).  Works on the mask's bounding box only.
    """
    from scipy import ndimage

    binary = np.asarray(mask) == label_value
    if not binary.any():
        return []
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.nonzero(binary.any(axis=other))[0]
        lo.append(int(nz[0]))
        hi.append(int(nz[-1]))
    crop = binary[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    labelled, n = ndimage.label(crop, structure=np.ones((3, 3, 3), dtype=bool))
    counts = np.bincount(labelled.ravel(), minlength=n + 1)
    comps = []
    for idx, sl in enumerate(ndimage.find_objects(labelled), start=1):
        if sl is None:
            continue
        bbox = tuple((lo[a] + sl[a].start, lo[a] + sl[a].stop - 1) for a in range(3))
        comps.append((bbox, int(counts[idx])))
    comps.sort(key=lambda c: (-c[1], c[0]))
    return comps


def roi_orientation(volume: Volume) -> np.ndarray:
    """``(3, 3)`` rotation whose columns are the ROI axes in LPS: the volume's i, j, k directions
    (k negated for a left-handed direction matrix, which leaves an axis-symmetric box unchanged)."""
    r = volume.direction / np.linalg.norm(volume.direction, axis=0, keepdims=True)
    if np.linalg.det(r) < 0:
        r = r.copy()
        r[:, 2] = -r[:, 2]
    return r


def roi_markup(
    name: str,
    center_lps: np.ndarray,
    size_mm: np.ndarray,
    orientation_lps: np.ndarray,
    rgb01: tuple = (1.0, 1.0, 0.0),
    coordinate_system: str = "LPS",
    description: str = "",
) -> dict:
    """One Slicer markups ROI (``roiType`` Box) as written by ``vtkMRMLMarkupsROIJsonStorageNode``.

    ``orientation`` is stored as 9 numbers, row-major, of the matrix whose columns are the ROI axes; in
    RAS the x and y rows change sign (and so does the centre), as in Slicer's writer.
    """
    if coordinate_system not in ("LPS", "RAS"):
        raise ValueError("coordinate_system must be 'LPS' or 'RAS'")
    center = np.asarray(center_lps, dtype=np.float64)
    orient = np.asarray(orientation_lps, dtype=np.float64)
    if coordinate_system == "RAS":
        center = LPS_TO_RAS[:3, :3] @ center
        orient = LPS_TO_RAS[:3, :3] @ orient
    center_list = [round(float(v), 6) for v in center]
    orient_list = [round(float(v), 9) for v in orient.ravel()]
    color = [float(c) for c in rgb01]
    return {
        "type": "ROI",
        "coordinateSystem": coordinate_system,
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 1,
        "name": name,
        "roiType": "Box",
        "center": center_list,
        "orientation": orient_list,
        "size": [round(float(v), 6) for v in size_mm],
        "insideOut": False,
        "controlPoints": [
            {
                "id": "1",
                "label": name,
                "description": description,
                "associatedNodeID": "",
                "position": center_list,
                "orientation": orient_list,
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            }
        ],
        "measurements": [],
        "display": {
            "visibility": True,
            "opacity": 1.0,
            "color": color,
            "selectedColor": color,
            "propertiesLabelVisibility": True,
            "pointLabelsVisibility": False,
            "handlesInteractive": False,
        },
    }


def roi_markups_dict(
    mask: np.ndarray,
    volume: Volume,
    labels: Optional[list] = None,
    coordinate_system: str = "LPS",
) -> dict:
    """Slicer markups document with one ROI per 3-D connected object of each label of ``mask``.

    ``mask`` is ``(K, J, I)`` in the input array order of ``volume``.  Each ROI is the object's bounding
    box in the volume's IJK frame (outer voxel faces, so a one-voxel object has size = spacing); ROIs are
    named ``"<structure> <n>"`` with n = 1 for the largest object.
    """
    if tuple(mask.shape) != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume shape {volume.shape}")
    labels = _labels_for_mask(mask, labels if labels is not None else DEFAULT_LABELS)
    ijk_to_lps = volume.ijk_to_lps()
    orient = roi_orientation(volume)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    markups = []
    for lab in labels:
        structure = structure_for_label(lab)
        for n, (bbox, voxels) in enumerate(mask_components(mask, int(lab.get("value", 1))), start=1):
            (k0, k1), (j0, j1), (i0, i1) = bbox
            center_ijk = np.array([(i0 + i1) / 2.0, (j0 + j1) / 2.0, (k0 + k1) / 2.0])
            size = np.array([(i1 - i0 + 1), (j1 - j0 + 1), (k1 - k0 + 1)], dtype=np.float64) * volume.spacing
            markups.append(
                roi_markup(
                    f"{structure.name} {n}",
                    apply_affine(ijk_to_lps, center_ijk),
                    size,
                    orient,
                    structure.color,
                    coordinate_system,
                    description=f"{voxels} voxels, {voxels * voxel_ml:.2f} mL; "
                    f"IJK {i0}-{i1}, {j0}-{j1}, {k0}-{k1}",
                )
            )
    return {"@schema": MARKUPS_SCHEMA_URL, "markups": markups}


# --------------------------------------------------------------------------------------------------
# segmentation (.seg.nrrd via slicerio)
# --------------------------------------------------------------------------------------------------
def _reference_geometry_string(volume: Volume) -> str:
    """Slicer's serialised image geometry: IJKToRAS row-major then extent, ``;``-terminated."""
    m = volume.ijk_to_ras()
    values = [f"{float(v) + 0.0:.17g}" for v in m.ravel()]  # + 0.0 turns -0 into 0
    extent = []
    for n in volume.size_ijk:
        extent += ["0", str(int(n) - 1)]
    return ";".join(values + extent) + ";"


def segmentation_dict(result: SegmentationResult) -> dict:
    """``slicerio`` segmentation dict of the result (voxels are a view of ``result.mask``)."""
    vol: Volume = result.volume
    mask = np.asarray(result.mask)
    if mask.dtype != np.uint8:
        mask = mask.astype(np.uint8)
    labels = _labels_for_mask(mask, labels_from_card(result.model_card))
    size = vol.size_ijk
    full_extent = [0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1]
    segments = []
    model = _model_identity(result.model_card)
    for lab in labels:
        value = int(lab.get("value", 1))
        s = structure_for_label(lab)
        seg: dict[str, Any] = {
            "id": f"Segment_{value}",
            "name": s.name,
            "nameAutoGenerated": False,
            "color": [round(c, 6) for c in s.color],
            "colorAutoGenerated": False,
            "labelValue": value,
            "layer": 0,
            # Full extent (not the tight one): older Slicer versions crop every segment of a shared
            # layer to the extent of the first one.
            "extent": full_extent,
        }
        if s.terminology is not None:
            seg["terminology"] = s.terminology.to_slicerio()
        if model.get("name"):
            seg["tags"] = {"LSNet.Model": str(model["name"])}
        segments.append(seg)
    return {
        # slicerio expects voxels indexed [i, j, k]: a transposed view, no copy.
        "voxels": mask.transpose(2, 1, 0),
        "ijkToLPS": vol.ijk_to_lps(),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": [
            {
                "name": "Reference image geometry",
                "value": _reference_geometry_string(vol),
                "description": "Image geometry (IJK to RAS matrix and extent) of the CT this segmentation was "
                "computed on.",
            }
        ],
        "segments": segments,
    }


# --------------------------------------------------------------------------------------------------
# file writers (each writes one file at ``path``)
# --------------------------------------------------------------------------------------------------
_COMPRESSION = 1  # gzip level: masks and heatmaps are mostly zeros; level 1 is ~as small and much faster


def _write_seg_nrrd(result: SegmentationResult, path: Path) -> None:
    import slicerio

    slicerio.write_segmentation(str(path), segmentation_dict(result), compression_level=_COMPRESSION)


def _write_nifti(result: SegmentationResult, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(result.volume.to_sitk(np.asarray(result.mask, dtype=np.uint8)), str(path), useCompression=True)


def _write_heatmap(result: SegmentationResult, path: Path) -> None:
    import nrrd

    vol: Volume = result.volume
    heat = np.asarray(result.heatmap, dtype=np.float32)  # no copy when already float32
    header = {
        "type": "float",
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": (vol.direction @ np.diag(vol.spacing)).T,  # one row per i, j, k axis
        "space origin": np.array(vol.origin),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    nrrd.write(str(path), heat.transpose(2, 1, 0), header, compression_level=_COMPRESSION, index_order="F")


def _write_json(document: dict, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def _write_boxes(result: SegmentationResult, path: Path) -> None:
    _write_json(boxes_document(result), path)


def _write_markups(result: SegmentationResult, path: Path) -> None:
    _write_json(roi_markups_dict(result.mask, result.volume, labels_from_card(result.model_card)), path)


def _writer(key: str):
    # looked up at call time so that tests can substitute one writer
    return {
        "seg_nrrd": _write_seg_nrrd,
        "nifti": _write_nifti,
        "heatmap": _write_heatmap,
        "boxes_json": _write_boxes,
        "markups": _write_markups,
    }[key]


# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------
def output_paths(outdir, *, prefix: str = "", keys: Iterable[str] = tuple(FILE_NAMES)) -> dict:
    """``{key: Path}`` of the files :func:`write_outputs` would write for ``keys``."""
    out = Path(outdir).expanduser()
    return {k: out / f"{prefix}{FILE_NAMES[k]}" for k in keys}


def check_outputs_free(outdir, *, overwrite: bool = False, prefix: str = "", **flags) -> None:
    """Raise :class:`OutputError` if any file :func:`write_outputs` would write with these ``flags``
    (same keyword names and defaults) exists and ``overwrite`` is False.

    Front ends call it *before* a long computation so that a conflict is reported at once, not after
    minutes of segmentation.  ``write_outputs`` checks again (files may appear in between).
    """
    defaults = {"seg_nrrd": True, "nifti": False, "heatmap": True, "boxes_json": True, "markups": True}
    unknown = set(flags) - set(defaults)
    if unknown:
        raise TypeError(f"unknown output flags: {sorted(unknown)}")
    defaults.update(flags)
    out = Path(outdir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"Output folder {out} exists and is not a folder; choose another output folder.")
    if overwrite:
        return
    targets = output_paths(out, prefix=prefix, keys=[k for k, on in defaults.items() if on])
    conflicts = [str(p) for p in targets.values() if p.exists() or p.is_symlink()]
    if conflicts:
        raise OutputError(
            "Output file(s) already exist: "
            + ", ".join(conflicts)
            + ". Choose another output folder, or pass --overwrite to replace them."
        )


def _check_result(result: SegmentationResult) -> None:
    vol = result.volume
    if not isinstance(vol, Volume):
        raise TypeError("result.volume must be an lsnet.io.geometry.Volume")
    if tuple(np.shape(result.mask)) != vol.shape:
        raise ValueError(f"result.mask shape {np.shape(result.mask)} differs from the volume shape {vol.shape}")
    if result.heatmap is not None and tuple(np.shape(result.heatmap)) != vol.shape:
        raise ValueError(f"result.heatmap shape {np.shape(result.heatmap)} differs from the volume shape {vol.shape}")


def write_outputs(
    result: SegmentationResult,
    outdir,
    *,
    overwrite: bool = False,
    seg_nrrd: bool = True,
    nifti: bool = False,
    heatmap: bool = True,
    boxes_json: bool = True,
    markups: bool = True,
    prefix: str = "",
) -> dict:
    """Write the selected files for ``result`` into ``outdir`` (created if missing).

    Returns ``{key: Path}`` of the files written, keys among ``seg_nrrd``, ``nifti``, ``heatmap``,
    ``boxes_json``, ``markups``.  ``heatmap`` is skipped when ``result.heatmap`` is None and ``markups``
    when the mask is empty (there is no object to box).

    Raises :class:`OutputError` -- before writing anything -- when a target exists and ``overwrite`` is
    False, or when ``outdir`` cannot be created/written; no partial file is left behind on failure.
    """
    _check_result(result)
    if any(sep in prefix for sep in ("/", "\\")):
        raise OutputError(f"prefix {prefix!r} must be a file-name prefix without folder separators.")
    wanted = {"seg_nrrd": seg_nrrd, "nifti": nifti, "heatmap": heatmap, "boxes_json": boxes_json, "markups": markups}
    if heatmap and result.heatmap is None:
        logger.info("no heatmap in the result; %sheatmap.nrrd is not written", prefix)
        wanted["heatmap"] = False
    if markups and not np.any(result.mask):
        logger.info("empty mask: no object to box, %srois.mrk.json is not written", prefix)
        wanted["markups"] = False
    targets = output_paths(outdir, prefix=prefix, keys=[k for k, on in wanted.items() if on])

    out = Path(outdir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"Output folder {out} exists and is not a folder; choose another output folder.")
    conflicts = [str(p) for p in targets.values() if p.exists() or p.is_symlink()]
    if conflicts and not overwrite:
        raise OutputError(
            "Output file(s) already exist, nothing was written: "
            + ", ".join(conflicts)
            + ". Choose another output folder or prefix, or allow overwriting (overwrite=True, --overwrite)."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"Cannot create output folder {out}: {e.strerror or e}. Choose a writable folder.") from e

    token = uuid.uuid4().hex[:12]
    temps = {k: p.with_name(f".lsnet-tmp-{token}-{p.name}") for k, p in targets.items()}
    try:
        for key, tmp in temps.items():
            _writer(key)(result, tmp)
            if not tmp.is_file():
                raise OutputError(f"writing {targets[key].name} produced no file")
        for key, tmp in temps.items():
            os.replace(tmp, targets[key])
    except BaseException as e:
        for tmp in temps.values():
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError:  # pragma: no cover - best effort
                logger.warning("could not remove temporary file %s", tmp)
        if isinstance(e, OSError):
            raise OutputError(
                f"Could not write the outputs to {out}: {e.strerror or e}. Check that the folder is writable "
                "and that the disk is not full; nothing was written."
            ) from e
        raise
    for key, path in targets.items():
        logger.info("wrote %s", path)
    return targets
