"""Inputs from the wild, through the real CLI (``lsnet.app.cli.main`` in-process).

Every case must end in exit 0 with complete outputs, or exit 2 with one clear ``lsnet: error:`` line;
never a traceback, an internal error (exit 1), or a partial/temporary output file.  Hypothesis draws
volumes (dtype, shape down to 1 x 1 x 1, spacing from micrometres to metres, axial / sagittal / coronal /
oblique directions), and corrupts NIfTI / NRRD / MetaImage / DICOM files (truncation, byte flips in the
header).  DICOM edge cases (MR, gantry tilt, multi-frame, several series, non-orthogonal orientation)
are explicit tests whose expected behaviour is the policy documented in ``lsnet.io.dicom_info``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lsnet.app.cli import main
from reliability_helpers import one_thread, tiny_weights, write_ct_series  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
EXPECTED = {"segmentation.seg.nrrd", "boxes.json"}  # always written on success (heatmap/markups depend on options/mask)


class Run:
    def __init__(self, rc, out, err, outdir):
        self.rc, self.out, self.err, self.outdir = rc, out, err, outdir

    @property
    def files(self) -> set:
        return {p.name for p in self.outdir.iterdir()} if self.outdir.exists() else set()


_counter = [0]


def run_cli(tmp_path: Path, capsys, weights, src, *extra) -> Run:
    """Run ``lsnet segment`` and check the invariants every run must keep."""
    _counter[0] += 1
    outdir = tmp_path / f"out{_counter[0]}"
    rc = main(["segment", str(src), "-o", str(outdir), "--weights", str(weights), "--device", "cpu", "-q", *extra])
    cap = capsys.readouterr()
    run = Run(rc, cap.out, cap.err, outdir)
    assert "Traceback" not in cap.err and "Traceback" not in cap.out, cap.err
    assert rc in (0, 2), f"exit {rc} (internal error?): {cap.err}"
    assert not [f for f in run.files if f.startswith(".lsnet-tmp")], run.files
    if rc == 0:
        assert EXPECTED <= run.files, run.files
    else:
        errors = [ln for ln in cap.err.splitlines() if ln.startswith("lsnet: error:")]
        assert len(errors) == 1, cap.err
        assert len(errors[0]) > 40  # a message that says something
        assert run.files == set(), f"partial output after a failure: {run.files}"
    return run


# --------------------------------------------------------------------------------------------------
# random volumes, every format
# --------------------------------------------------------------------------------------------------
DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.float32, np.float64]
SPACINGS = [1e-3, 0.3, 0.8, 2.0, 5.0, 40.0, 1e3, 1e5]


def _rotation(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    return np.array(
        [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]
    )


@st.composite
def directions(draw):
    kind = draw(st.sampled_from(["identity", "permuted", "oblique"]))
    if kind == "identity":
        return np.eye(3)
    if kind == "permuted":  # axial with flips, sagittal, coronal acquisitions
        perm = draw(st.permutations([0, 1, 2]))
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
        return np.eye(3)[:, perm] * np.array(signs)
    q = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4).filter(lambda v: np.linalg.norm(v) > 0.1))
    return _rotation(q)


@st.composite
def volumes(draw):
    shape = (draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 7, 33])), draw(st.sampled_from([1, 3, 16, 40])))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        arr = rng.normal(0, 400, size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(max(info.min, -2000), min(info.max, 3000), size=shape, endpoint=True).astype(dtype)
    spacing = [draw(st.sampled_from(SPACINGS)) for _ in range(3)]
    return arr, spacing, draw(directions())


def _write(arr, spacing, direction, path: Path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    img.SetOrigin((-10.0, 20.0, -300.0))
    sitk.WriteImage(img, str(path))


@FUZZ
@given(vol=volumes(), ext=st.sampled_from([".nrrd", ".nii.gz", ".mha", ".nii"]))
def test_random_volumes(tmp_path, capsys, tiny_weights, vol, ext):
    arr, spacing, direction = vol
    src = tmp_path / f"ct{_counter[0]}{ext}"
    try:
        _write(arr, spacing, direction, src)
    except RuntimeError:  # the format cannot store this dtype (e.g. int64 in some writers): not our input
        event(f"{ext} cannot store {arr.dtype}")
        return
    run = run_cli(tmp_path, capsys, tiny_weights, src)
    event(f"exit {run.rc}")
    fov = max(arr.shape[2] * spacing[0], arr.shape[1] * spacing[1], arr.shape[0] * spacing[2])
    if max(arr.shape[2] * spacing[0], arr.shape[1] * spacing[1]) <= 1500 and fov <= 1500:
        assert run.rc == 0, run.err  # every plausible volume is segmented
    if run.rc == 0:
        seg = sitk.ReadImage(str(run.outdir / "segmentation.seg.nrrd"))
        assert seg.GetSize()[:3] == tuple(arr.shape[::-1]) or seg.GetSize() == tuple(arr.shape[::-1])
        assert np.allclose(seg.GetDirection(), sitk.ReadImage(str(src)).GetDirection(), atol=1e-4)
    else:
        assert "field of view" in run.err


def test_huge_spacing_is_refused_before_computing(tmp_path, capsys, tiny_weights):
    src = tmp_path / "cm_as_mm.nrrd"
    _write(np.full((2, 512, 512), -1000, np.int16), (70.0, 70.0, 50.0), np.eye(3), src)
    run = run_cli(tmp_path, capsys, tiny_weights, src)
    assert run.rc == 2 and "field of view" in run.err and "wrong unit" in run.err


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 40), (1, 40, 1), (3, 1, 1)])
def test_one_pixel_and_one_slice_volumes(tmp_path, capsys, tiny_weights, shape):
    src = tmp_path / "tiny.nrrd"
    _write(np.full(shape, -1000, np.int16), (0.8, 0.8, 2.0), np.eye(3), src)
    assert run_cli(tmp_path, capsys, tiny_weights, src).rc == 0


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: sitk.Image([8, 8, 2], sitk.sitkVectorFloat32, 3), "components per voxel"),
        (lambda: sitk.Image([8, 8, 2, 3], sitk.sitkInt16), "4-D"),
        (lambda: sitk.Image([8, 8], sitk.sitkInt16), "2-D"),
        (lambda: sitk.Image([8, 8, 2], sitk.sitkComplexFloat32), "complex"),
    ],
)
def test_wrong_image_kinds(tmp_path, capsys, tiny_weights, make, words):
    src = tmp_path / "odd.nrrd"
    sitk.WriteImage(make(), str(src))
    run = run_cli(tmp_path, capsys, tiny_weights, src)
    assert run.rc == 2 and words in run.err


def test_nan_voxels(tmp_path, capsys, tiny_weights):
    a = np.full((2, 16, 16), -1000, np.float32)
    a[1, 3, 4] = np.nan
    src = tmp_path / "nan.nrrd"  # (ITK turns NaN into 0 in NIfTI)
    _write(a, (1, 1, 1), np.eye(3), src)
    run = run_cli(tmp_path, capsys, tiny_weights, src)
    assert run.rc == 2 and "NaN" in run.err


def test_not_ct_values_warn(tmp_path, capsys, tiny_weights):
    """A NIfTI has no modality: a volume without air (e.g. MR intensities 0..800) runs with a warning."""
    src = tmp_path / "mr_like.nii.gz"
    _write(np.random.default_rng(0).integers(0, 800, (2, 32, 32)).astype(np.int16), (1, 1, 3), np.eye(3), src)
    run = run_cli(tmp_path, capsys, tiny_weights, src)
    assert run.rc == 0 and "may not be a CT in Hounsfield units" in run.err


# --------------------------------------------------------------------------------------------------
# corrupted files
# --------------------------------------------------------------------------------------------------
_CLEAN: dict = {}


def clean_bytes(kind: str, tmp_dir: Path) -> bytes:
    """Bytes of a valid small CT in format ``kind`` (made once per session; a module cache, not a fixture, so
    that Hypothesis does not print every file in a failure report)."""
    if not _CLEAN:
        a = np.full((3, 24, 24), -1000, np.int16)
        a[:, 6:18, 6:18] = 50
        for ext, compress in [(".nii", False), (".nii.gz", True), (".nrrd", False), ("_gz.nrrd", True), (".mha", False)]:
            p = tmp_dir / f"clean{ext}"
            img = sitk.GetImageFromArray(a)
            img.SetSpacing((1.5, 1.5, 2.5))
            sitk.WriteImage(img, str(p), compress)
            _CLEAN[ext] = p.read_bytes()
        _CLEAN[".dcm"] = write_ct_series(tmp_dir / "clean_dicom", 1, rows=24, cols=24)[0].read_bytes()
    return _CLEAN[kind]


@FUZZ
@given(
    kind=st.sampled_from([".nii", ".nii.gz", ".nrrd", "_gz.nrrd", ".mha", ".dcm"]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
)
# cases Hypothesis found (2026-12-03), always tried: a cut .nii.gz whose damaged deflate stream loses the
# header's magic, and cut .nii files without it; ITK reads such files as Analyze 7.5, padded with garbage
@example(kind=".nii.gz", cut=0.75, flips=[(40, 0)])
@example(kind=".nii", cut=0.5, flips=[(344, 0)])
@example(kind=".nii", cut=0.8, flips=[(345, 7)])
def test_corrupted_files(tmp_path, capsys, tiny_weights, kind, cut, flips):
    data = bytearray(clean_bytes(kind, tmp_path))
    for pos, val in flips:  # byte flips in the header region
        if pos < len(data):
            data[pos] = val
    data = data[: max(0, int(len(data) * cut))] if cut < 0.999 else data
    src = tmp_path / f"bad{_counter[0]}{'.nrrd' if kind == '_gz.nrrd' else kind}"
    src.write_bytes(bytes(data))
    run = run_cli(tmp_path, capsys, tiny_weights, src)
    event(f"{kind} exit {run.rc}")
    if cut < 0.9 and kind in (".nii", ".nii.gz", ".mha", ".nrrd", "_gz.nrrd"):
        assert run.rc == 2  # a file missing > 10 % of its bytes cannot be complete


@pytest.mark.parametrize("kind", [".nii", ".nii.gz"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_nifti_is_refused(tmp_path, capsys, tiny_weights, kind, keep):
    """ITK's NIfTI reader pads a short file with garbage; lsnet.io.volume must refuse it."""
    data = clean_bytes(kind, tmp_path)
    src = tmp_path / f"cut{kind}"
    src.write_bytes(data[: int(len(data) * keep)])
    run = run_cli(tmp_path, capsys, tiny_weights, src)
    assert run.rc == 2 and "truncated" in run.err


