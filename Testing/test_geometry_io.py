"""Geometry conventions and image reading (lsnet.io.geometry, lsnet.io.volume) on synthetic and real CT."""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np
import pytest
import SimpleITK as sitk

from lsnet.errors import InputError
from lsnet.io.geometry import Reorientation, Volume, apply_affine, to_canonical
from lsnet.io.volume import read_label, read_volume, volume_from_array

# real data, relative to the ``shared_data`` fixture (conftest.py: <project root>/../shared/data)
NIH_SERIES = "pancreas-ct/PANCREAS_0001/11-24-2015-PANCREAS0001-Pancreas-18957/Pancreas-99667"
NIH_LABEL = "pancreas-ct/labels/label0001.nii.gz"
IRCAD = "ircadb-1.1/3Dircadb1/3Dircadb1.1/PATIENT_DICOM"
DCMQI_CT = "dcmqi-ct-3slice/ct"


# ------------------------------------------------------------------------------------------------
# reorientation on synthetic volumes: all 48 axis permutations / flips
# ------------------------------------------------------------------------------------------------
SIGNED_PERMUTATIONS = [
    (perm, signs) for perm in itertools.permutations(range(3)) for signs in itertools.product((1, -1), repeat=3)
]


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [x for x in range(3) if x != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _synthetic(perm, signs, oblique: bool) -> Volume:
    d = np.zeros((3, 3))
    for col in range(3):
        d[perm[col], col] = signs[col]  # input axis `col` points along LPS axis perm[col]
    if oblique:
        d = _rotation(0, 12.0) @ _rotation(2, -9.0) @ d
    arr = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)  # (K, J, I), all values distinct
    return Volume(arr, spacing=(0.7, 1.1, 2.5), origin=(10.0, -20.0, 30.0), direction=d)


@pytest.mark.parametrize("oblique", [False, True], ids=["axis-aligned", "oblique"])
@pytest.mark.parametrize("perm,signs", SIGNED_PERMUTATIONS, ids=[f"{p}{s}" for p, s in SIGNED_PERMUTATIONS])
def test_reorientation_round_trip(perm, signs, oblique):
    vol = _synthetic(perm, signs, oblique)
    canon, reo = to_canonical(vol)

    # canonical direction is (near) identity; the true cosines are kept for oblique volumes
    if oblique:
        assert np.all(np.diag(canon.direction) > 0.95)
        assert not np.allclose(canon.direction, np.eye(3))
    else:
        np.testing.assert_allclose(canon.direction, np.eye(3), atol=1e-12)

    # arrays: views, and an exact round trip
    assert np.shares_memory(canon.array, vol.array)
    back = reo.to_input_array(canon.array)
    assert back.shape == vol.shape and np.array_equal(back, vol.array)
    assert canon.shape == reo.canonical_shape

    # indices: canonical voxel c holds the value of input voxel canonical_ijk_to_input_ijk(c), and both
    # have the same physical (LPS) centre
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in canon.shape], indexing="ij")
    c_ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    n_ijk = reo.canonical_ijk_to_input_ijk(c_ijk)
    n_int = np.round(n_ijk).astype(int)
    np.testing.assert_allclose(n_ijk, n_int, atol=1e-12)
    canonical_values = canon.array[kk.ravel(), jj.ravel(), ii.ravel()]
    assert np.array_equal(canonical_values, vol.array[n_int[:, 2], n_int[:, 1], n_int[:, 0]])
    np.testing.assert_allclose(
        apply_affine(canon.ijk_to_lps(), c_ijk), apply_affine(vol.ijk_to_lps(), n_ijk), atol=1e-9
    )
    np.testing.assert_allclose(reo.input_ijk_to_canonical_ijk(n_ijk), c_ijk, atol=1e-12)

    # continuous coordinates (voxel edges) map consistently too
    edge = np.array([[-0.5, -0.5, -0.5], [1.25, 0.5, 2.0]])
    np.testing.assert_allclose(
        apply_affine(canon.ijk_to_lps(), edge),
        apply_affine(vol.ijk_to_lps(), reo.canonical_ijk_to_input_ijk(edge)),
        atol=1e-9,
    )
    assert Reorientation.from_dict(reo.to_dict()) == reo


