"""Output files (lsnet.io.outputs, lsnet.io.terminology): Slicer formats, geometry, all-or-nothing writing."""

from __future__ import annotations

import json
import os

import jsonschema
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from lsnet.io import outputs
from lsnet.errors import OutputError
from lsnet.io.geometry import Volume, apply_affine, to_canonical
from lsnet.io.outputs import (
    box_corners_ijk,
    box_corners_ras,
    boxes_to_records,
    roi_markups_dict,
    write_outputs,
)
from lsnet.results import RoiBox, SegmentationResult
from lsnet.io.terminology import KNOWN_STRUCTURES, TerminologyEntry, structure_for_label
from lsnet.io.volume import read_label, read_volume

NIH_SERIES = "pancreas-ct/PANCREAS_0001/11-24-2015-PANCREAS0001-Pancreas-18957/Pancreas-99667"
NIH_LABEL = "pancreas-ct/labels/label0001.nii.gz"
PANCREAS_TERM = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    "~SCT^15776009^Pancreas~^^~Anatomic codes - DICOM master list~^^~^^"
)
CARD = {
    "name": "lsnet-test",
    "sha256": "0" * 64,
    "config": {"labels": [{"value": 1, "name": "Pancreas", "snomed": "15776009"}]},
}


@pytest.fixture(scope="module")
def markups_schema(shared_data):
    path = shared_data.parent / "slicer" / "markups-schema-v1.0.3.json"
    if not path.is_file():
        pytest.skip(f"Slicer markups schema not found at {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def nih(shared_data):
    vol = read_volume(shared_data / NIH_SERIES)
    label = read_label(shared_data / NIH_LABEL, reference=vol)
    return vol, label


def _box_around_canonical_voxels(reo, mask: np.ndarray, k: int) -> RoiBox:
    """Tight canonical box (edge coordinates) around the mask voxels of canonical slice k."""
    rows, cols = np.nonzero(reo.to_canonical_array(mask)[k])
    return RoiBox(k, float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1), 0.9)


def _small_volume() -> Volume:
    """A small oblique-free but permuted/flipped volume (sagittal-like acquisition)."""
    d = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i->P, j->I, k->R
    arr = np.zeros((12, 10, 8), dtype=np.int16)
    return Volume(arr, spacing=(0.9, 1.3, 2.0), origin=(5.0, -7.0, 11.0), direction=d)


def _small_result(vol: Volume, heat: bool = True) -> SegmentationResult:
    mask = np.zeros(vol.shape, np.uint8)
    mask[2:5, 3:6, 1:4] = 1  # big object
    mask[9, 8, 6] = 1  # single voxel, second object
    _, reo = to_canonical(vol)
    return SegmentationResult(
        volume=vol,
        mask=mask,
        heatmap=mask.astype(np.float32) * 0.75 if heat else None,
        boxes=[RoiBox(3, 1.0, 2.0, 4.0, 6.0, 0.8)],
        reorientation=reo,
        model_card=CARD,
    )


# ------------------------------------------------------------------------------------------------
# terminology
# ------------------------------------------------------------------------------------------------
def test_pancreas_terminology_string():
    s = structure_for_label({"value": 1, "name": "Pancreas", "snomed": "15776009"})
    assert s.name == "Pancreas" and s.rgb == (249, 180, 111)
    assert s.terminology.serialize() == PANCREAS_TERM
    assert TerminologyEntry.parse(PANCREAS_TERM) == s.terminology
    # slicerio (the field library) serialises our dict to the same string
    assert slicerio.segmentation.terminology_entry_to_string(s.terminology.to_slicerio()) == PANCREAS_TERM
    with pytest.raises(ValueError):
        TerminologyEntry.parse("only~three~fields")


def test_terminology_table_and_unknown_labels():
    for code, structure in KNOWN_STRUCTURES.items():
        assert structure.terminology.type.value == code
        assert TerminologyEntry.parse(structure.terminology.serialize()) == structure.terminology
    assert structure_for_label({"value": 1, "name": "pancreas"}).terminology.type.value == "15776009"
    unknown = structure_for_label({"value": 3, "name": "Tumour"})
    assert unknown.name == "Tumour" and unknown.terminology is None and len(unknown.rgb) == 3


