"""Is this input plausible CT?  DICOM series facts (modality, gantry tilt, multi-frame, orientation),
the HU range and the field of view -- checked before segmenting.

Reads headers only (``pydicom``, ``stop_before_pixels``), for the *same* files ``lsnet.io.volume.read_volume``
picks (the largest series of a folder), so the checks describe exactly what is segmented.

Policies:

* **Modality.** L-SNet is trained on CT in Hounsfield units.  A series whose Modality is not ``CT``
  (MR, PT, US, ...) is refused with an :class:`InputError` unless the caller allows it
  (``allow_non_ct=True``, ``lsnet segment --allow-non-ct``); then it runs with a warning that the
  result is meaningless outside CT.  A series without a Modality tag runs with a warning.
* **Gantry tilt** (slice positions sheared against the slice normal, or GantryDetectorTilt != 0):
  L-SNet segments the *acquired* slices (each one is a true image of the patient), so the per-slice
  result is valid.  SimpleITK builds an un-sheared grid from the first slice, so the NRRD/NIfTI outputs
  are displaced in-plane by up to :attr:`DicomSeriesInfo.tilt_shift_mm` at the far end; a warning says
  so.  The DICOM SEG output (``--dicom-seg``) references every acquired slice by its own
  ImagePositionPatient and is exact.
* **Orientation**: an ImageOrientationPatient whose row and column cosines are not orthonormal is a
  corrupt header (SimpleITK would silently replace it by the identity): :class:`InputError`.
* **Field of view**: an in-plane extent above :data:`MAX_FOV_MM` is no CT (the spacing is in the wrong
  unit, e.g. cm read as mm x 10 or m); it is refused before the network would try to resample a
  slice to tens of thousands of pixels (:func:`check_field_of_view`).
* **Not DICOM**: NIfTI/NRRD carry no modality; :func:`check_hu_range` warns when a volume has no air
  (nothing below -500 HU), i.e. is probably not CT in HU.
* **Multi-frame** (one file holding all slices): read as one volume when SimpleITK can; DICOM SEG
  output is refused for it (:func:`lsnet.io.dicom_seg.build_segmentation` says why).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lsnet.errors import InputError
from lsnet.io.geometry import to_canonical
from lsnet.io.volume import _dicom_files_for, _looks_like_dicom

logger = logging.getLogger(__name__)

MAX_FOV_MM = 1500.0
"""Largest plausible in-plane field of view of a CT slice (scanners reconstruct at most ~700 mm)."""

TILT_TOLERANCE_DEG = 0.5
"""Shear between consecutive slice positions and the slice normal above which a series counts as tilted."""


@dataclass
class DicomSeriesInfo:
    """Header facts of one DICOM series (the one :func:`lsnet.io.volume.read_volume` reads)."""

    files: list
    modality: str = ""
    series_uid: str = ""
    series_description: str = ""
    multiframe: bool = False
    number_of_frames: int = 1
    tilt_deg: float = 0.0
    tilt_shift_mm: float = 0.0
    warnings: list = field(default_factory=list)

    @property
    def is_ct(self) -> bool:
        return self.modality.upper() == "CT"

    @property
    def tilted(self) -> bool:
        return self.tilt_deg > TILT_TOLERANCE_DEG


def is_dicom_input(path) -> bool:
    """True for a folder (DICOM series are searched there) or a ``.dcm``/``.ima``/DICM-magic file."""
    p = Path(path)
    if p.is_dir():
        return True
    return p.is_file() and (p.suffix.lower() in (".dcm", ".ima") or _looks_like_dicom(p))


def series_files(path) -> list:
    """Files of the DICOM series ``read_volume(path)`` reads (largest series of a folder), sorted as
    SimpleITK/GDCM sorts them.  Raises :class:`InputError` when there is none."""
    volume_log = logging.getLogger(_dicom_files_for.__module__)
    quiet = _DropWarnings()
    volume_log.addFilter(quiet)  # read_volume says "several series, reading the largest" itself: once is enough
    try:
        files, _description = _dicom_files_for(Path(path))
    finally:
        volume_log.removeFilter(quiet)
    return [str(f) for f in files]


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _read_headers(files: list) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    out = []
    for f in files:
        try:
            out.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{f} is not a readable DICOM file ({e}); remove it from the series folder.") from e
    return out


def _floats(ds, keyword: str, n: int) -> Optional[np.ndarray]:
    try:
        v = getattr(ds, keyword, None)
        if v is None:
            return None
        a = np.array([float(x) for x in v], dtype=np.float64)
        return a if a.shape == (n,) and np.all(np.isfinite(a)) else None
    except (TypeError, ValueError):
        return None


def _tilt(headers: list) -> tuple:
    """``(tilt angle in degrees, in-plane shift in mm at the last slice)`` from the slice positions."""
    iop = _floats(headers[0], "ImageOrientationPatient", 6)
    pos = [_floats(h, "ImagePositionPatient", 3) for h in headers]
    tilt_tag = 0.0
    try:
        tilt_tag = abs(float(getattr(headers[0], "GantryDetectorTilt", 0.0) or 0.0))
    except (TypeError, ValueError):
        pass
    if iop is None or any(p is None for p in pos) or len(pos) < 2:
        return tilt_tag, 0.0
    normal = np.cross(iop[:3], iop[3:])
    if np.linalg.norm(normal) < 1e-6:
        return tilt_tag, 0.0
    normal /= np.linalg.norm(normal)
    p = np.array(pos)
    p = p[np.argsort(p @ normal)]
    along = (p[-1] - p[0]) @ normal
    if abs(along) < 1e-6:
        return tilt_tag, 0.0
    shift = p[-1] - p[0] - along * normal  # in-plane drift of the slice origins over the series
    angle = math.degrees(math.atan2(float(np.linalg.norm(shift)), abs(float(along))))
    return max(angle, tilt_tag), float(np.linalg.norm(shift))


def inspect_series(files: list) -> DicomSeriesInfo:
    """Header facts and warnings of a DICOM series given as its files (see the module docstring)."""
    if not files:
        raise InputError("The DICOM series has no files.")
    headers = _read_headers(files)
    h0 = headers[0]
    info = DicomSeriesInfo(
        files=list(files),
        modality=str(getattr(h0, "Modality", "") or "").strip(),
        series_uid=str(getattr(h0, "SeriesInstanceUID", "") or ""),
        series_description=str(getattr(h0, "SeriesDescription", "") or ""),
    )
    try:
        info.number_of_frames = int(getattr(h0, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        info.number_of_frames = 1
    info.multiframe = len(files) == 1 and info.number_of_frames > 1
    iop = _floats(h0, "ImageOrientationPatient", 6)
    if iop is not None:
        r, c = iop[:3], iop[3:]
        if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(float(r @ c)) > 1e-2:
            raise InputError(
                f"The DICOM series has an invalid ImageOrientationPatient {iop.round(4).tolist()} (row and column "
                f"directions must be orthogonal unit vectors; their dot product is {float(r @ c):.3f}). The header "
                "is corrupt: re-export the series from the scanner or PACS."
            )
    if not info.multiframe:
        info.tilt_deg, info.tilt_shift_mm = _tilt(headers)
    if not info.modality:
        info.warnings.append(
            "the DICOM series has no Modality tag; assuming CT in Hounsfield units. Check the result."
        )
    if info.tilted:
        info.warnings.append(
            f"the CT was acquired with gantry tilt ({info.tilt_deg:.1f} degrees): L-SNet segments the acquired "
            f"(tilted) slices. The .seg.nrrd/.nii.gz outputs use the un-sheared grid of the first slice, so slices "
            f"far from it are displaced in-plane by up to {info.tilt_shift_mm:.1f} mm; --dicom-seg output "
            "references every acquired slice exactly. Resample the CT (e.g. Slicer's acquisition transform) for "
            "exact 3-D geometry."
        )
    return info


def check_series(path, allow_non_ct: bool = False) -> Optional[DicomSeriesInfo]:
    """Inspect the DICOM series ``read_volume(path)`` would read; ``None`` when ``path`` is not DICOM.

    Logs the warnings of :func:`inspect_series`; raises :class:`InputError` for a non-CT modality
    unless ``allow_non_ct`` (then it warns).
    """
    if not is_dicom_input(path):
        return None
    try:
        import pydicom  # noqa: F401
    except ImportError:
        logger.warning(
            "pydicom is not installed: the DICOM checks (modality, gantry tilt, orientation) are skipped. "
            "pip install pydicom (or lsnet-segmentation[dicom]) to enable them."
        )
        return None
    info = inspect_series(series_files(path))
    if info.modality and not info.is_ct:
        msg = (
            f"the DICOM series is {info.modality}, not CT. L-SNet was trained on CT in Hounsfield units; on "
            f"{info.modality} images its output is meaningless."
        )
        if not allow_non_ct:
            raise InputError(msg[0].upper() + msg[1:] + " Give a CT series, or pass --allow-non-ct "
                             "(allow_non_ct=True) to run anyway for research.")
        info.warnings.append(msg + " Running anyway because non-CT input was allowed.")
    for w in info.warnings:
        logger.warning("%s", w)
    return info


def check_hu_range(volume, source: str = "the volume") -> Optional[str]:
    """Warn when a non-DICOM volume does not look like CT in HU (no air below -500 HU); returns the
    warning text or None.  Heuristic only: an abdominal CT always contains air around the body."""
    arr = volume.array
    lo = min(float(arr[k].min()) for k in range(0, arr.shape[0], max(1, arr.shape[0] // 16)))
    if lo > -500:
        msg = (
            f"{source} has no voxel below -500 HU (minimum sampled {lo:g}): it may not be a CT in Hounsfield "
            "units (MR? already windowed or rescaled?). L-SNet expects HU; check the result."
        )
        logger.warning("%s", msg)
        return msg
    return None


def check_field_of_view(volume, source: str = "the volume") -> None:
    """Refuse an in-plane field of view above :data:`MAX_FOV_MM` (see the module docstring)."""
    can, _ = to_canonical(volume)
    fov = [can.array.shape[2] * can.spacing[0], can.array.shape[1] * can.spacing[1]]
    if max(fov) > MAX_FOV_MM:
        raise InputError(
            f"{source} has an in-plane field of view of {fov[0]:.0f} x {fov[1]:.0f} mm (spacing "
            f"{can.spacing[0]:g} x {can.spacing[1]:g} mm); a CT slice covers at most ~700 mm. The voxel spacing in "
            "the header is probably in the wrong unit: fix it (e.g. in 3D Slicer's Volumes module) and retry."
        )
