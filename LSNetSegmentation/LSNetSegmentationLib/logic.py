"""The logic of the LSNetSegmentation module: runs the engine and puts its results in the scene.

Usable without the widget (scripts, the self-test, the web app)::

    from LSNetSegmentationLib.logic import LSNetSegmentationLogic
    logic = LSNetSegmentationLogic()
    logic.setupPythonRequirements()
    result = logic.process(volumeNode)        # blocking; the widget uses startSegmentation()

Segment runs ``lsnet segment --progress-json`` in a child process (``process``), so Slicer stays
responsive and Cancel leaves the scene untouched; the results go into MRML through ``results``.
RoI correction runs S-Net in this process (``lsnet.api.load_segmenter``, which imports torch: only
after ``setupPythonRequirements``).  This file needs Slicer (MRML, ``slicer.util``, a Qt timer);
``LSNetSegmentation.py`` re-exports :class:`LSNetSegmentationLogic`.
"""

import logging
import time
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from . import install, parameters, process, roi_table, workflow
from .parameters import Device, ModelSource
from .workflow import LSNetResult

MODULE_DIR = Path(__file__).resolve().parent.parent


@parameterNodeWrapper
class LSNetSegmentationParameterNode:
    """Settings saved with the scene (defaults and ranges from ``LSNetSegmentationLib.parameters``)."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelSource: ModelSource = parameters.DEFAULT_MODEL_SOURCE
    modelPath: Path
    device: Device = parameters.DEFAULT_DEVICE
    batchSize: Annotated[int, WithinRange(*parameters.BATCH_SIZE_RANGE)] = parameters.DEFAULT_BATCH_SIZE
    dropSmallComponents: bool = parameters.DEFAULT_DROP_SMALL_COMPONENTS
    showHeatmap: bool = parameters.DEFAULT_SHOW_HEATMAP
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = parameters.DEFAULT_HEATMAP_OPACITY
    showRois: bool = parameters.DEFAULT_SHOW_ROIS
    roiCurrentSliceOnly: bool = parameters.DEFAULT_ROI_CURRENT_SLICE_ONLY
    heatmapVolume: vtkMRMLScalarVolumeNode


class LSNetSegmentationLogic(ScriptedLoadableModuleLogic):
    """Runs the engine and puts its results in the scene. Usable without the widget::

        logic = LSNetSegmentationLogic()
        logic.setupPythonRequirements()
        result = logic.process(volumeNode)        # blocking; the widget uses startSegmentation()
    """

    POLL_INTERVAL_MS = 200

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._process: Optional[process.SegmentationProcess] = None
        self._timer = None
        self._outputDir = None
        self._segmenter = None
        self._segmenterKey = None
        self._startTime = None
        self.lastRunSeconds = None
        self.boxesSeen = []

    def getParameterNode(self):
        return LSNetSegmentationParameterNode(super().getParameterNode())

    @staticmethod
    def requirementsPath() -> Path:
        return MODULE_DIR / "Resources" / "requirements.txt"

    def setupPythonRequirements(self, ask: bool = True) -> None:
        """Install PyTorch and the engine's requirements if missing (asks first)."""
        try:
            install.ensure_all(self.requirementsPath(), ask=ask)
        except install.DependencyError as exc:
            if exc.restart_required and slicer.util.confirmYesNoDisplay(str(exc) + "\n" + _("Restart now?")):
                slicer.util.restart()
            raise

    @staticmethod
    def shownVolume():
        """The background volume of the red slice view, else the first scalar volume, else None."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            compositeNode = layoutManager.sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
            volumeId = compositeNode.GetBackgroundVolumeID()
            if volumeId:
                return slicer.mrmlScene.GetNodeByID(volumeId)
        return slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    @staticmethod
    def validateInput(volumeNode) -> None:
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError(_("Select an input CT volume."))
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(_("'{name}' is a label map; select a CT volume.").format(name=volumeNode.GetName()))
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise ValueError(_("'{name}' has {n} components (colour or vector image); LSNet needs a single-component "
                               "CT volume in Hounsfield units.").format(
                name=volumeNode.GetName(), n=volumeNode.GetImageData().GetNumberOfScalarComponents()))

    @staticmethod
    def segmentNamesOfModel() -> list:
        from lsnet.io.terminology import DEFAULT_LABELS, structure_for_label

        return [structure_for_label(label).name for label in DEFAULT_LABELS]

    # --- child process -----------------------------------------------------------------------------------
    @property
    def isRunning(self) -> bool:
        return self._process is not None and not self._process.finished

    def startSegmentation(self, inputVolume, weights, device: str, batchSize: int, onEvent=None, onFinished=None,
                          dropSmallComponents: bool = True) -> None:
        """Write the input to a temporary file and start ``lsnet.app.cli segment`` on it (returns at once)."""
        self.cancel()
        self._outputDir = Path(slicer.util.tempDirectory("LSNetSegmentation"))
        inputFile = self._outputDir / "input.nrrd"
        if not slicer.util.exportNode(inputVolume, str(inputFile), {"useCompression": 0}):
            raise RuntimeError(_("Could not write the input volume to {path}.").format(path=inputFile))
        command = process.build_segment_command(process.find_python_executable(), inputFile, self._outputDir / "out",
                                                weights=weights, device=device, batch_size=batchSize,
                                                drop_small_components=dropSmallComponents)
        env = process.child_environment(slicer.util.startupEnvironment(), MODULE_DIR)
        logging.info("LSNet: %s", " ".join(command))
        self._process = process.SegmentationProcess(command, env=env)
        self._process.start()
        self._startTime = time.monotonic()
        self.boxesSeen = []
        self._onEvent, self._onFinished = onEvent, onFinished
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)
        self._timer.start()

    def _poll(self) -> None:
        proc = self._process
        if proc is None:
            return
        for event in proc.poll():
            if event.kind == "boxes":
                self.boxesSeen += roi_table.boxes_from_dicts(event.data.get("boxes", []))
            if self._onEvent:
                self._onEvent(event)
        if proc.finished:
            self._timer.stop()
            self.lastRunSeconds = time.monotonic() - self._startTime
            if self._onFinished:
                self._onFinished(proc)

    def cancel(self) -> None:
        """Kill a running segmentation; the scene is left as it was."""
        if self._timer is not None:
            self._timer.stop()
        if self._process is not None and not self._process.finished:
            self._process.cancel()
            self._process.poll()

    def process(self, inputVolume, outputSegmentation=None, weights=None, device: str = "auto", batchSize: int = 8,
                replaceExisting: bool = False, showHeatmap: bool = True, heatmapOpacity: float = 0.5,
                timeoutSeconds: Optional[float] = None, dropSmallComponents: bool = True) -> LSNetResult:
        """Blocking segmentation (scripts and tests)."""
        self.validateInput(inputVolume)
        self.startSegmentation(inputVolume, weights, device, batchSize, dropSmallComponents=dropSmallComponents)
        self._timer.stop()
        deadline = None if timeoutSeconds is None else time.monotonic() + timeoutSeconds
        while not self._process.finished:
            self._poll()
            slicer.app.processEvents()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(_("Segmentation did not finish within {s} s.").format(s=timeoutSeconds))
            time.sleep(0.05)
        self._poll()
        self.lastRunSeconds = time.monotonic() - self._startTime
        if not self._process.succeeded:
            raise RuntimeError(process.explain_failure(self._process.error_message(), batchSize, device).message)
        return self.loadResults(self._process, inputVolume, outputSegmentation, replaceExisting, showHeatmap, heatmapOpacity)

    # --- results ----------------------------------------------------------------------------------------
    def loadResults(self, proc, inputVolume, outputSegmentation, replaceExisting: bool, showHeatmap: bool,
                    heatmapOpacity: float) -> LSNetResult:
        result = workflow.load_results(self._outputDir / "out", proc.done_event.data.get("outputs"), inputVolume,
                                       outputSegmentation, replaceExisting, showHeatmap, heatmapOpacity, self.boxesSeen)
        if result.heatmapNode is not None:
            self.getParameterNode().heatmapVolume = result.heatmapNode  # scripts and the widget alike
        return result

    @staticmethod
    def storeBoxes(result: LSNetResult) -> None:
        """Keep the RoI list with the segmentation (saved with the scene)."""
        workflow.store_boxes(result)

    # --- interactive correction (in-process S-Net; imports torch) -------------------------------------------
    def _getSegmenter(self, weights, device: str):
        key = (weights, device)
        if self._segmenter is None or self._segmenterKey != key:
            from lsnet.api import load_segmenter  # torch is imported here, after setupPythonRequirements

            self._segmenter = load_segmenter(weights=weights, device=device, batch_size=1)
            self._segmenterKey = key
        return self._segmenter

    def resegmentBoxes(self, result: LSNetResult, boxes, weights=None, device: str = "auto") -> int:
        """Run S-Net inside each box (one canonical slice each) and replace the mask there; returns changed voxels."""
        return workflow.resegment_boxes(result, self._getSegmenter(weights, device), boxes)

    @staticmethod
    def deleteBoxMask(result: LSNetResult, box) -> int:
        """Erase the segment inside a box on its slice; returns erased voxels."""
        return workflow.delete_box_mask(result, box)

    @staticmethod
    def openSegmentEditor(result: LSNetResult) -> None:
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.util.getModuleWidget("SegmentEditor").editor
        editor.setSegmentationNode(result.segmentationNode)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(result.inputVolume)
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(result.inputVolume)