def test_truncated_nifti_with_damaged_sizeof_hdr(tmp_path, capsys, tiny_weights):
    """Found by fuzzing: ITK identifies NIfTI by its magic and ignores sizeof_hdr; so must the check."""
    data = bytearray(clean_bytes(".nii", tmp_path))
    data[0] = 0
    src = tmp_path / "cut.nii"
    src.write_bytes(bytes(data[: len(data) // 2]))
    run = run_cli(tmp_path, capsys, tiny_weights, src)
    assert run.rc == 2 and "truncated" in run.err


def test_flipped_one_pixel_volume(tmp_path, capsys, tiny_weights):
    """Found by fuzzing: a 1 x 1 x 1 volume with a flipped axis gives a negative-stride view that numpy
    calls contiguous; torch.from_numpy refuses it (inference.py must copy such a batch)."""
    src = tmp_path / "px.nrrd"
    _write(np.array([[[217]]], np.uint8), (1.0, 1.0, 1.0), np.diag([-1.0, 1.0, 1.0]), src)
    assert run_cli(tmp_path, capsys, tiny_weights, src).rc == 0


def test_empty_and_missing_inputs(tmp_path, capsys, tiny_weights):
    (tmp_path / "empty.nrrd").write_bytes(b"")
    assert run_cli(tmp_path, capsys, tiny_weights, tmp_path / "empty.nrrd").rc == 2
    run = run_cli(tmp_path, capsys, tiny_weights, tmp_path / "nowhere.nii.gz")
    assert run.rc == 2 and "not found" in run.err
    (tmp_path / "nodicom").mkdir()
    (tmp_path / "nodicom" / "readme.txt").write_text("hello")
    run = run_cli(tmp_path, capsys, tiny_weights, tmp_path / "nodicom")
    assert run.rc == 2 and "No DICOM series" in run.err


# --------------------------------------------------------------------------------------------------
# DICOM edge cases (policies of lsnet.io.dicom_info)
# --------------------------------------------------------------------------------------------------
def test_dicom_series_with_one_truncated_file(tmp_path, capsys, tiny_weights):
    files = write_ct_series(tmp_path / "s", 4)
    files[2].write_bytes(files[2].read_bytes()[:700])
    run = run_cli(tmp_path, capsys, tiny_weights, tmp_path / "s")
    # GDCM may drop the broken file (3 slices with a gap) or refuse the series: either is a clear outcome
    assert run.rc in (0, 2)


def test_dicom_one_slice(tmp_path, capsys, tiny_weights):
    write_ct_series(tmp_path / "s", 1)
    assert run_cli(tmp_path, capsys, tiny_weights, tmp_path / "s", "--dicom-seg").rc == 0


def test_mr_is_refused_unless_allowed(tmp_path, capsys, tiny_weights):
    write_ct_series(tmp_path / "mr", 3, modality="MR")
    run = run_cli(tmp_path, capsys, tiny_weights, tmp_path / "mr")
    assert run.rc == 2 and "is MR, not CT" in run.err and "--allow-non-ct" in run.err
    run = run_cli(tmp_path, capsys, tiny_weights, tmp_path / "mr", "--allow-non-ct")
    assert run.rc == 0 and "meaningless" in run.err and "warning" in run.err.lower()


def test_gantry_tilt_segments_acquired_slices_with_warning(tmp_path, capsys, tiny_weights):
    files = write_ct_series(tmp_path / "tilt", 5, tilt_deg=15.0)
    run = run_cli(tmp_path, capsys, tiny_weights, tmp_path / "tilt", "--dicom-seg")
    assert run.rc == 0
    assert "gantry tilt (15.0 degrees)" in run.err and "acquired" in run.err
    from lsnet.io import dicom_seg

    frames_ok = dicom_seg.read_segmentation(run.outdir / "segmentation.dcm")
    assert int(frames_ok.NumberOfFrames) >= 1
    # the SEG references the acquired slices; every referenced instance is one of ours
    import pydicom

    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    refs = {str(fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for fr in frames_ok.PerFrameFunctionalGroupsSequence}
    assert refs <= uids


def test_gantry_tilt_seg_frames_keep_acquired_positions(tmp_path):
    """Unit level: a tilted series maps each mask slice to its own acquired position."""
    from lsnet.io import dicom_seg
    from lsnet.io.geometry import Reorientation
    from lsnet.results import SegmentationResult
    from lsnet.io.volume import read_volume

    files = write_ct_series(tmp_path / "tilt", 4, tilt_deg=20.0)
    vol = read_volume(tmp_path / "tilt")
    mask = np.zeros(vol.shape, np.uint8)
    mask[:, 10:14, 10:20] = 1
    res = SegmentationResult(vol, mask, None, [], Reorientation.from_direction(vol.direction, vol.shape), {"name": "t"})
    seg = dicom_seg.build_segmentation(res, tmp_path / "tilt")
    import pydicom

    pos = {str(d.SOPInstanceUID): [float(v) for v in d.ImagePositionPatient]
           for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    frames = dicom_seg.describe_frames(seg)
    assert len(frames) == 4
    for ref, _n, ipp, _iop, _sp, px in frames:
        np.testing.assert_allclose(ipp, pos[ref], atol=1e-3)
        assert px.sum() == 40


def test_several_series_in_one_folder_reads_the_largest(tmp_path, capsys, tiny_weights):
    write_ct_series(tmp_path / "mixed", 2, prefix="scout", rows=16, cols=16)
    write_ct_series(tmp_path / "mixed", 5, prefix="axial")
    run = run_cli(tmp_path, capsys, tiny_weights, tmp_path / "mixed")
    assert run.rc == 0
    assert len(re.findall("holds 2 DICOM series", run.err)) == 1  # said once, not once per reader
    assert "(5 files, the most)" in run.err
    assert "5 slices" in run.out


def test_non_orthogonal_orientation_is_refused(tmp_path, capsys, tiny_weights):
    write_ct_series(tmp_path / "bad", 3, iop=(1, 0, 0, 0.3, 0.954, 0))
    run = run_cli(tmp_path, capsys, tiny_weights, tmp_path / "bad")
    assert run.rc == 2 and "ImageOrientationPatient" in run.err


@pytest.mark.parametrize("iop", [(0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1), (0.866025, 0.5, 0, -0.5, 0.866025, 0)])
def test_sagittal_coronal_oblique_dicom(tmp_path, capsys, tiny_weights, iop):
    write_ct_series(tmp_path / "s", 3, iop=iop)
    run = run_cli(tmp_path, capsys, tiny_weights, tmp_path / "s", "--dicom-seg")
    assert run.rc == 0


def _multiframe(path: Path, frames: int = 3, rows: int = 16, cols: int = 16) -> Path:
    """A legacy multi-frame CT-like file (NumberOfFrames > 1, one position)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Multi^Frame", "MF1"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.PixelSpacing = ["0.8", "0.8"]
    a = np.full((frames, rows, cols), -1000, np.int16)
    a[:, 4:12, 4:12] = 40
    ds.PixelData = a.tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


def test_multiframe_dicom(tmp_path, capsys, tiny_weights):
    src = _multiframe(tmp_path / "mf.dcm")
    run = run_cli(tmp_path, capsys, tiny_weights, src)
    assert run.rc == 0  # read as one 3-D volume
    assert "3 slices" in run.out
    run = run_cli(tmp_path, capsys, tiny_weights, src, "--dicom-seg")
    assert run.rc == 2 and "multi-frame" in run.err
