"""The Slicer module on real Slicer code: slicer-core MRML, module logics and storage nodes.

The scene comes from ``Testing/slicer_scene.py`` (real scene, application logic, Volumes /
Segmentations / Markups / SubjectHierarchy / Terminologies logics; shims only for Qt-side pieces).
The module's logic runs its full Segment path: the volume node is exported with the real
``slicer.util.exportNode``, the engine runs in a child process (``python -m lsnet.app.cli``, bundled
model), and the results come back through the real ``loadSegmentation`` / ``loadVolume`` into real
nodes.  Inputs: a reduced crop of the shared NIH Pancreas-CT case PANCREAS_0001 (``realdata``, skipped
without ``../shared/data``) and the module's shipped sample CT (always).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import slicer_scene

_WHY = slicer_scene.import_error()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

PANCREAS_SCT = "15776009"
PANCREAS_RGB = (249 / 255, 180 / 255, 111 / 255)
DICOM_0001 = "pancreas-ct/PANCREAS_0001/11-24-2015-PANCREAS0001-Pancreas-18957/Pancreas-99667"
LABEL_0001 = "pancreas-ct/labels/label0001.nii.gz"


# =====================================================================================================
# fixtures
# =====================================================================================================
@pytest.fixture
def real_scene():
    """A fresh real scene (``slicer.mrmlScene``) with the module importable; torn down safely."""
    with slicer_scene.RealScene() as scene:
        yield scene


@pytest.fixture(scope="session")
def real_ct_crop(shared_data):
    """PANCREAS_0001 reduced to 10 slices x 256 x 256 px around the pancreas (DICOM geometry kept).

    Returns ``(array (K, J, I) int16 HU, IJKToRAS (4, 4), label (K, J, I) uint8)``.
    """
    import SimpleITK as sitk
    from LSNetSegmentationLib import geometry_bridge

    folder = shared_data / DICOM_0001
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    label_full = sitk.ReadImage(str(shared_data / LABEL_0001))
    ct_full_geometry = sitk.Image(512, 512, len(files), sitk.sitkUInt8)
    first, last = sitk.ReadImage(files[0]), sitk.ReadImage(files[-1])
    ct_full_geometry.SetSpacing(first.GetSpacing()[:2] + (abs(last.GetOrigin()[2] - first.GetOrigin()[2]) / (len(files) - 1),))
    ct_full_geometry.SetOrigin(first.GetOrigin())
    ct_full_geometry.SetDirection(sitk.ReadImage(files[:2]).GetDirection())
    label_on_ct = sitk.GetArrayFromImage(sitk.Resample(label_full, ct_full_geometry, sitk.Transform(),
                                                       sitk.sitkNearestNeighbor, 0))
    area = label_on_ct.reshape(label_on_ct.shape[0], -1).sum(axis=1)
    k_mid = int(np.argmax(area))
    ks = slice(max(0, k_mid - 5), max(0, k_mid - 5) + 10)
    ct = sitk.ReadImage(files[ks])
    jj, ii = np.nonzero(label_on_ct[ks].any(axis=0))
    cj, ci = int(jj.mean()), int(ii.mean())
    j0, i0 = int(np.clip(cj - 128, 0, 512 - 256)), int(np.clip(ci - 128, 0, 512 - 256))
    crop = ct[i0:i0 + 256, j0:j0 + 256, :]
    label = sitk.GetArrayFromImage(sitk.Resample(label_full, crop, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    ijk_to_ras = geometry_bridge.ijk_to_ras_matrix(crop.GetSpacing(), crop.GetOrigin(), crop.GetDirection())
    assert label.sum() > 500, "the crop misses the pancreas"
    return sitk.GetArrayFromImage(crop).astype(np.int16), ijk_to_ras, (label > 0).astype(np.uint8)


def _add_volume(array, ijk_to_ras, name):
    import slicer

    return slicer.util.addVolumeFromArray(array, ijk_to_ras, name)


def _sample_volume(name="LSNet sample CT"):
    """The module self-test's CT: the shipped sample (real anatomy, direction diag(1, -1, -1): not the
    canonical order), on which the bundled model finds the pancreas."""
    import LSNetSegmentationModuleTest

    volume, label = LSNetSegmentationModuleTest.LSNetSegmentationModuleTest()._sampleVolume()
    volume.SetName(name)
    return volume, label


def _ijk_to_ras(node) -> np.ndarray:
    import slicer
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def _logic():
    from LSNetSegmentationLib.logic import LSNetSegmentationLogic

    return LSNetSegmentationLogic()


def _run(logic, volume, **kwargs):
    return logic.process(volume, device="cpu", batchSize=4, timeoutSeconds=300, **kwargs)


def _mask(result, segment_id=None):
    import slicer

    return slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, segment_id or result.segmentIds[0],
                                                      result.inputVolume)


def _check_pancreas_terminology(scene, segment):
    """The segment's terminology tag, read back by the real terminologies logic."""
    import slicer
    import vtk

    tag = vtk.mutable("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag), "no terminology tag"
    tag = str(tag)
    entry = slicer.vtkSlicerTerminologyEntry()
    assert scene.terminologies.DeserializeTerminologyEntry(tag, entry), f"not a terminology entry: {tag!r}"
    # look the entry up in Slicer's loaded standard list (fills in the recommended colour)
    assert scene.terminologies.UpdateEntryFromLoadedTerminologies(entry, [], []), f"not in Slicer's standard lists: {tag!r}"
    assert entry.GetTerminologyContextName() == "Segmentation category and type - 3D Slicer General Anatomy list"
    assert entry.GetCategoryObject().GetCodeValue() == "123037004"
    type_ = entry.GetTypeObject()
    assert (type_.GetCodingSchemeDesignator(), type_.GetCodeValue()) == ("SCT", PANCREAS_SCT)
    np.testing.assert_allclose(np.array(type_.GetRecommendedDisplayRGBValue()) / 255.0, PANCREAS_RGB, atol=1e-3)
    np.testing.assert_allclose(segment.GetColor(), PANCREAS_RGB, atol=1e-3)


def _check_geometry(result):
    """Every output node lies on the input's grid (IJK->RAS) and each RoI ROI on its own slice."""
    import slicer
    import vtk
    from LSNetSegmentationLib import results

    expected = _ijk_to_ras(result.inputVolume)
    np.testing.assert_allclose(_ijk_to_ras(result.heatmapNode), expected, atol=1e-6)
    assert slicer.util.arrayFromVolume(result.heatmapNode).shape == slicer.util.arrayFromVolume(result.inputVolume).shape
    labelmap = result.segmentationNode.GetBinaryLabelmapInternalRepresentation(result.segmentIds[0])
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(m), expected, atol=1e-6)
    extent, full = labelmap.GetExtent(), result.inputVolume.GetImageData().GetExtent()
    assert all(extent[2 * a] >= full[2 * a] and extent[2 * a + 1] <= full[2 * a + 1] for a in range(3))
    markups = results.RoiMarkups(result.table, result.canonicalizer, result.folderItem)
    k = result.table.rows()[0].box.slice_index
    markups.show_slice(k)
    for row_id, node in markups.nodes.items():
        centre = [0.0, 0.0, 0.0]
        node.GetCenterWorld(centre)
        index = np.linalg.solve(result.canonicalizer.ijk_to_ras, np.r_[centre, 1.0])
        assert abs(index[2] - k) < 1e-6, "RoI box not centred on its slice"
        size = node.GetSize()
        assert abs(size[2] - result.canonicalizer.spacing[2]) < 1e-6, "RoI box not one slice thick"
    return markups


