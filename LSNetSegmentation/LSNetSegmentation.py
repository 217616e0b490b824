"""LSNetSegmentation: L-SNet pancreas segmentation in CT, with RoIs, heatmaps and interactive correction.

Slicer glue only: the module description, the widget (``Resources/UI/LSNetSegmentation.ui`` bound to
the parameter node) and the quick self-test.  The logic (engine in a child process, results into the
scene) is ``LSNetSegmentationLib.logic``; everything testable without Slicer lives in
``LSNetSegmentationLib``.  PyTorch is imported only after the user presses Segment (or corrects a RoI).
"""

import logging
from typing import Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from LSNetSegmentationLib import geometry_bridge, model_card, parameters, process, results, roi_table
from LSNetSegmentationLib.logic import LSNetResult, LSNetSegmentationLogic, LSNetSegmentationParameterNode  # noqa: F401
from LSNetSegmentationLib.parameters import Device, ModelSource


class LSNetSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LSNet Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LSNetSegmentation contributors"]
        self.parent.helpText = _(
            "Segments the pancreas in CT with L-SNet (region localisation, then scale-invariant segmentation "
            "of each region). Shows the detected regions of interest (RoIs) and the keypoint heatmap per slice, "
            "and lets you move, add or delete RoIs and re-segment them. See the "
            '<a href="https://github.com/lsnet-segmentation/LSNetSegmentation/blob/main/docs/slicer.md">user guide</a>.'
        )
        self.parent.acknowledgementText = _(
            "Implements Xie et al., L-SNet: from region localization to scale invariant medical image "
            "segmentation. Built on 3D Slicer and the PyTorch extension."
        )


#
# Widget
#


class LSNetSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._result: Optional[LSNetResult] = None
        self._markups: Optional[results.RoiMarkups] = None
        self._sliceNode = None
        self._currentSlice = None
        self._cardKey = None
        self._heatmapKey = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LSNetSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LSNetSegmentationLogic()

        self.ui.progressBar.setVisible(False)
        self.ui.roiTableWidget.setHorizontalHeaderLabels([_("Slice"), _("Score"), _("Size")])
        self.ui.roiTableWidget.horizontalHeader().setStretchLastSection(True)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.resegmentButton.connect("clicked(bool)", self.onResegmentButton)
        self.ui.addRoiButton.connect("clicked(bool)", self.onAddRoiButton)
        self.ui.deleteRoiButton.connect("clicked(bool)", self.onDeleteRoiButton)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onSegmentEditorButton)
        self.ui.roiTableWidget.connect("itemSelectionChanged()", self.onRoiSelectionChanged)
        self.ui.roiTableWidget.horizontalHeader().connect("sectionClicked(int)", self.onRoiHeaderClicked)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.logic:
            self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self._setRunning(False)
        self._forgetResult(removeNodes=False)  # the scene removes them
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = self.logic.shownVolume()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self.logic.isRunning
        self.ui.segmentButton.enabled = running or bool(p.inputVolume)
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment")
        self.ui.modelPathLineEdit.enabled = p.modelSource == ModelSource.FILE
        self._updateModelCard()
        if self._result is not None:
            heatmapKey = (p.heatmapVolume.GetID() if p.heatmapVolume else None, p.showHeatmap, p.heatmapOpacity)
            if p.heatmapVolume and heatmapKey != self._heatmapKey:  # only when the heatmap settings change
                self._heatmapKey = heatmapKey
                results.apply_heatmap_display(p.heatmapVolume, self._result.inputVolume, p.showHeatmap, p.heatmapOpacity)
            if self._markups is not None and self._markups.visible != p.showRois:
                self._markups.visible = p.showRois
                self._markups.show_slice(self._currentSlice)
            self._refreshRoiTable()
        self._updateCorrectionButtons()

    def _updateModelCard(self) -> None:
        p = self._parameterNode
        key = (p.modelSource, str(p.modelPath))
        if key == self._cardKey:
            return
        self._cardKey = key
        path = model_card.selected_weights_path(p.modelSource, p.modelPath)
        self.ui.modelCardLabel.text = model_card.format_card(model_card.read_card(path), path)

    # --- segment / cancel -----------------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancel()
            self._setRunning(False)
            self.ui.statusLabel.text = _("Cancelled. The scene was not changed.")
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            self.logic.validateInput(p.inputVolume)
            weights = parameters.weights_argument(p.modelSource, p.modelPath)
            self.ui.statusLabel.text = _("Checking dependencies...")
            self.logic.setupPythonRequirements(ask=True)
            self.logic.startSegmentation(p.inputVolume, weights, p.device.value, p.batchSize,
                                         onEvent=self._onProcessEvent, onFinished=self._onProcessFinished,
                                         dropSmallComponents=p.dropSmallComponents)
            self._setRunning(True)
            self.ui.statusLabel.text = _("Segmenting {name}...").format(name=p.inputVolume.GetName())

    def _setRunning(self, running: bool) -> None:
        self.ui.progressBar.setVisible(running)
        if running:
            self.ui.progressBar.value = 0
        for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.modelSourceComboBox,
                       self.ui.modelPathLineEdit, self.ui.deviceComboBox, self.ui.batchSizeSpinBox,
                       self.ui.dropSmallComponentsCheckBox):
            widget.enabled = not running
        self._onParameterNodeModified()

    def _onProcessEvent(self, event) -> None:
        if event.kind == "progress":
            self.ui.progressBar.value = process.progress_percent(event.data.get("done", 0), event.data.get("total", 0))
            self.ui.statusLabel.text = _("Segmenting: slice {done} of {total}").format(
                done=event.data.get("done", 0), total=event.data.get("total", 0))
        elif event.kind == "log" and event.text.strip():
            logging.info(event.text)

    def _onProcessFinished(self, proc) -> None:
        self._setRunning(False)
        if proc.cancelled:
            return
        p = self._parameterNode
        if not proc.succeeded:
            failure = process.explain_failure(proc.error_message(), p.batchSize, p.device.value)
            self.ui.statusLabel.text = failure.message
            if failure.retry and slicer.util.confirmYesNoDisplay(failure.message, _("Segmentation failed")):
                if "batch_size" in failure.retry:
                    p.batchSize = failure.retry["batch_size"]
                if "device" in failure.retry:
                    p.device = Device(failure.retry["device"])
                self.onSegmentButton()
            elif not failure.retry:
                slicer.util.errorDisplay(failure.message, _("Segmentation failed"))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the results."), waitCursor=True):
            replace = self._askReplaceExisting(p.outputSegmentation)
            self._forgetResult()
            self._result = self.logic.loadResults(proc, p.inputVolume, p.outputSegmentation, replace,
                                                  p.showHeatmap, p.heatmapOpacity)
            p.outputSegmentation = self._result.segmentationNode
            p.heatmapVolume = self._result.heatmapNode
            self._showResult()
            engineSummary = proc.done_event.data.get("summary", {})
            self.ui.statusLabel.text = _("Done: ") + results.describe_result(
                self._result.summary, len(self._result.table), engineSummary.get("device", ""),
                self.logic.lastRunSeconds, engineSummary.get("postprocess", {}).get("removed_slices", 0))

    def _askReplaceExisting(self, segmentationNode) -> bool:
        if segmentationNode is None:
            return False
        existing = results.segment_names(segmentationNode)
        clash = [name for name in self.logic.segmentNamesOfModel() if name in existing]
        if not clash:
            return False
        return slicer.util.confirmYesNoDisplay(
            _("'{segmentation}' already has segment(s) {names}. Replace them?\n"
              "Yes replaces them, No adds the result as new segments.").format(
                segmentation=segmentationNode.GetName(), names=", ".join(clash)),
            _("Replace existing segments?"))

    # --- inspect -----------------------------------------------------------------------------------------
    def _showResult(self) -> None:
        result = self._result
        self._markups = results.RoiMarkups(result.table, result.canonicalizer, result.folderItem)
        self._markups.visible = self._parameterNode.showRois
        self._sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        self.addObserver(self._sliceNode, vtk.vtkCommand.ModifiedEvent, self._onSliceModified)
        maximum = result.canonicalizer.shape[0] - 1
        for spin in (self.ui.firstSliceSpinBox, self.ui.lastSliceSpinBox):
            spin.maximum = maximum
        self._currentSlice = None
        self._onSliceModified()
        self._refreshRoiTable()
        self._updateCorrectionButtons()

    def _forgetResult(self, removeNodes: bool = True) -> None:
        if self._sliceNode is not None:
            self.removeObserver(self._sliceNode, vtk.vtkCommand.ModifiedEvent, self._onSliceModified)
            self._sliceNode = None
        if self._markups is not None and removeNodes:
            self._markups.clear()
        self._markups = None
        self._result = None
        self._heatmapKey = None
        self.ui.roiTableWidget.setRowCount(0)
        self._updateCorrectionButtons()

    def _onSliceModified(self, caller=None, event=None) -> None:
        if self._result is None or self._sliceNode is None:
            return
        k = self._result.canonicalizer.slice_of_ras(results.current_slice_center_ras(self._sliceNode))
        if k == self._currentSlice:
            return
        self._currentSlice = k
        self._markups.show_slice(k)
        if self._parameterNode.roiCurrentSliceOnly:
            self._refreshRoiTable()

    def _refreshRoiTable(self) -> None:
        table = self.ui.roiTableWidget
        if self._result is None:
            table.setRowCount(0)
            return
        selected = self._selectedRoiId()
        onlySlice = self._currentSlice if self._parameterNode.roiCurrentSliceOnly else None
        rows = self._result.table.display_rows(onlySlice)
        wasBlocked = table.blockSignals(True)
        table.setRowCount(len(rows))
        for r, (rowId, texts) in enumerate(rows):
            for c, text in enumerate(texts):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, rowId)
                table.setItem(r, c, item)
            if rowId == selected:
                table.selectRow(r)
        table.blockSignals(wasBlocked)

    def onRoiHeaderClicked(self, column: int) -> None:
        if self._result is None:
            return
        key = roi_table.COLUMNS[column]
        table = self._result.table
        table.set_sort(key, descending=not table.descending if table.sort_key == key else key != "slice")
        self._refreshRoiTable()

    def _selectedRoiId(self) -> Optional[int]:
        items = self.ui.roiTableWidget.selectedItems()
        return int(items[0].data(qt.Qt.UserRole)) if items else None

    def onRoiSelectionChanged(self) -> None:
        rowId = self._selectedRoiId()
        if self._markups is not None:
            self._markups.select(rowId)
        if rowId is not None and self._result is not None:
            box = self._result.table.row(rowId).box
            self.ui.firstSliceSpinBox.value = box.slice_index
            self.ui.lastSliceSpinBox.value = box.slice_index
            x, y, z = self._result.table.jump_target_ras(rowId, self._result.canonicalizer.ijk_to_ras)
            slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)
            self._markups.node(rowId)  # make sure it exists even if the red view is not axial
        self._updateCorrectionButtons()

    # --- correct -----------------------------------------------------------------------------------------
    def _updateCorrectionButtons(self) -> None:
        hasResult = self._result is not None and not self.logic.isRunning
        hasSelection = hasResult and self._selectedRoiId() is not None
        self.ui.resegmentButton.enabled = hasSelection
        self.ui.deleteRoiButton.enabled = hasSelection
        self.ui.addRoiButton.enabled = hasResult
        self.ui.segmentEditorButton.enabled = hasResult

    def onResegmentButton(self) -> None:
        rowId = self._selectedRoiId()
        if rowId is None:
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Re-segmentation failed."), waitCursor=True):
            self.logic.setupPythonRequirements(ask=True)
            box = self._markups.box_from_node(rowId)
            self._result.table.update(rowId, box)
            first, last = sorted((self.ui.firstSliceSpinBox.value, self.ui.lastSliceSpinBox.value))
            boxes = [roi_table.with_slice(box, k) for k in range(first, last + 1)]
            changed = self.logic.resegmentBoxes(self._result, boxes, parameters.weights_argument(p.modelSource, p.modelPath),
                                                p.device.value)
            for extra in boxes:
                if extra.slice_index != box.slice_index:
                    self._result.table.add(extra)
            self.logic.storeBoxes(self._result)
            self._markups.refresh(rowId)
            self._markups.show_slice(self._currentSlice)
            self._refreshRoiTable()
            self.ui.statusLabel.text = _("Re-segmented {n} slice(s); {changed} voxels changed.").format(
                n=len(boxes), changed=changed)

    def onAddRoiButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not add a RoI here."), waitCursor=False):
            ras = results.current_slice_center_ras(self._sliceNode)
            box = geometry_bridge.default_box_at(ras, self._result.canonicalizer)
            rowId = self._result.table.add(box)
            self.logic.storeBoxes(self._result)
            self._markups.show_slice(self._currentSlice)
            self._markups.node(rowId)
            self._refreshRoiTable()
            self._selectRow(rowId)
            self.ui.statusLabel.text = _("RoI added on slice {k}: move/resize it, then click Re-segment.").format(
                k=box.slice_index)

    def _selectRow(self, rowId: int) -> None:
        table = self.ui.roiTableWidget
        for r in range(table.rowCount):
            if int(table.item(r, 0).data(qt.Qt.UserRole)) == rowId:
                table.selectRow(r)
                return

    def onDeleteRoiButton(self) -> None:
        rowId = self._selectedRoiId()
        if rowId is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not delete the RoI."), waitCursor=True):
            box = self._markups.box_from_node(rowId)
            changed = self.logic.deleteBoxMask(self._result, box)
            self._result.table.remove(rowId)
            self._markups.remove(rowId)
            self.logic.storeBoxes(self._result)
            self._refreshRoiTable()
            self.ui.statusLabel.text = _("RoI deleted; {changed} voxels erased on slice {k}.").format(
                changed=changed, k=box.slice_index)

    def onSegmentEditorButton(self) -> None:
        self.logic.openSegmentEditor(self._result)


