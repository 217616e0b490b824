"""DICOM SEG output (lsnet.io.dicom_seg): geometry against a real SEG, real series, dciodvfy, CLI wiring."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="DICOM SEG output needs the optional 'dicom' extra (highdicom, pydicom)")

from lsnet.io import dicom_seg  # noqa: E402
from lsnet.errors import OutputError  # noqa: E402
from lsnet.io.geometry import Reorientation  # noqa: E402
from lsnet.results import SegmentationResult  # noqa: E402
from lsnet.io.volume import read_label, read_volume  # noqa: E402
from reliability_helpers import one_thread, tiny_weights  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

DCMQI = Path("dcmqi-ct-3slice")
IRCAD = Path("ircadb-1.1/3Dircadb1/3Dircadb1.1/PATIENT_DICOM")
PANCREAS_DICOM = Path("pancreas-ct/PANCREAS_0001/11-24-2015-PANCREAS0001-Pancreas-18957/Pancreas-99667")


def _result(volume, mask, card=None) -> SegmentationResult:
    return SegmentationResult(volume, mask.astype(np.uint8), None, [], Reorientation.from_direction(volume.direction, volume.shape),
                              card or {"name": "test-model"})


def _dciodvfy_errors(path: Path) -> list:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (Debian/Ubuntu: apt-get install dicom3tools)")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


@pytest.fixture(scope="module")
def dcmqi(shared_data):
    root = shared_data / DCMQI
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    return root


def test_matches_the_real_dcmqi_seg(dcmqi, tmp_path):
    """Our SEG of liver_seg.nrrd on the 3-slice CT has the geometry and pixels of the real liver.dcm."""
    ct = read_volume(dcmqi / "ct")
    liver = read_label(dcmqi / "seg" / "liver_seg.nrrd", reference=ct)
    assert liver.array.any()
    path = dicom_seg.write_dicom_seg(_result(ct, liver.array), dcmqi / "ct", tmp_path / "ours.dcm")
    ours = dicom_seg.describe_frames(dicom_seg.read_segmentation(path))
    real = dicom_seg.describe_frames(dicom_seg.read_segmentation(dcmqi / "seg" / "liver.dcm"))
    assert len(ours) == len(real) == 3
    for o, r in zip(ours, real):
        ref_o, num_o, ipp_o, iop_o, sp_o, px_o = o
        ref_r, num_r, ipp_r, iop_r, sp_r, px_r = r
        assert ref_o == ref_r  # same referenced CT instance
        assert num_o == num_r == 1
        np.testing.assert_allclose(ipp_o, ipp_r, atol=1e-3)  # the real SEG rounds to 7 significant digits
        np.testing.assert_allclose(iop_o, iop_r, atol=1e-6)
        np.testing.assert_allclose(sp_o, sp_r, atol=1e-6)
        np.testing.assert_array_equal(px_o, px_r)


def test_segment_metadata(dcmqi, tmp_path):
    import pydicom

    ct = read_volume(dcmqi / "ct")
    mask = np.zeros(ct.shape, np.uint8)
    mask[1, 200:260, 220:300] = 1
    path = dicom_seg.write_dicom_seg(_result(ct, mask), dcmqi / "ct", tmp_path)
    assert path.name == "segmentation.dcm"
    ds = pydicom.dcmread(path)
    src = pydicom.dcmread(sorted((dcmqi / "ct").iterdir())[0], stop_before_pixels=True)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    seg = ds.SegmentSequence[0]
    assert seg.SegmentLabel == "Pancreas" and seg.SegmentAlgorithmType == "AUTOMATIC"
    assert seg.SegmentedPropertyTypeCodeSequence[0].CodeValue == "15776009"
    assert int(ds.NumberOfFrames) == 1  # empty slices are omitted
    assert _dciodvfy_errors(path) == []


def test_empty_result_is_a_valid_seg(dcmqi, tmp_path):
    ct = read_volume(dcmqi / "ct")
    path = dicom_seg.write_dicom_seg(_result(ct, np.zeros(ct.shape, np.uint8)), dcmqi / "ct", tmp_path / "empty.dcm")
    seg = dicom_seg.read_segmentation(path)
    assert int(seg.NumberOfFrames) == 3 and not seg.pixel_array.any()
    assert _dciodvfy_errors(path) == []


def test_real_ircad_series_validates(shared_data, tmp_path):
    root = shared_data / IRCAD
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ct = read_volume(root)
    mask = np.zeros(ct.shape, np.uint8)
    mask[40:46, 200:260, 220:300] = 1
    mask[90, 100:110, 100:120] = 1
    path = dicom_seg.write_dicom_seg(_result(ct, mask), root, tmp_path / "ircad.dcm")
    frames = dicom_seg.describe_frames(dicom_seg.read_segmentation(path))
    assert len(frames) == 7
    # each frame sits on the CT slice it references: voxel position of its IPP is (0, 0, k) with mask[k] set
    import pydicom

    by_uid = {}
    for f in sorted(root.iterdir()):
        d = pydicom.dcmread(f, stop_before_pixels=True)
        by_uid[str(d.SOPInstanceUID)] = d
    lps_to_ijk = ct.lps_to_ijk()
    for ref, _num, ipp, _iop, _sp, px in frames:
        np.testing.assert_allclose(ipp, [float(v) for v in by_uid[ref].ImagePositionPatient], atol=1e-4)
        ijk = lps_to_ijk[:3, :3] @ ipp + lps_to_ijk[:3, 3]
        k = int(round(ijk[2]))
        assert np.allclose(ijk, [0, 0, k], atol=1e-3)
        np.testing.assert_array_equal(px, mask[k] > 0)
    assert _dciodvfy_errors(path) == []


def test_flipped_series_pancreas(shared_data, tmp_path):
    """PANCREAS_0001 is read with direction diag(1, -1, -1): frames must still land on their slices."""
    root = shared_data / PANCREAS_DICOM
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ct = read_volume(root)
    assert ct.direction[2, 2] < 0
    mask = np.zeros(ct.shape, np.uint8)
    mask[120, 300:320, 250:280] = 1
    mask[130, 310:315, 250:290] = 1
    path = dicom_seg.write_dicom_seg(_result(ct, mask), root, tmp_path / "p.dcm")
    frames = dicom_seg.describe_frames(dicom_seg.read_segmentation(path))
    lps_to_ijk = ct.lps_to_ijk()
    got = {}
    for _ref, _num, ipp, _iop, _sp, px in frames:
        k = int(round((lps_to_ijk[:3, :3] @ ipp + lps_to_ijk[:3, 3])[2]))
        got[k] = px
    assert sorted(got) == [120, 130]
    for k, px in got.items():
        np.testing.assert_array_equal(px, mask[k] > 0)
    assert _dciodvfy_errors(path) == []


def test_wrong_series_is_refused(dcmqi, shared_data, tmp_path):
    root = shared_data / IRCAD
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ct = read_volume(dcmqi / "ct")
    with pytest.raises(OutputError, match="series that was segmented"):
        dicom_seg.build_segmentation(_result(ct, np.ones(ct.shape, np.uint8)), root)


def test_existing_file_is_not_overwritten(dcmqi, tmp_path):
    ct = read_volume(dcmqi / "ct")
    target = tmp_path / "segmentation.dcm"
    target.write_bytes(b"user data")
    with pytest.raises(OutputError, match="exists"):
        dicom_seg.write_dicom_seg(_result(ct, np.zeros(ct.shape)), dcmqi / "ct", target)
    assert target.read_bytes() == b"user data"


def test_cli_dicom_seg(dcmqi, tmp_path, tiny_weights, capsys):
    from lsnet.app.cli import main

    out = tmp_path / "out"
    rc = main(["segment", str(dcmqi / "ct"), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q", "--dicom-seg"])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert "segmentation.dcm" in names and "segmentation.seg.nrrd" in names
    assert not [n for n in names if n.startswith(".lsnet-tmp")]
    seg = dicom_seg.read_segmentation(out / "segmentation.dcm")
    assert seg.ContentLabel == "LSNET"
    assert _dciodvfy_errors(out / "segmentation.dcm") == []
    # again: refused before computing, nothing changed
    before = (out / "segmentation.dcm").read_bytes()
    rc = main(["segment", str(dcmqi / "ct"), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q", "--dicom-seg"])
    err = capsys.readouterr().err
    assert rc == 2 and "exist" in err and "Traceback" not in err
    assert (out / "segmentation.dcm").read_bytes() == before


def test_cli_dicom_seg_needs_dicom_input(tmp_path, tiny_weights, capsys):
    import SimpleITK as sitk

    from lsnet.app.cli import main

    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 32, 32), -1000, np.int16)), str(ct))
    rc = main(["segment", str(ct), "-o", str(tmp_path / "o"), "--weights", str(tiny_weights), "--device", "cpu", "-q", "--dicom-seg"])
    err = capsys.readouterr().err
    assert rc == 2 and "--dicom-seg needs a DICOM" in err
    assert not (tmp_path / "o").exists()


def test_seg_failure_leaves_nothing(dcmqi, tmp_path, tiny_weights, capsys, monkeypatch):
    """The SEG is committed with the other files or not at all."""
    from lsnet.io import outputs
    from lsnet.app.cli import main

    def broken(result, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "_write_boxes", broken)
    out = tmp_path / "out"
    rc = main(["segment", str(dcmqi / "ct"), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q", "--dicom-seg"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []
