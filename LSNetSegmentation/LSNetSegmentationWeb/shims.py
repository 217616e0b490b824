"""The Qt-side pieces of Slicer that slicer-core lacks, as far as ``LSNetSegmentationLib`` needs them.

slicer-core (PyPI, Kitware) is Slicer's C++ MRML libraries, module logics and ``slicer/util.py`` without
the Qt application.  ``LSNetSegmentationLib.results`` runs unchanged on it except where ``slicer.util``
goes through the Qt application object:

=====================================  ===============================================================
absent from slicer-core                 shim (SHIM marks each one below)
=====================================  ===============================================================
``slicer.app.coreIOManager()``          ``loadNodes`` for ``VolumeFile`` and ``SegmentationFile`` with
                                        the real Volumes / Segmentations module logics, so the real
                                        ``slicer.util.loadVolume`` / ``loadSegmentation`` run
``slicer.app.layoutManager()``          ``None`` (the web app has no Qt layout; ``setSliceViewerLayers``
                                        with ``fit=False`` does not ask for it)
``slicer.modules.<name>.logic()``      the real Segmentations / Volumes / Markups logics (used by
                                        ``slicer.util.arrayFromSegmentBinaryLabelmap`` and
                                        ``updateSegmentBinaryLabelmapFromArray``)
``slicer.mrmlScene``                    the scene of this process (one scene per ``lsnet web`` process)
subject-hierarchy Qt plugins             a scene observer gives every new data node its subject-hierarchy
                                        item (``results.move_to_folder`` moves that item)
colour file ``Inferno.txt``             slicer-core ships no colour-table files; a real
                                        ``vtkMRMLColorTableNode`` with the singleton tag of that file
                                        (so it gets Slicer's ID ``vtkMRMLColorTableNodeFileInferno.txt``),
                                        filled from matplotlib's inferno anchor colours
``slicer.i18n``                         not shimmed: ``LSNetSegmentationLib.i18n`` already falls back
=====================================  ===============================================================

Nothing else is faked: MRML nodes, storage nodes, slice logics and displayable managers are real.
``install(slicer_app)`` takes a ``trame_slicer.core.SlicerApp`` (scene + application logic + module
logics) and is idempotent.
"""

from __future__ import annotations

import types
from pathlib import Path


class _CoreIOManager:
    """SHIM of ``qSlicerCoreIOManager``: the two file types ``LSNetSegmentationLib.results`` loads."""

    def __init__(self, slicer_app) -> None:
        self._app = slicer_app

    def fileType(self, filename) -> str:  # noqa: N802 - Slicer's name
        return "SegmentationFile" if str(filename).lower().endswith(".seg.nrrd") else "VolumeFile"

    def loadNodes(self, filetype, properties, loadedNodes, userMessages=None) -> bool:  # noqa: N802
        path = Path(str(properties["fileName"]))
        name = properties.get("name") or path.name.split(".")[0]
        scene = self._app.scene
        if filetype == "SegmentationFile":
            node = self._app.segmentations_logic.LoadSegmentationFromFile(path.as_posix(), False)
        elif filetype == "VolumeFile":
            node = self._app.volumes_logic.AddArchetypeVolume(path.as_posix(), scene.GenerateUniqueName(name), 0)
        else:
            if userMessages is not None:
                userMessages.AddMessage(0, f"file type {filetype} is not available in the web app")
            return False
        if node is None:
            if userMessages is not None:
                userMessages.AddMessage(0, f"could not read {path}")
            return False
        if "name" in properties and filetype == "SegmentationFile":
            node.SetName(properties["name"])
        loadedNodes.AddItem(node)
        return True


class _App:
    """SHIM of ``slicer.app`` (``qSlicerApplication``): only what ``slicer.util`` asks of it here."""

    def __init__(self, slicer_app) -> None:
        self._io = _CoreIOManager(slicer_app)
        self._app_logic = slicer_app.app_logic

    def coreIOManager(self):  # noqa: N802
        return self._io

    def applicationLogic(self):  # noqa: N802
        return self._app_logic

    def layoutManager(self):  # noqa: N802
        return None

    def processEvents(self) -> None:  # noqa: N802
        return None


def _add_subject_hierarchy_item(scene, _event, node) -> None:
    """SHIM of the subject-hierarchy plugins: a data node gets an item under the scene when added."""

    if node is None or not node.IsA("vtkMRMLDisplayableNode") or node.GetHideFromEditors():
        return
    sh = scene.GetSubjectHierarchyNode()
    if sh is not None and not sh.GetItemByDataNode(node):
        sh.CreateItem(sh.GetSceneItemID(), node)


INFERNO_ANCHORS = [
    (0.001462, 0.000466, 0.013866), (0.087411, 0.044556, 0.224813), (0.258234, 0.038571, 0.406485),
    (0.416331, 0.090203, 0.432943), (0.578304, 0.148039, 0.404411), (0.735683, 0.215906, 0.330245),
    (0.865006, 0.316822, 0.226055), (0.954506, 0.468744, 0.099874), (0.988362, 0.998364, 0.644924),
]
"""matplotlib's inferno at 0, 1/8, ..., 1 (interpolated linearly to 256 entries)."""


def add_inferno_color_table(scene, color_logic):
    """SHIM of Slicer's ``ColorFiles/Inferno.txt``: the table ``apply_heatmap_display`` refers to by ID."""
    import numpy as np
    import slicer

    tag = color_logic.GetFileColorNodeSingletonTag("Inferno.txt")
    existing = scene.GetSingletonNode(tag, "vtkMRMLColorTableNode")
    if existing is not None:
        return existing
    node = slicer.vtkMRMLColorTableNode()
    node.SetSingletonTag(tag)
    node.SetName("Inferno")
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    anchors = np.asarray(INFERNO_ANCHORS)
    t = np.linspace(0.0, 1.0, len(anchors))
    for i, x in enumerate(np.linspace(0.0, 1.0, 256)):
        r, g, b = (np.interp(x, t, anchors[:, c]) for c in range(3))
        node.SetColor(i, f"inferno {i}", float(r), float(g), float(b), 1.0)
    node.SetHideFromEditors(True)
    scene.AddNode(node)
    return node


def install(slicer_app) -> None:
    """Point ``slicer.mrmlScene`` / ``slicer.app`` / ``slicer.modules`` at ``slicer_app``'s real objects."""
    import slicer
    import vtk

    scene = slicer_app.scene
    if not getattr(scene, "_lsnet_sh_observer", None):
        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_added(caller, event, node):
            _add_subject_hierarchy_item(caller, event, node)

        scene._lsnet_sh_observer = scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, on_node_added)
        scene._lsnet_sh_callback = on_node_added
    add_inferno_color_table(scene, slicer_app.app_logic.GetColorLogic())

    slicer.mrmlScene = slicer_app.scene
    slicer.app = _App(slicer_app)
    logics = {"segmentations": slicer_app.segmentations_logic, "volumes": slicer_app.volumes_logic,
              "markups": getattr(slicer_app, "markups_logic", None)}
    slicer.modules = types.SimpleNamespace(**{
        name: types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in logics.items()})