def _parent(scene, node) -> int:
    sh = scene.scene.GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node)
    assert item, f"{node.GetName()} has no subject-hierarchy item"
    return sh.GetItemParent(item)


# =====================================================================================================
# the module's own in-Slicer self-tests, on real slicer-core
# =====================================================================================================
def test_module_quick_self_test_on_real_scene(real_scene):
    import LSNetSegmentation

    LSNetSegmentation.LSNetSegmentationTest().runTest()


def test_module_full_self_test_on_real_scene(real_scene):
    """``LSNetSegmentation/Testing/Python/LSNetSegmentationModuleTest.py`` as a Slicer user runs it."""
    import LSNetSegmentationModuleTest

    LSNetSegmentationModuleTest.LSNetSegmentationModuleTest().runTest()
    assert real_scene.node_names("vtkMRMLScalarVolumeNode") == ["LSNet sample CT", "LSNet sample CT LSNet heatmap"]


# =====================================================================================================
# the full Segment path on a real CT
# =====================================================================================================
@pytest.mark.realdata
def test_segment_real_ct_full_path(real_scene, real_ct_crop):
    import slicer
    from LSNetSegmentationLib import parameters, results

    array, ijk_to_ras, label = real_ct_crop
    volume = _add_volume(array, ijk_to_ras, "PANCREAS_0001")
    logic = _logic()
    result = _run(logic, volume)

    seg = result.segmentationNode
    assert seg.GetName() == "PANCREAS_0001" + parameters.SEGMENTATION_NODE_SUFFIX
    assert results.segment_names(seg) == ["Pancreas"]
    segment = seg.GetSegmentation().GetSegment(result.segmentIds[0])
    _check_pancreas_terminology(real_scene, segment)
    assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    mask = _mask(result)
    assert mask.shape == array.shape
    dice = 2.0 * np.logical_and(mask > 0, label > 0).sum() / max(1, (mask > 0).sum() + label.sum())
    assert dice > 0.3, f"Dice {dice:.3f} on the real crop: the model or the geometry is off"
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")

    heat = slicer.util.arrayFromVolume(result.heatmapNode)
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > 0.5
    assert len(result.table) > 0 and json.loads(seg.GetAttribute(parameters.BOXES_ATTRIBUTE))
    markups = _check_geometry(result)
    assert markups.nodes

    folder = result.folderItem
    sh = real_scene.scene.GetSubjectHierarchyNode()
    assert sh.GetItemName(folder) == "LSNet results: PANCREAS_0001"
    for node in (seg, result.heatmapNode, *markups.nodes.values()):
        assert _parent(real_scene, node) == folder
    # the parameter node (real vtkMRMLScriptedModuleNode) knows the heatmap, whoever ran Segment
    assert logic.getParameterNode().heatmapVolume.GetID() == result.heatmapNode.GetID()