# ------------------------------------------------------------------------------------------------
# boxes: canonical -> input IJK -> RAS
# ------------------------------------------------------------------------------------------------
def test_box_around_one_voxel_maps_to_that_voxel():
    vol = _small_volume()
    canon, reo = to_canonical(vol)
    i, j, k = 5, 7, 3  # an input voxel
    mask = np.zeros(vol.shape, np.uint8)
    mask[k, j, i] = 1
    kc, jc, ic = np.argwhere(reo.to_canonical_array(mask))[0]  # where the array path puts it
    box = RoiBox(int(kc), float(ic), float(jc), float(ic + 1), float(jc + 1), 1.0)
    ijk = box_corners_ijk(box, reo)
    expected_ijk = np.array([[i + a, j + b, k + c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    assert sorted(map(tuple, np.round(ijk, 9))) == sorted(map(tuple, expected_ijk))
    ras = box_corners_ras(box, vol, reo)
    expected_ras = apply_affine(vol.ijk_to_ras(), expected_ijk)
    np.testing.assert_allclose(sorted(map(tuple, ras)), sorted(map(tuple, expected_ras)), atol=1e-9)
    np.testing.assert_allclose(ras.mean(axis=0), apply_affine(vol.ijk_to_ras(), np.array([i, j, k])), atol=1e-9)
    rec = boxes_to_records([box], vol, reo)[0]
    assert rec["slice_index"] == kc and rec["canonical_xyxy"] == [ic, jc, ic + 1, jc + 1]
    np.testing.assert_allclose(rec["ras_corners"], ras, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# full write on the real NIH case
# ------------------------------------------------------------------------------------------------
def test_write_outputs_nih(nih, tmp_path, markups_schema):
    vol, label = nih
    canon, reo = to_canonical(vol)
    k = 100  # a canonical slice through the pancreas
    box = _box_around_canonical_voxels(reo, label.array, k)
    heat = np.zeros(vol.shape, np.float32)
    heat[label.array > 0] = 0.5
    result = SegmentationResult(vol, label.array, heat, [box], reo, model_card=CARD)
    files = write_outputs(result, tmp_path / "out", nifti=True)
    assert set(files) == {"seg_nrrd", "nifti", "heatmap", "boxes_json", "markups"}
    assert sorted(os.listdir(tmp_path / "out")) == sorted(p.name for p in files.values())  # no temporaries

    # .seg.nrrd through slicerio: geometry, voxels, segment metadata
    seg = slicerio.read_segmentation(str(files["seg_nrrd"]))
    np.testing.assert_allclose(seg["ijkToLPS"], vol.ijk_to_lps(), atol=1e-6)
    assert np.array_equal(seg["voxels"], label.array.transpose(2, 1, 0))
    (segment,) = seg["segments"]
    assert segment["name"] == "Pancreas" and segment["labelValue"] == 1
    np.testing.assert_allclose(segment["color"], np.array([249, 180, 111]) / 255, atol=1e-6)
    assert segment["terminology"]["type"] == ["SCT", "15776009", "Pancreas"]
    assert segment["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    header = nrrd.read_header(str(files["seg_nrrd"]))
    tags = dict(t.split(":", 1) for t in header["Segment0_Tags"].split("|") if t)
    assert TerminologyEntry.parse(tags["TerminologyEntry"]).serialize() == PANCREAS_TERM
    assert header["space"] == "left-posterior-superior"

    # the same file through SimpleITK (what a non-Slicer tool sees)
    img = sitk.ReadImage(str(files["seg_nrrd"]))
    np.testing.assert_allclose(img.GetOrigin(), vol.origin, atol=1e-6)
    np.testing.assert_allclose(img.GetSpacing(), vol.spacing, atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), vol.direction.ravel(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(img), label.array)

    # NIfTI labelmap and heatmap
    nii = read_label(files["nifti"])
    assert nii.same_geometry(vol, tol=1e-5) and np.array_equal(nii.array, label.array)
    himg = sitk.ReadImage(str(files["heatmap"]))
    assert himg.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(himg.GetOrigin(), vol.origin, atol=1e-6)
    np.testing.assert_allclose(himg.GetDirection(), vol.direction.ravel(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(himg), heat)

    # boxes.json: the box's corners enclose exactly the label voxels of that slice
    doc = json.loads(files["boxes_json"].read_text())
    assert doc["version"] == 1 and doc["model"] == {"name": CARD["name"], "sha256": CARD["sha256"]}
    (rec,) = doc["boxes"]
    ijk = np.array(rec["ijk_corners"])
    kin = 239 - k  # canonical slice k is input slice 239 - k (k axis flipped)
    jj, ii = np.nonzero(label.array[kin])
    np.testing.assert_allclose(ijk.min(axis=0), [ii.min() - 0.5, jj.min() - 0.5, kin - 0.5])
    np.testing.assert_allclose(ijk.max(axis=0), [ii.max() + 0.5, jj.max() + 0.5, kin + 0.5])
    np.testing.assert_allclose(rec["ras_corners"], apply_affine(vol.ijk_to_ras(), ijk), atol=1e-5)

    # markups: valid against Slicer's schema, one ROI = the pancreas bounding box in IJK
    mrk = json.loads(files["markups"].read_text())
    jsonschema.validate(mrk, markups_schema)
    (roi,) = mrk["markups"]
    assert roi["type"] == "ROI" and roi["roiType"] == "Box" and roi["name"] == "Pancreas 1"
    assert roi["coordinateSystem"] == "LPS"
    kk, jj, ii = np.nonzero(label.array)
    lo = np.array([ii.min(), jj.min(), kk.min()]) - 0.5
    hi = np.array([ii.max(), jj.max(), kk.max()]) + 0.5
    np.testing.assert_allclose(roi["center"], apply_affine(vol.ijk_to_lps(), (lo + hi) / 2), atol=1e-5)
    np.testing.assert_allclose(roi["size"], (hi - lo) * np.array(vol.spacing), atol=1e-5)
    axes = np.array(roi["orientation"]).reshape(3, 3)  # row-major, columns = ROI axes (LPS)
    np.testing.assert_allclose(np.abs(axes), np.abs(vol.direction), atol=1e-9)
    assert np.linalg.det(axes) > 0


# ------------------------------------------------------------------------------------------------
# markups details on a small permuted volume
# ------------------------------------------------------------------------------------------------
def test_markups_components_and_ras(markups_schema):
    vol = _small_volume()
    res = _small_result(vol)
    doc = roi_markups_dict(res.mask, vol)
    jsonschema.validate(doc, markups_schema)
    names = [m["name"] for m in doc["markups"]]
    assert names == ["Pancreas 1", "Pancreas 2"]  # largest object first
    big, single = doc["markups"]
    assert "27 voxels" in big["controlPoints"][0]["description"]
    # the single voxel (k=9, j=8, i=6): centre at the voxel centre, size = spacing
    np.testing.assert_allclose(single["center"], apply_affine(vol.ijk_to_lps(), np.array([6, 8, 9])), atol=1e-6)
    np.testing.assert_allclose(single["size"], vol.spacing, atol=1e-6)
    # every ROI corner, mapped back to IJK, is a voxel face of the object
    for roi, (lo, hi) in [(big, ([1, 3, 2], [3, 5, 4])), (single, ([6, 8, 9], [6, 8, 9]))]:
        axes = np.array(roi["orientation"]).reshape(3, 3)
        half = np.array(roi["size"]) / 2
        corners = [np.array(roi["center"]) + axes @ (half * (2 * np.array(s) - 1)) for s in np.ndindex(2, 2, 2)]
        ijk = apply_affine(vol.lps_to_ijk(), np.array(corners))
        np.testing.assert_allclose(ijk.min(axis=0), np.array(lo) - 0.5, atol=1e-6)
        np.testing.assert_allclose(ijk.max(axis=0), np.array(hi) + 0.5, atol=1e-6)
    # RAS flavour: x, y of the centre and the first two orientation rows change sign
    ras = roi_markups_dict(res.mask, vol, coordinate_system="RAS")
    jsonschema.validate(ras, markups_schema)
    np.testing.assert_allclose(ras["markups"][0]["center"], np.array(big["center"]) * [-1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(
        np.array(ras["markups"][0]["orientation"]).reshape(3, 3),
        np.diag([-1, -1, 1]) @ np.array(big["orientation"]).reshape(3, 3),
    )


def test_views_from_the_canonical_frame_are_written_correctly(tmp_path):
    """The pipeline produces masks in the canonical frame and maps them back with to_input_array (a
    non-contiguous view): every writer must store the input-order voxels."""
    vol = _small_volume()
    ref = _small_result(vol)
    _, reo = to_canonical(vol)
    canonical_mask = np.ascontiguousarray(reo.to_canonical_array(ref.mask))
    view = reo.to_input_array(canonical_mask)
    assert not view.flags.c_contiguous and np.array_equal(view, ref.mask)
    res = SegmentationResult(vol, view, reo.to_input_array(canonical_mask.astype(np.float32)), [], reo, CARD)
    files = write_outputs(res, tmp_path, nifti=True)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(files["seg_nrrd"]))), ref.mask)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(files["nifti"]))), ref.mask)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(files["heatmap"]))), ref.mask.astype(np.float32))
    assert json.loads(files["boxes_json"].read_text())["boxes"] == []


