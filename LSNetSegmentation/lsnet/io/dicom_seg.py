"""DICOM Segmentation (SEG) output with highdicom, referencing the source CT series.

One SEG instance (BINARY, one segment per model label, frames only where the mask is non-empty) is
built from a :class:`~lsnet.results.SegmentationResult` and the DICOM files it was computed from.  Every
frame copies the geometry of its source slice (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing) and references that slice's SOP Instance UID, so the SEG overlays the CT exactly in any
DICOM viewer -- also for a gantry-tilted series, where the volume grid of SimpleITK is only approximate.

Mapping mask slices to source files: each file's ImagePositionPatient is converted to an index of the
result's volume (``Volume.lps_to_ijk``); it must land on an integer slice k (within 0.1 slice) and on
the in-plane origin (within 0.1 pixel, relaxed to the slice normal only for tilted series).  Any
mismatch is an :class:`OutputError` -- a SEG that points at the wrong slice is worse than none.

Needs the optional dependencies ``highdicom`` and ``pydicom`` (``pip install lsnet-segmentation[dicom]``).
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from lsnet._version import __version__
from lsnet.errors import InputError, OutputError
from lsnet.io.dicom_info import series_files
from lsnet.io.outputs import labels_from_card, write_outputs
from lsnet.io.terminology import ANATOMICAL_STRUCTURE, Code, structure_for_label
from lsnet.results import SegmentationResult, present_labels

logger = logging.getLogger(__name__)

FILE_NAME = "segmentation.dcm"
SERIES_NUMBER = 4242
MANUFACTURER = "LSNetSegmentation"
MODEL_NAME = "L-SNet"


def _require_highdicom():
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError as e:
        raise OutputError(
            "DICOM SEG output needs the packages highdicom and pydicom: pip install 'lsnet-segmentation[dicom]' "
            "(or pip install highdicom pydicom)."
        ) from e


def read_source_datasets(source) -> list:
    """pydicom datasets (headers only) of the DICOM series ``read_volume(source)`` reads.

    ``source`` is a folder / file path (the series is picked exactly as :func:`lsnet.io.volume.read_volume`
    picks it) or a sequence of file paths.
    """
    _require_highdicom()
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = [str(f) for f in source] if isinstance(source, (list, tuple)) else series_files(source)
    out = []
    for f in files:
        try:
            out.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise InputError(f"{f} is not a readable DICOM file ({e}).") from e
    return out


def _coded(code) -> "object":
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def segment_descriptions(labels: Sequence[dict], model_name: str) -> list:
    """highdicom SegmentDescriptions, numbered 1..n in the order of ``labels`` (the model card's)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(
        name=f"LSNet {model_name}"[:64], family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    out = []
    for number, lab in enumerate(labels, start=1):
        s = structure_for_label(lab)
        if s.terminology is not None:
            category, prop = s.terminology.category, s.terminology.type
        else:  # an unknown label without a code: generic "Tissue"
            category, prop = ANATOMICAL_STRUCTURE, Code("SCT", "85756007", "Tissue")
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=s.name[:64],
                segmented_property_category=_coded(category),
                segmented_property_type=_coded(prop),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
                display_color=hd.color.CIELabColor.from_rgb(*[int(c) for c in s.rgb]),
            )
        )
    return out


def _slice_index_of(datasets: list, result: SegmentationResult) -> list:
    """Volume slice index k (input array order) of every source dataset; OutputError when one does not fit.

    Slices are ranked by their position along the volume's k axis; the first must sit on voxel
    (0, 0, 0) and, for an untilted series, slice r on k = r (within 0.1 slice).  A gantry-tilted series
    (in-plane drift of the slice origins) is matched by rank only: SimpleITK's grid is un-sheared.
    """
    vol = result.volume
    lps_to_ijk = vol.lps_to_ijk()
    k_n, j_n, i_n = vol.shape
    if len(datasets) != k_n:
        raise OutputError(
            f"The source DICOM series has {len(datasets)} slices but the segmented volume has {k_n}; the DICOM SEG "
            "can only be written for the series that was segmented."
        )
    ijk = []
    for ds in datasets:
        try:
            ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError) as e:
            raise OutputError(
                f"Source DICOM {getattr(ds, 'SOPInstanceUID', '?')} has no usable ImagePositionPatient/Rows/Columns; "
                "cannot write a DICOM SEG for it."
            ) from e
        if (rows, cols) != (j_n, i_n):
            raise OutputError(
                f"Source DICOM slices are {rows} x {cols} pixels but the segmented volume has slices of {j_n} x {i_n}; "
                "the DICOM SEG can only be written for the series that was segmented."
            )
        ijk.append(lps_to_ijk[:3, :3] @ ipp + lps_to_ijk[:3, 3])
    ijk = np.array(ijk)
    order = np.argsort(ijk[:, 2], kind="stable")
    ks = np.empty(len(datasets), dtype=int)
    ks[order] = np.arange(len(datasets))
    first = ijk[order[0]]
    tilted = np.abs(ijk[:, :2]).max() > 0.1
    if np.abs(first).max() > 0.1 or (not tilted and np.abs(ijk[:, 2] - ks).max() > 0.1) or len(set(np.round(ijk[:, 2], 3))) != k_n:
        raise OutputError(
            "The source DICOM slice positions do not match the segmented volume (another series, or duplicate/missing "
            "slices); cannot write a consistent DICOM SEG."
        )
    if tilted:
        logger.info("DICOM SEG: slice origins drift in-plane (gantry tilt); frames matched to slices by position order")
    return ks.tolist()