@pytest.mark.realdata
def test_correct_real_ct_move_add_delete_box(real_scene, real_ct_crop):
    from LSNetSegmentationLib import geometry_bridge, results

    array, ijk_to_ras, _ = real_ct_crop
    volume = _add_volume(array, ijk_to_ras, "PANCREAS_0001")
    logic = _logic()
    result = _run(logic, volume)
    markups = results.RoiMarkups(result.table, result.canonicalizer, result.folderItem)
    row = max(result.table.rows(), key=lambda r: r.box.score)
    markups.show_slice(row.box.slice_index)
    node = markups.node(row.id)
    # the user drags the box 6 mm along the slice's first axis and widens it by 10 mm
    size = node.GetSize()
    centre = [0.0, 0.0, 0.0]
    node.GetCenterWorld(centre)
    axis = result.canonicalizer.ijk_to_ras[:3, 0] / result.canonicalizer.spacing[0]
    node.SetCenterWorld(*(np.array(centre) + 6.0 * axis))
    node.SetSize(size[0] + 10.0, size[1], size[2])
    moved = markups.box_from_node(row.id)
    assert moved.source == "user" and moved.slice_index == row.box.slice_index
    assert moved.width == pytest.approx(row.box.width + 10.0 / result.canonicalizer.spacing[0], abs=1e-3)
    result.table.update(row.id, moved)
    before = _mask(result)
    changed = logic.resegmentBoxes(result, [moved], device="cpu")
    after = _mask(result)
    diff = result.canonicalizer.view((before > 0) != (after > 0))
    rows, cols = geometry_bridge.box_pixel_bounds(moved, diff.shape[1:])
    inside = np.zeros(diff.shape, bool)
    inside[moved.slice_index, rows, cols] = True
    assert int(diff.sum()) == changed and not diff[~inside].any(), "re-segmenting changed voxels outside the box"
    assert result.canonicalizer.view(after)[moved.slice_index][rows, cols].any()

    # add a box in a corner with no organ, re-segment it, delete it: its mask is gone, the rest is kept
    k = row.box.slice_index
    corner = result.canonicalizer.ijk_to_ras @ [24.0, 24.0, k, 1.0]
    added = geometry_bridge.default_box_at(corner[:3], result.canonicalizer, size_mm=20.0)
    row_id = result.table.add(added)
    markups.show_slice(k)
    assert row_id in markups.nodes
    logic.resegmentBoxes(result, [added], device="cpu")
    logic.deleteBoxMask(result, added)
    result.table.remove(row_id)
    markups.remove(row_id)
    final = result.canonicalizer.view(_mask(result))
    rows, cols = geometry_bridge.box_pixel_bounds(added, final.shape[1:])
    assert not final[k][rows, cols].any()
    outside = np.ones(final.shape, bool)
    outside[k, rows, cols] = False
    np.testing.assert_array_equal(final[outside], result.canonicalizer.view(after)[outside])
    assert all(n.GetScene() is not None for n in markups.nodes.values())


