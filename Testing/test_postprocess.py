"""Volume post-processing (lsnet/postprocess.py): large 3-D components kept, their RoIs, and its wiring into
Segmenter / CLI / the Slicer command line."""

import json

import numpy as np
import pytest
import torch

from LSNetSegmentationLib import process
from lsnet.app.cli import main as cli_main
from lsnet.io.volume import volume_from_array
from lsnet.pipeline.inference import Segmenter
from lsnet.pipeline.postprocess import boxes_on_mask, keep_large_components
from lsnet.results import RoiBox

from test_inference import eager_model


def two_blobs(shape=(10, 40, 40)):
    """A 3-D mask with a large object (slices 2-7) and a small one (slice 9), label 1."""
    m = np.zeros(shape, np.uint8)
    m[2:8, 5:20, 5:20] = 1
    m[9, 30:34, 30:34] = 1
    return m


def test_keeps_the_drop_small_components_in_place():
    m = two_blobs()
    big = m.copy()
    big[9] = 0
    report = keep_large_components(m)
    np.testing.assert_array_equal(m, big)
    assert report.as_dict() == {"removed_voxels": 16, "removed_components": 1, "removed_slices": 1}


def test_components_of_a_quarter_of_the_largest_are_kept():
    m = np.zeros((12, 20, 20), np.uint8)
    m[0:4, 0:10, 0:10] = 1  # 400 voxels: the largest
    m[6, 0:10, 0:10] = 1  # 100 = 25 %: kept
    m[8, 0:9, 0:10] = 1  # 90 = 22.5 %: dropped
    m[10, 0:10, 0:10] = 2  # another label: its own largest, kept
    report = keep_large_components(m)
    assert m[6].sum() == 100 and m[8].sum() == 0 and m[10].sum() == 200
    assert report.as_dict() == {"removed_voxels": 90, "removed_components": 1, "removed_slices": 1}


def test_diagonal_neighbours_are_connected_26():
    m = np.zeros((4, 8, 8), np.uint8)
    m[0, 1, 1] = m[1, 2, 2] = m[2, 3, 3] = 1  # corner-to-corner chain: one 26-connected object
    m[3, 7, 7] = 1
    keep_large_components(m, min_fraction=1.0)
    assert m.sum() == 3 and m[3, 7, 7] == 0


def test_each_label_keeps_its_own_drop_small_components():
    m = two_blobs()
    m[2:4, 30:38, 2:10] = 2  # label 2: a large blob ...
    m[0, 0, 39] = 2  # ... and a stray voxel
    keep_large_components(m)
    assert (m == 1).sum() == 6 * 15 * 15  # label 1: small blob gone
    assert (m == 2).sum() == 2 * 8 * 8 and m[0, 0, 39] == 0


def test_ties_keep_the_first_component_and_empty_masks_are_untouched():
    m = np.zeros((3, 10, 10), np.uint8)
    m[0, 0:2, 0:2] = 1
    m[2, 8:10, 8:10] = 1
    keep_large_components(m)  # equal sizes: both kept by the default fraction
    assert m[0].sum() == 4 and m[2].sum() == 4
    keep_large_components(m, min_fraction=1.0)  # largest only: the first in label order
    assert m[0].sum() == 4 and m[2].sum() == 0
    empty = np.zeros((3, 5, 5), np.uint8)
    assert keep_large_components(empty).removed_voxels == 0
    with pytest.raises(ValueError, match="3-D"):
        keep_large_components(np.zeros((5, 5), np.uint8))


def test_boxes_follow_the_kept_mask_including_the_margin():
    m = two_blobs()
    keep_large_components(m)
    on_big = RoiBox(4, 6.0, 6.0, 18.0, 18.0, 0.9)
    on_small = RoiBox(9, 30.0, 30.0, 34.0, 34.0, 0.8)
    beside_big = RoiBox(4, 21.0, 21.0, 25.0, 25.0, 0.7)  # 1 px off the kept object ...
    with_margin = RoiBox(4, 21.0, 21.0, 25.0, 25.0, 0.7, margin_px=4.0)  # ... but its S-Net region reaches it
    outside = RoiBox(20, 0.0, 0.0, 5.0, 5.0, 0.6)
    assert boxes_on_mask([on_big, on_small, beside_big, with_margin, outside], m) == [on_big, with_margin]


# ------------------------------------------------------------------ wiring into the volume pipeline
def scripted_segmenter(drop_small_components: bool) -> Segmenter:
    """A Segmenter whose per-batch network output is replaced by a known mask with two objects and a
    box on each, so the volume step's effect on the result is exactly predictable."""
    seg = Segmenter(model=eager_model(), device="cpu", batch_size=4, drop_small_components=drop_small_components)
    truth = two_blobs((10, 40, 40))

    def run_batch(raw, grid, want_heatmap):
        b = raw.shape[0]
        start = int(raw[0, 0, 0, 0])  # the test volume stores the slice index in pixel (0, 0)
        m = truth[start : start + b]
        heat = m.astype(np.float32) if want_heatmap else None
        bidx, bxy = [], []
        for i in range(b):
            if (start + i) in (4, 9):
                bidx.append(i)
                bxy.append([6.0, 6.0, 18.0, 18.0] if start + i == 4 else [30.0, 30.0, 34.0, 34.0])
        return m, heat, np.array(bidx, np.int64), np.array(bxy, np.float32).reshape(-1, 4), np.full(len(bidx), 0.9, np.float32)

    seg._run_batch = run_batch
    return seg