_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _repair_headers(datasets: list, slice_spacing: float) -> None:
    """Fix, on our in-memory copies only, two gaps of real-world series that highdicom rejects.

    * An empty SpecificCharacterSet means the default repertoire: the element is removed.
    * A series without FrameOfReferenceUID (required for CT; e.g. 3D-IRCADb exports) gets one derived
      deterministically from its Study/Series Instance UIDs, with a warning, so that the SEG still
      carries a frame of reference; the slices themselves are referenced by SOP Instance UID.
    * Missing Type 2 patient/study attributes that highdicom copies (PatientBirthDate, StudyID, ...) are
      added empty, as DICOM allows for Type 2.
    * An empty SliceThickness (e.g. the TCIA Pancreas-CT export) becomes the slice spacing computed from
      the positions: the SEG's Pixel Measures need a thickness.
    """
    from pydicom.uid import generate_uid

    for ds in datasets:
        if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet or "").strip():
            del ds.SpecificCharacterSet
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if getattr(ds, "SliceThickness", None) in (None, ""):
            ds.SliceThickness = f"{slice_spacing:.6g}"
    present = {str(ds.FrameOfReferenceUID) for ds in datasets if str(getattr(ds, "FrameOfReferenceUID", "") or "")}
    if len(present) > 1:
        raise OutputError("The source DICOM slices have different FrameOfReferenceUIDs; they are not one series.")
    if len(present) == 1 and all(str(getattr(ds, "FrameOfReferenceUID", "") or "") for ds in datasets):
        return
    if present:
        uid = present.pop()
    else:
        first = datasets[0]
        uid = generate_uid(entropy_srcs=["lsnet-frame-of-reference", str(getattr(first, "StudyInstanceUID", "")),
                                         str(getattr(first, "SeriesInstanceUID", ""))])
        logger.warning(
            "the source DICOM series has no FrameOfReferenceUID (required for CT); the DICOM SEG uses %s, derived from "
            "the series UID. Its frames reference the CT slices by SOP Instance UID.", uid,
        )
    for ds in datasets:
        ds.FrameOfReferenceUID = uid


def build_segmentation(result: SegmentationResult, source, *, content_label: str = "LSNET") -> "object":
    """The ``highdicom.seg.Segmentation`` of ``result`` referencing the DICOM series ``source``
    (folder, file or list of files; see :func:`read_source_datasets`).  Nothing is written.

    Raises :class:`OutputError` for a multi-frame source, a result that is not of this series, or
    missing packages.
    """
    _require_highdicom()
    import highdicom as hd

    datasets = read_source_datasets(source)
    if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
        raise OutputError(
            "DICOM SEG output is not supported for a multi-frame (enhanced) source image; the .seg.nrrd output "
            "was computed normally. Convert the series to single-frame DICOM to get a SEG."
        )
    ks = _slice_index_of(datasets, result)
    mask = np.asarray(result.mask)
    labels = labels_from_card(result.model_card)
    values = [int(lab.get("value", 1)) for lab in labels]
    present = set(present_labels(mask))
    unknown = sorted(present - set(values))
    if unknown:  # values the card does not list: still exported, as generic segments
        labels = labels + [{"value": v, "name": f"Label {v}"} for v in unknown]
        values += unknown
    lut = np.zeros(256, dtype=np.uint8)
    for number, v in enumerate(values, start=1):
        lut[v] = number
    # frames in the order of the source datasets: frame n <-> datasets[n]
    frames = lut[mask[ks]]
    model_name = str((result.model_card or {}).get("name") or "model")
    _repair_headers(datasets, float(result.volume.spacing[2]))
    try:
        with warnings.catch_warnings():
            # highdicom warns about odd source values (e.g. one-component patient names); they are copied as is
            warnings.simplefilter("ignore", UserWarning)
            return _segmentation(hd, datasets, frames, labels, model_name, content_label, bool(mask.any()))
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise OutputError(
            f"Could not build a DICOM SEG for this series ({type(e).__name__}: {e}); nothing was written. Run without "
            "--dicom-seg to get the other outputs."
        ) from e