# =====================================================================================================
# the five defects found on real MRML, and two runs in a row
# =====================================================================================================
def test_results_go_into_the_folder_even_without_subject_hierarchy_items(real_scene):
    """Under slicer-core (and for nodes added by scripts) a node may have no subject-hierarchy item yet."""
    volume, _ = _sample_volume()
    sh = real_scene.scene.GetSubjectHierarchyNode()
    assert sh.GetItemByDataNode(volume) == 0  # nothing created an item for it
    result = _run(_logic(), volume)
    folder = result.folderItem
    assert folder and sh.GetItemParent(folder) == sh.GetSceneItemID()
    assert _parent(real_scene, result.segmentationNode) == folder
    assert _parent(real_scene, result.heatmapNode) == folder


def test_imported_segment_is_not_auto_named_or_coloured(real_scene):
    volume, _ = _sample_volume()
    result = _run(_logic(), volume)
    segment = result.segmentationNode.GetSegmentation().GetSegment(result.segmentIds[0])
    assert not segment.GetNameAutoGenerated(), "Slicer may rename the segment"
    assert not segment.GetColorAutoGenerated(), "Slicer may recolour the segment"
    _check_pancreas_terminology(real_scene, segment)
    _check_geometry(result)


def test_heatmap_colour_falls_back_when_inferno_is_absent(real_scene):
    import slicer
    from LSNetSegmentationLib import overlay_layout

    # slicer-core ships no colour-table files: the Inferno node does not exist in this scene
    assert real_scene.scene.GetNodeByID(overlay_layout.HEATMAP_COLOR_NODE_ID) is None
    volume, _ = _sample_volume()
    result = _run(_logic(), volume)
    colour_id = result.heatmapNode.GetDisplayNode().GetColorNodeID()
    assert real_scene.scene.GetNodeByID(colour_id) is not None, f"heatmap displayed with missing colour node {colour_id}"
    assert colour_id in overlay_layout.HEATMAP_COLOR_NODE_IDS[1:]

    # with the Inferno node present (as in Slicer), it is used
    inferno = slicer.vtkMRMLColorTableNode()
    inferno.SetTypeToUser()
    inferno.SetNumberOfColors(2)
    inferno.SetColor(0, 0, 0, 0, 1)
    inferno.SetColor(1, 1, 1, 0, 1)
    inferno.SetSingletonTag(real_scene.colors.GetFileColorNodeSingletonTag("Inferno.txt"))
    real_scene.scene.AddNode(inferno)
    assert inferno.GetID() == overlay_layout.HEATMAP_COLOR_NODE_ID
    second = _run(_logic(), volume)
    assert second.heatmapNode.GetDisplayNode().GetColorNodeID() == overlay_layout.HEATMAP_COLOR_NODE_ID