def test_reorientation_trailing_channel_axes_and_dtypes():
    vol = _synthetic((1, 2, 0), (-1, 1, -1), oblique=False)
    canon, reo = to_canonical(vol)
    feats = np.random.default_rng(0).random(vol.shape + (2,)).astype(np.float32)
    c = reo.to_canonical_array(feats)
    assert c.shape == canon.shape + (2,)
    assert np.array_equal(reo.to_input_array(c), feats)
    boolean = vol.array % 7 == 0
    assert np.array_equal(reo.to_input_array(reo.to_canonical_array(boolean)), boolean)
    with pytest.raises(ValueError):
        reo.to_input_array(vol.array.transpose(2, 1, 0).copy())  # wrong shape is refused


def test_ijk_to_ras_is_slicer_convention():
    vol = _synthetic((0, 1, 2), (1, -1, -1), oblique=False)
    lps = vol.ijk_to_lps()
    ras = vol.ijk_to_ras()
    np.testing.assert_allclose(ras[:2], -lps[:2])
    np.testing.assert_allclose(ras[2:], lps[2:])
    np.testing.assert_allclose(vol.ras_to_ijk() @ ras, np.eye(4), atol=1e-12)
    # SimpleITK agrees on the physical point of an index
    img = vol.to_sitk()
    p = img.TransformContinuousIndexToPhysicalPoint((1.5, 2.0, 0.25))
    np.testing.assert_allclose(apply_affine(lps, np.array([1.5, 2.0, 0.25])), p, atol=1e-9)
    back = Volume.from_sitk(img)
    assert back.same_geometry(vol) and np.array_equal(back.array, vol.array)


def test_one_slice_volume_is_valid(tmp_path):
    vol = volume_from_array(np.full((1, 6, 7), -1000, dtype=np.int16), spacing=(0.8, 0.8, 5.0))
    canon, reo = to_canonical(vol)
    assert canon.shape == (1, 6, 7) and reo.is_identity
    path = tmp_path / "one.nrrd"
    sitk.WriteImage(vol.to_sitk(), str(path))
    again = read_volume(path)
    assert again.shape == (1, 6, 7) and again.same_geometry(vol)


def test_volume_from_array_dtypes():
    v = volume_from_array(np.zeros((2, 3, 4)))
    assert v.array.dtype == np.float32  # float64 is never kept
    v = volume_from_array(np.zeros((2, 3, 4), dtype=np.int16))
    assert v.array.dtype == np.int16
    with pytest.raises(InputError, match="array\\[None\\]"):
        volume_from_array(np.zeros((3, 4)))
    with pytest.raises(InputError, match="empty"):
        volume_from_array(np.zeros((0, 3, 4), dtype=np.int16))
    with pytest.raises(InputError, match="1 NaN or infinite"):
        volume_from_array(np.array([[[0.0, np.nan]]]))


# ------------------------------------------------------------------------------------------------
# errors of read_volume
# ------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize(
    "name,content", [("notes.txt", b"hello\n"), ("model.safetensors", b"\x08" + b"\0" * 7 + b"{}      ")]
)
def test_not_an_image(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(InputError, match=r"not an image.*NIfTI"):
        read_volume(p)


def test_2d_image(tmp_path):
    p = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.int16)), str(p))
    with pytest.raises(InputError, match=r"2-D image \(5 x 4\).*3-D"):
        read_volume(p)


def test_4d_image(tmp_path):
    p = tmp_path / "frames.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 5, 6), np.float32), isVector=False), str(p))
    with pytest.raises(InputError, match=r"4-D image \(6 x 5 x 4 x 2\).*extract one frame"):
        read_volume(p)
    # a trailing singleton dimension (NIfTI with one time point) is just a 3-D volume
    p1 = tmp_path / "one_frame.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((1, 4, 5, 6), np.float32), isVector=False), str(p1))
    assert read_volume(p1).shape == (4, 5, 6)