def test_unlisted_label_gets_its_own_segment(tmp_path):
    vol = _small_volume()
    res = _small_result(vol, heat=False)
    res.mask[9, 8, 6] = 2  # a value the card does not list
    files = write_outputs(res, tmp_path, boxes_json=False)
    assert "heatmap" not in files  # no heatmap in the result
    seg = slicerio.read_segmentation(str(files["seg_nrrd"]))
    assert [(s["name"], s["labelValue"]) for s in seg["segments"]] == [("Pancreas", 1), ("Label 2", 2)]
    assert np.array_equal(slicerio.segment_mask(seg, "Label 2").transpose(2, 1, 0), res.mask == 2)
    names = [m["name"] for m in json.loads(files["markups"].read_text())["markups"]]
    assert names == ["Pancreas 1", "Label 2 1"]


# ------------------------------------------------------------------------------------------------
# no overwrite, overwrite, failure mid-write
# ------------------------------------------------------------------------------------------------
def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_no_overwrite_then_overwrite(tmp_path):
    vol = _small_volume()
    res = _small_result(vol)
    out = tmp_path / "new" / "nested"  # created on demand
    first = write_outputs(res, out, prefix="case1_")
    assert all(p.name.startswith("case1_") for p in first.values())
    before = _snapshot(out)

    res.mask[:] = 0
    res.mask[0, 0, 0] = 1
    with pytest.raises(OutputError) as err:
        write_outputs(res, out, prefix="case1_")
    for p in first.values():
        assert str(p) in str(err.value)
    assert "overwrite" in str(err.value)
    assert _snapshot(out) == before  # untouched

    # a single conflicting file blocks the whole write
    other = tmp_path / "other"
    other.mkdir()
    (other / "boxes.json").write_text("mine")
    with pytest.raises(OutputError, match="boxes.json"):
        write_outputs(res, other)
    assert _snapshot(other) == {"boxes.json": b"mine"}

    again = write_outputs(res, out, prefix="case1_", overwrite=True)
    assert again == first
    after = _snapshot(out)
    assert set(after) == set(before) and after["case1_segmentation.seg.nrrd"] != before["case1_segmentation.seg.nrrd"]
    seg = slicerio.read_segmentation(str(again["seg_nrrd"]))
    assert int(seg["voxels"].sum()) == 1


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("bug")])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, error):
    vol = _small_volume()
    res = _small_result(vol)

    def broken_heatmap(result, path):
        path.write_bytes(b"NRRD0004\npartial")  # a partial file ...
        raise error  # ... then the disk fills up (or a bug)

    monkeypatch.setattr(outputs, "_write_heatmap", broken_heatmap)
    fresh = tmp_path / "fresh"
    expected = OutputError if isinstance(error, OSError) else RuntimeError
    with pytest.raises(expected):
        write_outputs(res, fresh)
    assert list(fresh.iterdir()) == []  # neither finished files nor temporaries

    # with overwrite=True, existing outputs survive a failed rewrite unchanged
    monkeypatch.undo()
    kept = tmp_path / "kept"
    write_outputs(res, kept)
    before = _snapshot(kept)
    monkeypatch.setattr(outputs, "_write_heatmap", broken_heatmap)
    res.mask[:] = 0
    with pytest.raises(expected):
        write_outputs(res, kept, overwrite=True)
    assert _snapshot(kept) == before


def test_output_folder_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        write_outputs(_small_result(_small_volume()), f)


def test_empty_mask_writes_no_markups(tmp_path):
    res = _small_result(_small_volume())
    res.mask[:] = 0
    files = write_outputs(res, tmp_path)
    assert "markups" not in files and "seg_nrrd" in files
    assert not (tmp_path / "rois.mrk.json").exists()
