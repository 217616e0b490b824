"""Full self-test of LSNetSegmentation, run by a user inside 3D Slicer (needs PyTorch; downloads nothing).

    Python console (adjust the path to your checkout):
        import sys; sys.path.append("/path/to/LSNetSegmentation/LSNetSegmentation/Testing/Python")
        import LSNetSegmentationModuleTest; LSNetSegmentationModuleTest.LSNetSegmentationModuleTest().runTest()

It loads the module's sample CT (NIH Pancreas-CT PANCREAS_0001, reduced, shipped in
``Resources/SampleData``; stored with direction diag(1, -1, -1), not the canonical order), segments it
with the bundled model through the child process, checks the segmentation node (name, terminology,
colour, geometry, overlap with the manual label), the RoI table and markups, the heatmap display,
then moves a RoI, re-segments it, adds one, deletes one and checks the mask changed only inside the
boxes.  ``_phantomVolume`` (a synthetic CT, deterministic) serves quicker checks.  To test on your own
CT instead, load it and call ``test_SegmentLoadedVolume``.
"""

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class LSNetSegmentationModuleTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentSampleInspectCorrect()

    # --- helpers -------------------------------------------------------------------------------------------
    def _phantomVolume(self):
        """Phantom CT stored with i -> Anterior-to-Posterior reversed, k -> Inferior (not canonical)."""
        from lsnet.samples.phantom import make_phantom
        from LSNetSegmentationLib import geometry_bridge

        p = make_phantom(shape=(24, 128, 128), spacing=(1.5, 1.5, 3.0), seed=3, target_scale=1.2)
        array = np.ascontiguousarray(p.array[::-1, ::-1, :])  # flip k and j: stored feet-first, anterior-last
        label = np.ascontiguousarray(p.label[::-1, ::-1, :])
        sx, sy, sz = p.spacing
        K, J, I = array.shape
        direction = np.diag([1.0, -1.0, -1.0])  # LPS: i -> L, j -> A, k -> I
        origin = (-(I - 1) * sx / 2, (J - 1) * sy / 2, (K - 1) * sz)
        ijkToRAS = geometry_bridge.ijk_to_ras_matrix(p.spacing, origin, direction)
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS, "LSNet phantom CT")
        return volume, label

    def _sampleVolume(self):
        """The shipped sample CT and its manual label (array order of the file)."""
        from lsnet.samples.sample_ct import load_sample_ct

        image, label = load_sample_ct()
        volume = slicer.util.addVolumeFromArray(np.ascontiguousarray(image.array), image.ijk_to_ras(), "LSNet sample CT")
        return volume, np.asarray(label.array)

    def _ijkToRAS(self, volume):
        m = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m)
        return slicer.util.arrayFromVTKMatrix(m)

    # --- tests ----------------------------------------------------------------------------------------------
    def test_SegmentSampleInspectCorrect(self):
        from LSNetSegmentation import LSNetSegmentationLogic
        from LSNetSegmentationLib import geometry_bridge, overlay_layout, results
        from LSNetSegmentationLib.parameters import BOXES_ATTRIBUTE

        self.delayDisplay("Loading the sample CT")
        volume, label = self._sampleVolume()
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        logic = LSNetSegmentationLogic()
        logic.setupPythonRequirements(ask=True)

        self.delayDisplay("Segmenting (child process)")
        result = logic.process(volume, device="auto", batchSize=4, timeoutSeconds=600)

        # segmentation node: one standard Pancreas segment on the input grid
        segNode = result.segmentationNode
        self.assertIsNotNone(segNode)
        self.assertEqual(len(result.segmentIds), 1)
        segment = segNode.GetSegmentation().GetSegment(result.segmentIds[0])
        self.assertEqual(segment.GetName(), "Pancreas")
        tag = vtk.mutable("")
        self.assertTrue(segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag))
        self.assertIn("SCT^15776009^Pancreas", str(tag))
        np.testing.assert_allclose(segment.GetColor(), (249 / 255, 180 / 255, 111 / 255), atol=1e-3)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segNode, result.segmentIds[0], volume)
        self.assertEqual(mask.shape, label.shape)
        self.assertGreater(int(mask.sum()), 0, "the model found nothing in the sample CT")
        dice = 2.0 * np.logical_and(mask > 0, label > 0).sum() / max(1, (mask > 0).sum() + (label > 0).sum())
        # this patient is in the bundled model's training data: a low overlap means a broken pipeline
        self.assertGreater(dice, 0.3, f"Dice against the sample's manual label is {dice:.3f}")
        self.delayDisplay(f"Dice against the manual label: {dice:.3f} (a training patient: pipeline check, not accuracy)")

        # RoIs: table, stored with the scene, markups created lazily on the viewed slice only
        table = result.table
        self.assertGreater(len(table), 0)
        self.assertEqual(len(results.RoiMarkups(table, result.canonicalizer).nodes), 0)
        self.assertEqual(roi_json_count(segNode.GetAttribute(BOXES_ATTRIBUTE)), len(table))
        markups = results.RoiMarkups(table, result.canonicalizer, result.folderItem)
        firstRow = table.rows()[0]
        k = firstRow.box.slice_index
        markups.show_slice(k)
        onSlice = {r.id for r in table.rows_on_slice(k)}
        self.assertEqual(set(markups.nodes), onSlice)
        self.assertTrue(all(markups.nodes[i].GetDisplayVisibility() for i in onSlice))
        other = next((s for s in table.slices() if s != k), None)
        if other is not None:
            markups.show_slice(other)
            self.assertTrue(all(not markups.nodes[i].GetDisplayVisibility() for i in onSlice))
            markups.show_slice(k)

        # heatmap: probabilities in [0, 1], displayed as foreground with the colour map
        heat = result.heatmapNode
        self.assertIsNotNone(heat)
        heatArray = slicer.util.arrayFromVolume(heat)
        self.assertEqual(heatArray.shape, mask.shape)
        self.assertGreaterEqual(float(heatArray.min()), 0.0)
        self.assertLessEqual(float(heatArray.max()), 1.0 + 1e-6)
        display = heat.GetDisplayNode()
        self.assertIn(display.GetColorNodeID(), overlay_layout.HEATMAP_COLOR_NODE_IDS)
        self.assertEqual(display.GetColorNodeID(), results.heatmap_color_node_id())  # Inferno where Slicer has it
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(display.GetColorNodeID()))
        composite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), heat.GetID())

        # correct: grow the first RoI by 4 mm each side and re-segment it (instant, in-process S-Net)
        self.delayDisplay("Moving a RoI and re-segmenting it")
        node = markups.node(firstRow.id)
        size = node.GetSize()  # the wrapped getter returns the tuple (GetSize(array) raises TypeError)
        node.SetSize(size[0] + 8.0, size[1] + 8.0, size[2])
        edited = markups.box_from_node(firstRow.id)
        self.assertEqual(edited.source, "user")
        self.assertGreater(edited.width, firstRow.box.width)
        table.update(firstRow.id, edited)
        before = mask.copy()
        logic.resegmentBoxes(result, [edited])
        after = slicer.util.arrayFromSegmentBinaryLabelmap(segNode, result.segmentIds[0], volume)
        self.assertTrue(self._onlyInsideBox(before, after, edited, result.canonicalizer))

        # add a RoI where there is nothing and delete it again with its mask
        self.delayDisplay("Adding and deleting a RoI")
        center = result.canonicalizer.ijk_to_ras @ [20.0, 20.0, k, 1.0]
        added = geometry_bridge.default_box_at(center[:3], result.canonicalizer, size_mm=30.0)
        rowId = table.add(added)
        logic.resegmentBoxes(result, [added])
        logic.deleteBoxMask(result, added)
        table.remove(rowId)
        final = slicer.util.arrayFromSegmentBinaryLabelmap(segNode, result.segmentIds[0], volume)
        canonicalFinal = result.canonicalizer.view(final)
        rows, cols = geometry_bridge.box_pixel_bounds(added, canonicalFinal.shape[1:])
        self.assertEqual(int(canonicalFinal[added.slice_index][rows, cols].sum()), 0)

        # a second run into the same segmentation adds a new segment instead of replacing
        self.delayDisplay("Second run keeps the first segment")
        second = logic.process(volume, outputSegmentation=segNode, batchSize=4, timeoutSeconds=600)
        names = results.segment_names(segNode)
        self.assertIn("Pancreas", names)
        self.assertIn("Pancreas (2)", names)
        self.assertEqual(second.segmentationNode, segNode)
        # ... and updates this volume's heatmap instead of adding a second one
        self.assertEqual(second.heatmapNode.GetID(), heat.GetID())
        heatmaps = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                    if n.GetName().startswith(volume.GetName() + " LSNet heatmap")]
        self.assertEqual(heatmaps, [heat])
        self.delayDisplay("LSNetSegmentation module test passed")

    def test_SegmentLoadedVolume(self):
        """Segment the volume shown in the red view (the user's own CT); checks only that it works."""
        from LSNetSegmentation import LSNetSegmentationLogic

        logic = LSNetSegmentationLogic()
        volume = logic.shownVolume()
        if volume is None:
            self.skipTest("load a CT first")
        logic.setupPythonRequirements(ask=True)
        result = logic.process(volume, timeoutSeconds=1800)
        self.assertIsNotNone(result.segmentationNode)

    @staticmethod
    def _onlyInsideBox(before, after, box, canonicalizer):
        from LSNetSegmentationLib import geometry_bridge

        diff = canonicalizer.view((before > 0) != (after > 0))
        rows, cols = geometry_bridge.box_pixel_bounds(box, diff.shape[1:])
        inside = np.zeros(diff.shape, bool)
        inside[box.slice_index, rows, cols] = True
        return not diff[~inside].any()


def roi_json_count(text):
    import json

    return len(json.loads(text)) if text else 0