def test_two_runs_in_a_row_no_duplicates_nothing_replaced(real_scene):
    import slicer
    from LSNetSegmentationLib import results

    volume, _ = _sample_volume()
    other, _ = _sample_volume("second CT")
    logic = _logic()
    first = _run(logic, volume)
    first_mask = _mask(first).copy()
    other_result = _run(logic, other)
    # a script runs Segment again (new segmentation), then into the first segmentation
    again = _run(_logic(), volume)
    into = _run(_logic(), volume, outputSegmentation=first.segmentationNode)

    assert real_scene.node_names("vtkMRMLScalarVolumeNode") == sorted([
        "LSNet sample CT", "LSNet sample CT LSNet heatmap", "second CT", "second CT LSNet heatmap"])
    heatmaps = [n for n in real_scene.nodes("vtkMRMLScalarVolumeNode") if n.GetName().endswith("heatmap")]
    assert other_result.heatmapNode in heatmaps, "the other volume's heatmap was removed"
    assert into.heatmapNode.GetID() == first.heatmapNode.GetID() == again.heatmapNode.GetID()
    assert real_scene.node_names("vtkMRMLSegmentationNode") == [
        "LSNet sample CT LSNet segmentation", "LSNet sample CT LSNet segmentation_1", "second CT LSNet segmentation"]
    assert results.segment_names(first.segmentationNode) == ["Pancreas", "Pancreas (2)"]
    np.testing.assert_array_equal(_mask(first, first.segmentIds[0]), first_mask)  # the first result is kept
    assert into.segmentIds != first.segmentIds
    folders = [real_scene.scene.GetSubjectHierarchyNode().GetItemName(r.folderItem) for r in (first, again, into)]
    assert len(set(folders)) == 1 and first.folderItem == into.folderItem
    assert slicer.util.arrayFromVolume(into.heatmapNode).shape == first_mask.shape


def test_save_mrb_and_load_outputs_with_real_storage_nodes(real_scene, tmp_path):
    import slicer
    from LSNetSegmentationLib import parameters, process, results

    volume, _ = _sample_volume()
    logic = _logic()
    result = _run(logic, volume)
    markups = results.RoiMarkups(result.table, result.canonicalizer, result.folderItem)
    markups.show_slice(result.table.rows()[0].box.slice_index)
    mask = _mask(result).copy()

    # the scene as a Slicer bundle, read back into a new real scene
    mrb = tmp_path / "lsnet.mrb"
    assert real_scene.scene.WriteToMRB(str(mrb))
    with slicer_scene.RealScene() as back:  # slicer.mrmlScene is now the new scene
        assert back.scene.ReadFromMRB(str(mrb))
        segs = back.nodes("vtkMRMLSegmentationNode")
        assert [s.GetName() for s in segs] == [result.segmentationNode.GetName()]
        assert json.loads(segs[0].GetAttribute(parameters.BOXES_ATTRIBUTE)) == json.loads(result.table.to_json())
        seg_id = segs[0].GetSegmentation().GetSegmentIdBySegmentName("Pancreas")
        _check_pancreas_terminology(back, segs[0].GetSegmentation().GetSegment(seg_id))
        volume_back = back.scene.GetFirstNodeByName(volume.GetName())
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segs[0], seg_id, volume_back), mask)
        assert len(back.nodes("vtkMRMLMarkupsROINode")) == len(markups.nodes)
        params = back.scene.GetSingletonNode("LSNetSegmentation", "vtkMRMLScriptedModuleNode")
        assert params.GetNodeReference("heatmapVolume").GetName() == result.heatmapNode.GetName()

        # the engine's files, read with Slicer's own storage nodes
        outputs = process.output_paths(logic._outputDir / "out")
        loaded = back.segmentations.LoadSegmentationFromFile(str(outputs["seg_nrrd"]), False)
        assert loaded is not None and results.segment_names(loaded) == ["Pancreas"]
        np.testing.assert_array_equal(
            slicer.util.arrayFromSegmentBinaryLabelmap(loaded, loaded.GetSegmentation().GetNthSegmentID(0), volume_back) > 0,
            mask > 0)
        roi = back.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        storage = back.scene.AddNewNodeByClass("vtkMRMLMarkupsROIJsonStorageNode")
        storage.SetFileName(str(outputs["markups"]))
        assert storage.ReadData(roi)
        corners = slicer.util.arrayFromVolume(volume_back).shape
        centre = np.linalg.solve(_ijk_to_ras(volume_back), np.r_[roi.GetCenterWorld(), 1.0])[:3][::-1]
        assert all(-0.5 <= c <= n - 0.5 for c, n in zip(centre, corners)), "RoI box outside the volume"
        assert all(s > 0 for s in roi.GetSize())