#
# Test
#


class LSNetSegmentationTest(ScriptedLoadableModuleTest):
    """Quick tests that need neither PyTorch nor a download (run by Slicer's CI).

    The full segment -> inspect -> correct test is ``Testing/Python/LSNetSegmentationModuleTest.py``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ParameterDefaults()
        self.setUp()
        self.test_RoiMarkupsRoundTrip()

    def test_ParameterDefaults(self):
        node = LSNetSegmentationLogic().getParameterNode()
        self.assertEqual(node.device, parameters.DEFAULT_DEVICE)
        self.assertEqual(node.batchSize, parameters.DEFAULT_BATCH_SIZE)
        self.assertEqual(node.dropSmallComponents, parameters.DEFAULT_DROP_SMALL_COMPONENTS)
        self.assertEqual(node.modelSource, ModelSource.BUNDLED)

    def test_RoiMarkupsRoundTrip(self):
        """A box drawn as a markups ROI on an oblique-ordered volume reads back as the same box."""
        import numpy as np
        from lsnet.results import RoiBox

        ijkToRAS = np.array([[0.0, 0.0, 2.5, -40.0], [-0.8, 0.0, 0.0, 60.0], [0.0, 0.8, 0.0, -20.0], [0, 0, 0, 1]])
        volume = slicer.util.addVolumeFromArray(np.zeros((64, 32, 48), np.int16), ijkToRAS, "roundtrip")
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        canonicalizer = geometry_bridge.Canonicalizer(slicer.util.arrayFromVTKMatrix(matrix), (64, 32, 48))
        table = roi_table.RoiTableModel([RoiBox(5, 10.0, 12.0, 30.0, 20.0, 0.9)])
        markups = results.RoiMarkups(table, canonicalizer)
        markups.show_slice(5)
        back = markups.box_from_node(0)
        self.assertEqual(back.slice_index, 5)
        self.assertAlmostEqual(back.x0, 10.0, places=3)
        self.assertAlmostEqual(back.y1, 20.0, places=3)
        self.assertEqual(back.source, "lnet")
        markups.show_slice(6)
        self.assertFalse(markups.node(0).GetDisplayVisibility())
        self.delayDisplay(_("RoI round trip passed"))
