"""Reading CT volumes and label images into :class:`lsnet.io.geometry.Volume` (SimpleITK).

Supported inputs: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``), any other 3-D format SimpleITK reads, and DICOM series (a folder, a folder tree such as a TCIA
download, or one ``.dcm`` file of the series).  Values are kept as stored after the DICOM rescale (HU
for CT); integer types stay as read, floating point becomes ``float32``.  Every problem a user can cause
raises :class:`lsnet.errors.InputError` with a message that says what to do.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lsnet.errors import InputError
from lsnet.io.geometry import Volume

__all__ = ["Volume", "read_volume", "read_label", "volume_from_array", "check_volume"]

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series "
    "(a folder, or one of its .dcm files)"
)

_NAN_CHUNK = 32  # slices per chunk when counting non-finite voxels (bounded temporary memory)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _count_non_finite(array: np.ndarray) -> int:
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    bad = 0
    for start in range(0, array.shape[0], _NAN_CHUNK):
        chunk = array[start : start + _NAN_CHUNK]
        bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
    return bad


def check_volume(volume: Volume, source: str = "the volume") -> Volume:
    """Validate a volume for segmentation; returns it with ``float64`` converted to ``float32``.

    Raises :class:`InputError` for empty volumes, non-scalar or non-numeric voxels, NaN/Inf values and
    non-positive spacing.  A 1-slice volume (``K == 1``) is valid.
    """
    arr = volume.array
    if arr.ndim != 3:
        raise InputError(f"{source} has {arr.ndim} dimensions; a 3-D volume (K, J, I) is needed.")
    if 0 in arr.shape:
        raise InputError(
            f"{source} is empty (size {arr.shape[2]} x {arr.shape[1]} x {arr.shape[0]} voxels, i x j x k): "
            "give a volume with at least one voxel along every axis."
        )
    if arr.dtype.kind not in "biuf":
        raise InputError(
            f"{source} has voxels of type {arr.dtype}, not real scalar numbers; convert it to a "
            "grayscale (scalar) image first."
        )
    if arr.dtype == np.float64 or arr.dtype == np.float16:
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float32)
        volume = volume.with_array(arr)
    bad = _count_non_finite(arr)
    if bad:
        raise InputError(
            f"{source} contains {bad} NaN or infinite voxel value(s) out of {arr.size}; replace them "
            "(e.g. with the minimum HU, -1024) before segmenting."
        )
    if not all(s > 0 and np.isfinite(s) for s in volume.spacing):
        raise InputError(f"{source} has an invalid voxel spacing {volume.spacing}; fix the image header.")
    if not np.all(np.isfinite(volume.direction)) or abs(np.linalg.det(volume.direction)) < 1e-6:
        raise InputError(f"{source} has an invalid (singular) direction matrix; fix the image header.")
    return volume


def volume_from_array(
    array: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Optional[np.ndarray] = None,
) -> Volume:
    """Wrap a numpy ``(K, J, I)`` array as a validated :class:`Volume` (no copy unless float64).

    ``spacing`` / ``origin`` are in i, j, k order and LPS mm; ``direction`` defaults to the identity
    (i -> Left, j -> Posterior, k -> Superior, i.e. already canonical).
    """
    arr = np.asarray(array)
    if arr.ndim == 2:
        raise InputError(
            f"got a 2-D array {arr.shape}; L-SNet needs a 3-D volume (K, J, I). For one slice use array[None]."
        )
    if arr.ndim != 3:
        raise InputError(f"got a {arr.ndim}-D array {arr.shape}; L-SNet needs a 3-D volume (K, J, I).")
    vol = Volume(arr, spacing, origin, np.eye(3) if direction is None else direction)
    return check_volume(vol, "the array")


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------
def _dicom_series_in(folder: Path) -> list:
    """``[(folder, series_uid, files)]`` of the DICOM series directly inside ``folder``."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    found = []
    try:
        uids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        return found
    for uid in uids:
        files = reader.GetGDCMSeriesFileNames(str(folder), uid)
        if files:
            found.append((folder, uid, list(files)))
    return found


def _find_dicom_series(folder: Path) -> list:
    """Series in ``folder``; if there are none, in its sub-folders (e.g. a TCIA patient folder)."""
    import SimpleITK as sitk

    # GDCM prints "No Series were found" for every folder without DICOM; silence it while searching.
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series = _dicom_series_in(folder)
        if series:
            return series
        for root, dirs, _files in os.walk(folder):
            dirs.sort()
            if Path(root) != folder:
                series.extend(_dicom_series_in(Path(root)))
        return series
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _dicom_files_for(path: Path) -> tuple:
    """Pick the DICOM series for a folder or a single ``.dcm`` file; returns ``(files, description)``."""
    import SimpleITK as sitk

    if path.is_file():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            uid = reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else ""
        except RuntimeError:
            uid = ""
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), uid)) if uid else []
        if str(path) not in files and os.path.abspath(path) not in [os.path.abspath(f) for f in files]:
            files = [str(path)]
        return files, f"series {uid or '(unknown UID)'} in {path.parent}"

    series = _find_dicom_series(path)
    if not series:
        raise InputError(
            f"No DICOM series found in folder {path} (nor in its sub-folders). Give a folder that holds "
            f"the .dcm files of one CT series, or a file in one of: {SUPPORTED_FORMATS}."
        )
    series.sort(key=lambda s: len(s[2]), reverse=True)
    folder, uid, files = series[0]
    if len(series) > 1:
        others = ", ".join(f"{u} ({len(f)} files, {d})" for d, u, f in series[1:6])
        logger.warning(
            "%s holds %d DICOM series; reading series %s in %s (%d files, the most), ignoring: %s. "
            "To read another one, pass its own folder or one of its files.",
            path, len(series), uid, folder, len(files), others,
        )
    return files, f"series {uid} in {folder}"