def _segmentation(hd, datasets, frames, labels, model_name, content_label, nonempty):
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(labels, model_name),
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=__version__,
        device_serial_number="0",
        content_description=f"L-SNet automatic segmentation ({model_name})"[:64],
        content_creator_name="LSNet^Automatic",
        content_label=content_label,
        omit_empty_frames=nonempty,  # an empty result keeps its (empty) frames: a valid, empty SEG
    )


def save_atomic(dataset, path: Path, *, overwrite: bool = False) -> Path:
    """Write ``dataset`` to ``path`` via a temporary name and ``os.replace``; no partial file on failure."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{path} exists; nothing was written. Choose another folder or pass --overwrite.")
    tmp = path.with_name(f".lsnet-tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_as(str(tmp), enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"Could not write {path}: {e.strerror or e}. Check the folder is writable.") from e
        raise
    return path


def write_dicom_seg(result: SegmentationResult, source, path, *, overwrite: bool = False) -> Path:
    """Build (:func:`build_segmentation`) and write the DICOM SEG of ``result`` to ``path`` (atomic)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if (path.exists() or path.is_symlink()) and not overwrite:  # before the (slow) build
        raise OutputError(f"{path} exists; nothing was written. Choose another folder or pass --overwrite.")
    return save_atomic(build_segmentation(result, source), path, overwrite=overwrite)


def read_segmentation(path) -> "object":
    """Read a DICOM SEG with highdicom (for tests and checks)."""
    _require_highdicom()
    import highdicom as hd

    return hd.seg.segread(str(path))


def describe_frames(seg) -> list:
    """``[(referenced SOP UID, segment number, IPP (3,), IOP (6,), pixel spacing (2,), mask (R, C) bool)]``
    of every frame of a SEG dataset, sorted by (segment, position along the normal).  Geometry from the
    per-frame or shared functional groups, whichever holds it."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    out = []
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):

        def group(name):
            return getattr(frame, name, None) or getattr(shared, name)

        ipp = np.array([float(v) for v in group("PlanePositionSequence")[0].ImagePositionPatient])
        iop = np.array([float(v) for v in group("PlaneOrientationSequence")[0].ImageOrientationPatient])
        spacing = np.array([float(v) for v in group("PixelMeasuresSequence")[0].PixelSpacing])
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(group("SegmentIdentificationSequence")[0].ReferencedSegmentNumber)
        out.append((str(ref), number, ipp, iop, spacing, np.asarray(pixels[n]) > 0))
    normal = np.cross(out[0][3][:3], out[0][3][3:]) if out else np.zeros(3)
    out.sort(key=lambda f: (f[1], float(f[2] @ normal)))
    return out


def dicom_seg_path(outdir, prefix: str = "") -> Path:
    return Path(outdir).expanduser() / f"{prefix}{FILE_NAME}"


def write_outputs_with_seg(result: SegmentationResult, source, outdir, *, overwrite: bool = False, prefix: str = "",
                           **output_kwargs) -> dict:
    """:func:`lsnet.io.outputs.write_outputs` plus ``segmentation.dcm``, all or nothing.

    The SEG is built and written to a temporary name first; then the other outputs are written (they are
    atomic themselves); the SEG is renamed into place last.  Returns write_outputs' ``{key: Path}`` plus
    ``"dicom_seg"``.
    """
    path = dicom_seg_path(outdir, prefix)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{path} exists; nothing was written. Choose another folder or pass --overwrite.")
    dataset = build_segmentation(result, source)
    tmp = path.with_name(f".lsnet-tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            dataset.save_as(str(tmp), enforce_file_format=True)
        except OSError as e:
            raise OutputError(f"Could not write {path}: {e.strerror or e}. Check the folder is writable.") from e
        written = write_outputs(result, outdir, overwrite=overwrite, prefix=prefix, **output_kwargs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    written["dicom_seg"] = path
    return written