def test_vector_image(tmp_path):
    p = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), str(p))
    with pytest.raises(InputError, match="3 components per voxel.*Extract one channel"):
        read_volume(p)


def test_empty_volume(tmp_path):
    p = tmp_path / "empty.mha"
    p.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 0\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    with pytest.raises(InputError, match=r"empty \(size 4 x 4 x 0\)"):
        read_volume(p)


def test_nan_values(tmp_path):
    a = np.zeros((3, 4, 5), np.float32)
    a[1, 1, 1] = np.nan
    a[2, 2, 2] = np.inf
    p = tmp_path / "nan.nrrd"  # (ITK's NIfTI reader turns NaN into 0, so NRRD is used here)
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    with pytest.raises(InputError, match="2 NaN or infinite voxel"):
        read_volume(p)


def test_float64_becomes_float32(tmp_path):
    p = tmp_path / "f64.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.linspace(-1, 1, 60).reshape(3, 4, 5)), str(p))
    assert read_volume(p).array.dtype == np.float32


def test_label_with_fractional_values_is_refused(tmp_path):
    p = tmp_path / "soft.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 3, 4), 0.5, np.float32)), str(p))
    with pytest.raises(InputError, match="non-integer label"):
        read_label(p)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="No DICOM series"):
        read_volume(tmp_path)


# ------------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nih(shared_data):
    """(CT volume, label resampled onto it) of NIH PANCREAS_0001, read once per module."""
    vol = read_volume(shared_data / NIH_SERIES)
    label = read_label(shared_data / NIH_LABEL, reference=vol)
    return vol, label


def test_nih_dicom_geometry(nih):
    vol, _ = nih
    assert vol.shape == (240, 512, 512)
    assert vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.spacing, (0.859375, 0.859375, 1.0), atol=1e-6)
    np.testing.assert_allclose(vol.direction, np.diag([1.0, -1.0, -1.0]), atol=1e-6)
    assert vol.array.min() == -1024 and vol.array.max() == 2421  # HU after rescale


def test_nih_label_on_dicom(nih, shared_data):
    vol, label = nih
    assert label.shape == vol.shape and label.same_geometry(vol)
    assert label.array.dtype == np.uint8
    assert int(np.count_nonzero(label.array)) == 78329
    slices = np.nonzero(label.array.any(axis=(1, 2)))[0]
    assert (slices[0], slices[-1]) == (99, 169)  # DICOM array order
    # the raw NIfTI describes the same frame (L, A, I) and needs no resampling
    raw = read_label(shared_data / NIH_LABEL)
    assert raw.same_geometry(vol) and np.array_equal(raw.array, label.array)
    # binary selection
    assert int(read_label(shared_data / NIH_LABEL, label_value=1).array.sum()) == 78329


def test_nih_canonical_overlay(nih, shared_data):
    vol, label = nih
    cvol, reo = to_canonical(vol)
    clab, reo_lab = to_canonical(read_label(shared_data / NIH_LABEL))
    assert reo == reo_lab and reo.perm == (0, 1, 2) and reo.flip == (False, True, True)
    assert np.shares_memory(cvol.array, vol.array)  # no copy of the CT
    assert np.array_equal(clab.array, reo.to_canonical_array(label.array))
    np.testing.assert_allclose(cvol.direction, np.eye(3), atol=1e-9)
    # the pancreas holds enhanced soft tissue
    hu = cvol.array[clab.array > 0].astype(np.float64)
    assert 0 < hu.mean() < 200
    # canonical slices are ordered inferior -> superior: the label is now on slices 70..140
    cslices = np.nonzero(clab.array.any(axis=(1, 2)))[0]
    assert (cslices[0], cslices[-1]) == (239 - 169, 239 - 99)
    # radiological display: anterior on top, so the spine (bone behind the pancreas) is in the lower
    # half of a canonical axial slice, while the raw DICOM rows have it at the top
    k = int(np.median(cslices))
    central = cvol.array[k, :, 192:320]
    bone_rows = np.nonzero(central > 300)[0]
    assert bone_rows.mean() > 256
    raw_bone_rows = np.nonzero(vol.array[239 - k, :, 192:320] > 300)[0]
    assert raw_bone_rows.mean() < 256
    # the pancreas is in front of the spine
    assert np.nonzero(clab.array[k])[0].mean() < bone_rows.mean()