# --------------------------------------------------------------------------------------------------
# generic SimpleITK reading with checks
# --------------------------------------------------------------------------------------------------
def _header_of(obj) -> tuple:
    """``(dimension, size, components, pixel type name)`` of an ImageFileReader (after
    ``ReadImageInformation``) or of an Image."""
    import SimpleITK as sitk

    if isinstance(obj, sitk.Image):
        return (
            obj.GetDimension(),
            tuple(obj.GetSize()),
            obj.GetNumberOfComponentsPerPixel(),
            obj.GetPixelIDTypeAsString(),
        )
    return (
        obj.GetDimension(),
        tuple(obj.GetSize()),
        obj.GetNumberOfComponents(),
        sitk.GetPixelIDValueAsString(obj.GetPixelID()),
    )


def _check_header(header: tuple, path: Path) -> None:
    """Checks that need only the header (done before the voxels are loaded where possible)."""
    dim, size, ncomp, pixel = header
    dims_text = " x ".join(str(s) for s in size)
    if "complex" in pixel.lower():
        raise InputError(f"{path} has complex-valued voxels ({pixel}); L-SNet needs a real scalar CT volume.")
    if ncomp != 1:
        raise InputError(
            f"{path} has {ncomp} components per voxel ({pixel}, e.g. RGB or a vector field); L-SNet needs "
            "one grayscale value per voxel. Extract one channel first (e.g. SimpleITK "
            "VectorIndexSelectionCast) or convert the image to grayscale."
        )
    if dim == 2:
        raise InputError(
            f"{path} is a 2-D image ({dims_text}); L-SNet needs a 3-D CT volume. Save the slice as a 3-D "
            "volume with one slice (size W x H x 1) or give the whole series."
        )
    if dim > 3:
        extra = size[3:]
        if all(s == 1 for s in extra):
            return  # trailing singleton dimensions (e.g. NIfTI with nt = 1) are dropped after reading
        raise InputError(
            f"{path} is a {dim}-D image ({dims_text}): {' x '.join(str(s) for s in extra)} frames/volumes "
            "beyond the 3 spatial axes. L-SNet segments one 3-D volume: extract one frame first (e.g. "
            "SimpleITK image[:, :, :, t] or Slicer's Sequences module) and segment it."
        )
    if dim < 2:
        raise InputError(f"{path} is a {dim}-D image; L-SNet needs a 3-D CT volume.")
    if 0 in size:
        raise InputError(f"{path} is empty (size {dims_text}); give a volume with voxels along every axis.")


def _read_sitk(path: Path):
    """Read ``path`` (file or DICOM folder) as a 3-D scalar SimpleITK image, with header checks."""
    import SimpleITK as sitk

    if not path.exists():
        raise InputError(
            f"Input not found: {path}. Check the path; expected a file in {SUPPORTED_FORMATS}."
        )
    is_dicom_file = path.is_file() and (path.suffix.lower() in (".dcm", ".ima") or _looks_like_dicom(path))
    if path.is_dir() or is_dicom_file:
        files, description = _dicom_files_for(path)
        if len(files) == 1:
            path = Path(files[0])  # one file: may be a multi-frame (enhanced) DICOM
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            try:
                image = reader.Execute()
            except RuntimeError as e:
                raise InputError(f"Could not read the DICOM {description}: {_first_line(e)}") from e
            logger.info("read DICOM %s (%d files)", description, len(files))
            _check_header(_header_of(image), path)
            return image

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(
            f"{path} is not an image SimpleITK can read ({_first_line(e)}). Expected {SUPPORTED_FORMATS}."
        ) from e
    _check_header(_header_of(reader), path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)  # ITK's NIfTI reader fills a short file with garbage instead of failing
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"Could not read the voxels of {path}: {_first_line(e)} (truncated or corrupt file?)") from e
    if image.GetDimension() > 3:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0] * (len(size) - 3), [0] * len(size))
    _check_header(_header_of(image), path)
    return image