def index_volume(k=10, hw=40):
    arr = np.full((k, hw, hw), -100, np.int16)
    arr[:, 0, 0] = np.arange(k)
    return volume_from_array(arr, spacing=(1.0, 1.0, 2.0))


def test_segmenter_applies_the_volume_step_by_default_and_can_skip_it():
    vol = index_volume()
    on = scripted_segmenter(True).segment_volume(vol)
    off = scripted_segmenter(False).segment_volume(vol)
    assert int(off.mask.sum()) == int(two_blobs().sum()) and off.postprocess == {}
    assert [b.slice_index for b in off.boxes] == [4, 9]
    assert int(on.mask.sum()) == 6 * 15 * 15 and not on.mask[9].any()
    assert [b.slice_index for b in on.boxes] == [4]
    assert on.postprocess == {"step": "large_components", "removed_voxels": 16, "removed_components": 1,
                              "removed_slices": 1, "removed_rois": 1}
    assert on.heatmap[9].any()  # the heatmap keeps everything L-Net found
    assert (on.slices_with_mask, off.slices_with_mask) == (6, 7)


def test_one_slice_volumes_are_not_post_processed():
    seg = Segmenter(model=eager_model(), device="cpu", drop_small_components=True)
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 0, 0] = mask[0, 5, 5] = 1
    boxes, report = seg._postprocess_volume(mask, mask, [], {})
    assert report == {} and mask.sum() == 2


def test_cli_flag_and_slicer_command_line(tmp_path):
    cmd = process.build_segment_command("python", "in.nrrd", "out", drop_small_components=False)
    assert cmd[-1] == "--all-components"
    assert "--all-components" not in process.build_segment_command("python", "in.nrrd", "out")
    # the flag reaches the engine: boxes.json records whether the step ran
    from lsnet.io.weights import save_model
    import SimpleITK as sitk

    weights = tmp_path / "m.safetensors"
    save_model(eager_model(), weights)
    img = sitk.GetImageFromArray(np.full((3, 48, 48), 40, np.int16))
    img.SetSpacing((2.0, 2.0, 3.0))
    src = tmp_path / "ct.nrrd"
    sitk.WriteImage(img, str(src))
    for flag, expect_step in (([], True), (["--all-components"], False)):
        out = tmp_path / f"out{len(flag)}"
        assert cli_main(["segment", str(src), "-o", str(out), "--weights", str(weights), "--device", "cpu", "-q", *flag]) == 0
        doc = json.loads((out / "boxes.json").read_text())
        assert ("step" in doc["postprocess"]) is expect_step


def test_evaluate_volumes_scores_both_steps(tmp_path):
    """training.evaluate_volumes: the engine path on a labelled and an unlabelled phantom CT."""
    import csv

    import SimpleITK as sitk

    from lsnet.samples.phantom import make_phantom_volume
    from lsnet.io.weights import save_model
    from training.evaluate_volumes import main as evaluate_volumes

    img, lab = make_phantom_volume(shape=(8, 80, 80), spacing=(2.0, 2.0, 3.0), seed=5)
    ct, label = tmp_path / "ct.nrrd", tmp_path / "label.nrrd"
    sitk.WriteImage(img.to_sitk(), str(ct))
    sitk.WriteImage(lab.to_sitk(), str(label))
    weights = save_model(eager_model(), tmp_path / "m.safetensors")
    out = tmp_path / "res"
    assert evaluate_volumes(["--weights", str(weights), "--case", f"{ct}={label}", "--case", str(ct),
                             "--out", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "volumes.csv")))
    assert [(r["case"], r["step"]) for r in rows] == [("ct.nrrd", "none"), ("ct.nrrd", "large_components")] * 2
    raw, lcc, raw_u, lcc_u = rows
    assert int(raw["label_slices"]) == int(lab.array.any(axis=(1, 2)).sum()) and raw["vol_dsc"] != ""
    assert int(lcc["slices_with_mask"]) <= int(raw["slices_with_mask"]) <= 8
    assert raw_u["vol_dsc"] == "" and raw_u["slices_with_mask"] == raw["slices_with_mask"]
    if raw["fp_slice_rate"] != "":
        assert float(lcc["fp_slice_rate"]) <= float(raw["fp_slice_rate"])
    assert "large_components" in (out / "volumes.md").read_text()


def test_present_labels():
    from lsnet.results import present_labels

    m = np.zeros((2, 3, 3), np.uint8)
    assert present_labels(m) == []
    m[0, 0, 0] = 1
    assert present_labels(m) == [1]
    m[1, 2, 2] = 5
    m[1, 0, 1] = 2
    assert present_labels(m) == [1, 2, 5]