def test_resampled_3mm_nifti_round_trip(nih, shared_data, tmp_path):
    vol, _ = nih
    src = vol.to_sitk()
    new_spacing = (1.5, 1.5, 3.0)
    new_size = [int(round(n * s / ns)) for n, s, ns in zip(src.GetSize(), src.GetSpacing(), new_spacing)]
    coarse = sitk.Resample(
        src, new_size, sitk.Transform(), sitk.sitkLinear,
        src.GetOrigin(), new_spacing, src.GetDirection(), -1024, sitk.sitkInt16,
    )
    path = tmp_path / "ct_3mm.nii.gz"
    sitk.WriteImage(coarse, str(path))
    v3 = read_volume(path)
    assert v3.shape == tuple(new_size[::-1])
    np.testing.assert_allclose(v3.spacing, new_spacing, atol=1e-5)
    np.testing.assert_allclose(v3.origin, src.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(v3.direction.ravel(), src.GetDirection(), atol=1e-6)
    assert np.array_equal(v3.array, sitk.GetArrayViewFromImage(coarse))
    # the label resampled onto the coarse grid keeps its physical volume (within partial-volume error)
    lab3 = read_label(shared_data / NIH_LABEL, reference=v3)
    ml_fine = 78329 * 0.859375**2 * 1.0
    ml_coarse = np.count_nonzero(lab3.array) * 1.5 * 1.5 * 3.0
    assert abs(ml_coarse - ml_fine) / ml_fine < 0.1
    # and overlays the same anatomy
    assert 0 < v3.array[lab3.array > 0].mean() < 200


def test_ircad_dicom(shared_data):
    vol = read_volume(shared_data / IRCAD)
    assert vol.shape == (129, 512, 512)
    np.testing.assert_allclose(vol.spacing, (0.57, 0.57, 1.6), atol=1e-5)
    assert vol.array.min() >= -1024 and vol.array.max() <= 1023
    # a single file of the series (no extension, DICM magic) reads the whole series
    one = read_volume(shared_data / IRCAD / "image_7")
    assert one.same_geometry(vol)


def test_dcmqi_three_slices(shared_data):
    vol = read_volume(shared_data / DCMQI_CT)
    assert vol.shape == (3, 512, 512)
    np.testing.assert_allclose(vol.spacing, (0.810547, 0.810547, 1.0), atol=1e-5)
    np.testing.assert_allclose(vol.origin, (-235.199997, -226.800003, -128.690002), atol=1e-4)
    assert np.issubdtype(vol.array.dtype, np.integer)
    assert vol.array.min() < -900  # rescale intercept -1024 applied: air is negative HU
    assert read_volume(shared_data / DCMQI_CT / "02.dcm").same_geometry(vol)


def test_folder_with_two_series_picks_largest(shared_data, tmp_path, caplog):
    for f in sorted((shared_data / DCMQI_CT).glob("*.dcm")):
        os.symlink(f, tmp_path / f"a_{f.name}")
    for n in range(5):
        os.symlink(shared_data / IRCAD / f"image_{n}", tmp_path / f"b_{n}.dcm")
    with caplog.at_level(logging.WARNING, logger="lsnet.io.volume"):
        vol = read_volume(tmp_path)
    assert vol.shape == (5, 512, 512)
    assert "holds 2 DICOM series" in caplog.text