def _nifti_expected_bytes(header: bytes) -> Optional[int]:
    """``vox_offset + voxel bytes`` of a single-file NIfTI-1/-2 header, or None when it cannot be parsed.

    NIfTI-2 is told by its magic string (``n+2`` at byte 4); every other header of >= 348 bytes is read
    with the NIfTI-1 layout, ``n+1`` at byte 344 or not: without that magic ITK reads the file as
    Analyze 7.5, whose dim, bitpix and vox_offset fields lie at the same bytes.  ITK ignores a damaged
    ``sizeof_hdr``, and so does this; the byte order is told by ``dim[0]`` lying in 1..7."""
    if len(header) >= 540 and header[4:8] == b"n+2\0":
        order = "<" if 1 <= struct.unpack("<q", header[16:24])[0] <= 7 else ">"
        bitpix = struct.unpack(order + "h", header[14:16])[0]
        dims = struct.unpack(order + "8q", header[16:80])
        offset = struct.unpack(order + "q", header[168:176])[0]
    elif len(header) >= 348:
        order = "<" if 1 <= struct.unpack("<h", header[40:42])[0] <= 7 else ">"
        dims = struct.unpack(order + "8h", header[40:56])
        bitpix = struct.unpack(order + "h", header[72:74])[0]
        offset = struct.unpack(order + "f", header[108:112])[0]
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : ndim + 1]) or not np.isfinite(offset):
        return None
    return max(int(offset), 0) + int(np.prod([int(d) for d in dims[1 : ndim + 1]], dtype=object)) * bitpix // 8


def _check_nifti_complete(path: Path) -> None:
    """Raise :class:`InputError` when a (gzipped) NIfTI file holds fewer bytes than its header promises.

    A ``.nii`` is checked by its size.  A ``.nii.gz`` is decompressed once, streaming, to its end
    whatever its header says: a cut gzip stream is an error by itself (even where a damaged header
    leaves the size unknown, which ITK would otherwise read as an Analyze file padded with garbage)."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = f.read(540)
            if gz:
                total = len(header)
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    total += len(chunk)
            else:
                total = path.stat().st_size
    except (EOFError, OSError, zlib.error) as e:
        raise InputError(f"{path} is truncated or corrupt ({e}); copy or export the file again.") from e
    expected = _nifti_expected_bytes(header)
    if expected is not None and total < expected:
        raise InputError(
            f"{path} is truncated or its header is damaged: the header announces {expected} bytes of data and "
            f"header, the file holds {total}. Copy or export the file again."
        )


def _looks_like_dicom(path: Path) -> bool:
    """DICOM files without extension (e.g. IRCAD ``image_0``): 'DICM' at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _first_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    # ITK messages look like "Exception thrown in SimpleITK ...: /path/file.cxx:123:\nsitk::ERROR: msg"
    for ln in lines:
        if "ERROR" in ln:
            return ln.split("ERROR:", 1)[-1].strip()
    return lines[-1] if lines else type(error).__name__


def read_volume(path) -> Volume:
    """Read a CT volume; see the module docstring for formats.  Raises :class:`InputError`.

    Returns a :class:`Volume` in the file's own orientation (use :func:`lsnet.io.geometry.to_canonical`).
    The array keeps the stored integer type (int16 for most CT) or is ``float32``.
    """
    p = Path(path).expanduser()
    image = _read_sitk(p)
    return check_volume(Volume.from_sitk(image), str(p))


def read_label(path, reference: Optional[Volume] = None, label_value: Optional[int] = None) -> Volume:
    """Read a label image as a ``uint8`` :class:`Volume`.

    Args:
        path: label file (any format of :func:`read_volume`).
        reference: when given, the label is resampled (nearest neighbour) onto the reference grid, so
            the result has ``reference``'s shape and geometry (voxels outside the label image become 0).
        label_value: when given, the result is binary: 1 where the label equals ``label_value``.
    """
    import SimpleITK as sitk

    p = Path(path).expanduser()
    image = _read_sitk(p)
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        if _count_non_finite(arr) or not np.array_equal(arr, np.round(arr)):
            raise InputError(f"{p} has non-integer label values; a label image must hold integer labels.")
    if label_value is not None:
        image = sitk.Cast(image == float(label_value), sitk.sitkUInt8)
    else:
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise InputError(
                f"{p} has label values in [{lo:g}, {hi:g}]; only 0..255 are supported. Pass label_value to "
                "select one label."
            )
        image = sitk.Cast(image, sitk.sitkUInt8)
    del arr

    if reference is not None:
        before = int(np.count_nonzero(sitk.GetArrayViewFromImage(image)))
        resampler = sitk.ResampleImageFilter()
        resampler.SetSize([int(s) for s in reference.size_ijk])
        resampler.SetOutputSpacing(reference.spacing)
        resampler.SetOutputOrigin(reference.origin)
        resampler.SetOutputDirection(tuple(float(v) for v in reference.direction.ravel()))
        resampler.SetInterpolator(sitk.sitkNearestNeighbor)
        resampler.SetDefaultPixelValue(0)
        resampler.SetOutputPixelType(sitk.sitkUInt8)
        image = resampler.Execute(image)
        after = int(np.count_nonzero(sitk.GetArrayViewFromImage(image)))
        if before and not after:
            logger.warning("label %s does not overlap the reference volume at all after resampling", p)
    return Volume.from_sitk(image)
