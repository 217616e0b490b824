"""A real Slicer scene without the Slicer application, for tests and the screenshot script.

Everything MRML is real: ``slicer-core`` (PyPI, Kitware) provides Slicer's C++ libraries that need no
Qt -- the scene, nodes, storage nodes, the Volumes / Segmentations / Markups / SubjectHierarchy /
Terminologies / Colors module logics, slice logics -- and Slicer's own ``slicer/util.py``.  What
slicer-core lacks is the Qt side of Slicer; :func:`install_shims` puts minimal stand-ins for exactly
those pieces into ``sys.modules`` / the ``slicer`` package, each marked ``SHIM`` below:

==========================================  ======================================================
Qt-side piece (absent from slicer-core)     shim
==========================================  ======================================================
``qt`` (PythonQt)                           ``qt.QTimer`` only (the logic polls its child process
                                            with one); it never fires: there is no event loop,
                                            ``Logic.process`` polls by itself
``slicer.i18n``                             ``tr`` / ``translate`` return the text
``slicer.ScriptedLoadableModule``           the four base classes; the logic's
                                            ``getParameterNode`` returns a real singleton
                                            ``vtkMRMLScriptedModuleNode`` as Slicer's does
``slicer.parameterNodeWrapper``             typed properties stored in that real node (node
                                            fields as node references, the rest as parameters)
``slicer.app``                              ``layoutManager()`` over the real slice logics,
                                            ``processEvents()`` (no-op), ``startupEnvironment()``,
                                            ``coreIOManager()``: reads/writes with the real logics
                                            and storage nodes, so the real ``slicer.util.
                                            loadVolume / loadSegmentation / loadMarkups /
                                            exportNode`` run unchanged
``slicer.util.tempDirectory``               a fresh folder under :data:`TEMP_ROOT` (the real
                                            one needs ``qt.QDir``)
``slicer.modules``                          ``<name>.logic()`` for the real module logics
==========================================  ======================================================

Usage (tests: the ``real_scene`` fixture of ``Testing/test_slicer_real.py``)::

    import slicer_scene
    scene = slicer_scene.RealScene()          # shims installed once; slicer.mrmlScene = scene.scene
    volume = slicer.util.addVolumeFromArray(array_kji, ijkToRAS, "CT")
    logic = LSNetSegmentationLogic()           # the module's real logic on the real scene

:func:`import_error` says why slicer-core cannot be imported (another platform), so tests can skip
with that message; on Linux x86-64 with the ``test`` extra it imports.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import tempfile
import types
import typing
import unittest
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "LSNetSegmentation"
MODULE_TEST_DIR = MODULE_DIR / "Testing" / "Python"
TEMP_ROOT = Path(tempfile.gettempdir()) / "lsnet-slicer-scene"
SLICE_VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


def import_error() -> Optional[str]:
    """None when slicer-core imports, else a message saying why (for ``pytest.skip``)."""
    try:
        import slicer

        slicer.vtkMRMLScene  # noqa: B018 - the C++ libraries, not only the namespace package
        slicer.vtkSlicerSegmentationsModuleLogic  # noqa: B018
    except (ImportError, AttributeError) as exc:
        return (f"slicer-core cannot be imported on this platform ({exc}); install the test extra "
                f"(pip install -e '.[test]', which brings trame-slicer[standalone]==2.0.0)")
    return None


def terminologies_dir() -> Path:
    """Slicer's standard terminology lists as shipped by trame-slicer (found without importing trame)."""
    import importlib.util

    spec = importlib.util.find_spec("trame_slicer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("trame-slicer is not installed: pip install 'trame-slicer[standalone]==2.0.0'")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "terminologies"


# =====================================================================================================
# SHIMS: Qt-side pieces only
# =====================================================================================================
class _QTimer:
    """SHIM of ``qt.QTimer``: remembers interval, slot and state; never fires (no Qt event loop)."""

    def __init__(self, parent=None):
        self.interval, self.slots, self.active = 0, [], False

    def setInterval(self, msec: int) -> None:  # noqa: N802 - Qt names
        self.interval = int(msec)

    def connect(self, signal: str, slot) -> None:
        self.slots.append((signal, slot))

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:  # noqa: N802
        return self.active


def _tr(text: str) -> str:
    return text


def _translate(context: str, text: str) -> str:
    return text


class _ScriptedLoadableModule:
    """SHIM of ``slicer.ScriptedLoadableModule.ScriptedLoadableModule``."""

    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__


class _ScriptedLoadableModuleWidget:
    """SHIM: the widget needs Qt and is never run here."""

    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__.removesuffix("Widget")


class _ScriptedLoadableModuleLogic:
    """SHIM of ``ScriptedLoadableModuleLogic``: the parameter node is a real singleton scripted-module node."""

    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.AddNode(self.createParameterNode())
        return node

    def createParameterNode(self):
        import slicer

        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(self.moduleName)
        node.SetModuleName(self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class _ScriptedLoadableModuleTest(unittest.TestCase):
    """SHIM of ``ScriptedLoadableModuleTest``: ``delayDisplay`` logs instead of showing a message box."""

    def delayDisplay(self, message, requestedDelay=None, msec=None):  # noqa: N802
        logging.info("self-test: %s", message)


class _WithinRange:
    """SHIM of ``parameterNodeWrapper.WithinRange``: rejects values outside [minimum, maximum]."""

    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value} is not within [{self.minimum}, {self.maximum}]")


def _parameterNodeWrapper(cls):  # noqa: N802
    """SHIM of ``@parameterNodeWrapper``: typed properties stored in the real ``vtkMRMLScriptedModuleNode``.

    Node-typed fields are node references (as in Slicer), ``bool/int/float/str/Path/Enum`` fields are
    string parameters; unset fields read as their default.  Enough for the module's parameter node,
    not a re-implementation (no GUI connection, packs or other types).
    """
    import slicer

    hints = typing.get_type_hints(cls, include_extras=True)
    namespace = {"__doc__": cls.__doc__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}

    def make_property(name, annotation):
        validators = []
        if typing.get_origin(annotation) is typing.Annotated:
            annotation, *validators = typing.get_args(annotation)
        default = cls.__dict__.get(name, Path() if annotation is Path else None)
        if isinstance(annotation, type) and issubclass(annotation, slicer.vtkMRMLNode):
            def get(self):
                return self.parameterNode.GetNodeReference(name)

            def set_(self, value):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            return property(get, set_)

        def parse(text):
            if annotation is bool:
                return text == "True"
            if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
                return annotation(text)
            return annotation(text)

        def get(self):
            text = self.parameterNode.GetParameter(name)
            return parse(text) if text else default

        def set_(self, value):
            for v in validators:
                v.validate(value)
            text = value.value if isinstance(value, enum.Enum) else str(value)
            self.parameterNode.SetParameter(name, text)
        return property(get, set_)

    for field_name, annotation in hints.items():
        namespace[field_name] = make_property(field_name, annotation)

    def __init__(self, parameterNode):  # noqa: N807
        self.parameterNode = parameterNode

    namespace["__init__"] = __init__
    return type(cls.__name__, (), namespace)


class _Environment:
    """SHIM of the ``QProcessEnvironment`` that ``slicer.app.startupEnvironment()`` returns."""

    def __init__(self, env: dict):
        self._env = dict(env)

    def keys(self):
        return list(self._env)

    def value(self, key):
        return self._env.get(key, "")


class _SliceWidget:
    """SHIM of ``qMRMLSliceWidget``: only its real slice logic and slice node."""

    def __init__(self, sliceLogic):
        self._logic = sliceLogic

    def sliceLogic(self):  # noqa: N802
        return self._logic

    def mrmlSliceNode(self):  # noqa: N802
        return self._logic.GetSliceNode()


class _LayoutManager:
    """SHIM of ``qSlicerLayoutManager``: the application logic's real slice logics, by view name."""

    def __init__(self, appLogic):
        self._appLogic = appLogic

    def _logics(self):
        logics = self._appLogic.GetSliceLogics()
        return [logics.GetItemAsObject(i) for i in range(logics.GetNumberOfItems())] if logics else []

    def sliceViewNames(self):  # noqa: N802
        return [logic.GetSliceNode().GetLayoutName() for logic in self._logics() if logic.GetSliceNode()]

    def sliceWidget(self, name):  # noqa: N802
        for logic in self._logics():
            if logic.GetSliceNode() is not None and logic.GetSliceNode().GetLayoutName() == name:
                return _SliceWidget(logic)
        return None

    def mrmlSliceLogics(self):  # noqa: N802
        return self._appLogic.GetSliceLogics()


class _CoreIOManager:
    """SHIM of ``qSlicerCoreIOManager``: file types the module reads/writes, with the real logics and storage nodes.

    VolumeFile -> ``vtkSlicerVolumesLogic.AddArchetypeVolume``, SegmentationFile ->
    ``vtkSlicerSegmentationsModuleLogic.LoadSegmentationFromFile``, MarkupsFile ->
    ``vtkSlicerMarkupsLogic.LoadMarkups``; export -> the node's default storage node (``WriteData``).
    """

    def __init__(self, scene: "RealScene"):
        self._scene = scene

    @staticmethod
    def fileType(filename) -> str:  # noqa: N802
        name = str(filename).lower()
        if name.endswith(".seg.nrrd"):
            return "SegmentationFile"
        if name.endswith(".mrk.json"):
            return "MarkupsFile"
        return "VolumeFile"

    def loadNodes(self, fileType, properties, loadedNodes, userMessages) -> bool:  # noqa: N802
        import slicer

        path = properties["fileName"]
        name = properties.get("name")
        if fileType == "VolumeFile":
            stem = Path(path).name.split(".")[0]
            node = self._scene.volumes.AddArchetypeVolume(path, name or stem, 1 if properties.get("labelmap") else 0)
            if node is not None and properties.get("show", True):
                slicer.util.setSliceViewerLayers(background=node)
        elif fileType == "SegmentationFile":
            node = self._scene.segmentations.LoadSegmentationFromFile(path, True, name) if name else \
                self._scene.segmentations.LoadSegmentationFromFile(path, True)
        elif fileType == "MarkupsFile":
            node = self._scene.scene.GetNodeByID(self._scene.markups.LoadMarkups(path, name or Path(path).stem))
        else:
            userMessages.AddMessage(3, f"SHIM: file type {fileType} not supported")  # vtkCommand::ErrorEvent-ish
            return False
        if node is None:
            return False
        loadedNodes.AddItem(node)
        return True

    @staticmethod
    def _storage(node):
        storage = node.CreateDefaultStorageNode()
        if storage is None:
            raise ValueError(f"{node.GetClassName()} has no storage node")
        return storage

    _WRITE_FORMATS = ("NRRD (.nrrd)", "NRRD (.nhdr)", "NIfTI (.nii)", "NIfTI (.nii.gz)", "MetaImage (.mha)")
    """slicer-core's storage nodes report no write file types (its ITK IO factories are not listed), so
    the shim names the formats Slicer's volume writer offers for the files the module writes."""

    @staticmethod
    def extractKnownExtension(filename, node) -> str:  # noqa: N802
        name = Path(str(filename)).name.lower()
        for extension in (".seg.nrrd", ".mrk.json", ".nii.gz"):
            if name.endswith(extension):
                return extension
        return Path(name).suffix

    def fileWriterExtensions(self, node) -> list:  # noqa: N802
        types_ = self._storage(node).GetSupportedWriteFileTypes()
        listed = [types_.GetValue(i) for i in range(types_.GetNumberOfValues())]
        return listed or list(self._WRITE_FORMATS)

    def exportNodes(self, nodeIDs, fileNames, properties, hardenTransform, userMessages) -> bool:  # noqa: N802
        ok = True
        for nodeID, fileName in zip(nodeIDs, fileNames):
            node = self._scene.scene.GetNodeByID(nodeID)
            storage = self._storage(node)
            storage.SetFileName(str(fileName))
            storage.SetUseCompression(int(properties.get("useCompression", 1)))
            ok = bool(storage.WriteData(node)) and ok
        return ok


class _App:
    """SHIM of ``slicer.app`` (``qSlicerApplication``): layout manager, IO manager, no event loop."""

    def __init__(self, scene: "RealScene"):
        self._layout = _LayoutManager(scene.appLogic)
        self._io = _CoreIOManager(scene)
        self.temporaryPath = str(TEMP_ROOT)
        self.applicationName = "slicer-core (tests)"

    def layoutManager(self):  # noqa: N802
        return self._layout

    def coreIOManager(self):  # noqa: N802
        return self._io

    def startupEnvironment(self):  # noqa: N802
        return _Environment(os.environ)

    def processEvents(self) -> None:  # noqa: N802
        pass

    def testingEnabled(self) -> bool:  # noqa: N802
        return True


def _tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):  # noqa: N802
    """SHIM of ``slicer.util.tempDirectory`` (the real one builds the name with ``qt.QDir``/``QDateTime``)."""
    base = Path(tempDir or TEMP_ROOT)
    base.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=key + "-", dir=base) if includeDateTime else str(base / key)


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name, f"SHIM of {name} (Testing/slicer_scene.py): Qt-side piece absent from slicer-core")
    module.__dict__.update(attrs)
    return module


_INSTALLED = False


def install_shims() -> None:
    """Put the shims into ``sys.modules`` and make the module importable (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    import slicer
    import slicer.util

    sys.modules.setdefault("qt", _module("qt", QTimer=_QTimer))
    shims = {
        "i18n": _module("slicer.i18n", tr=_tr, translate=_translate),
        "ScriptedLoadableModule": _module(
            "slicer.ScriptedLoadableModule", ScriptedLoadableModule=_ScriptedLoadableModule,
            ScriptedLoadableModuleWidget=_ScriptedLoadableModuleWidget,
            ScriptedLoadableModuleLogic=_ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleTest=_ScriptedLoadableModuleTest),
        "parameterNodeWrapper": _module("slicer.parameterNodeWrapper", parameterNodeWrapper=_parameterNodeWrapper,
                                        WithinRange=_WithinRange),
    }
    for name, module in shims.items():
        sys.modules[f"slicer.{name}"] = module
        setattr(slicer, name, module)
    slicer.util.tempDirectory = _tempDirectory
    for path in (MODULE_DIR, MODULE_TEST_DIR):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    _INSTALLED = True


# =====================================================================================================
# The real scene
# =====================================================================================================
class RealScene:
    """A real ``vtkMRMLScene`` with application logic and module logics, set as ``slicer.mrmlScene``.

    ``slice_logics=True`` adds real ``vtkMRMLSliceLogic`` objects for the Red/Yellow/Green views (what
    ``slicer.app.layoutManager()`` reports); the screenshot script passes False and lets trame-slicer's
    views create theirs.  Attributes: ``scene``, ``appLogic``, ``volumes``, ``segmentations``,
    ``markups``, ``subjectHierarchy``, ``terminologies``, ``colors`` (real logics).
    """

    def __init__(self, slice_logics: bool = True):
        install_shims()
        import slicer
        import vtk

        self.scene = scene = slicer.vtkMRMLScene()
        # cache and data IO managers, as Slicer's core application sets them (ReadFromMRB needs them)
        cacheDir = TEMP_ROOT / "cache"
        cacheDir.mkdir(parents=True, exist_ok=True)
        self.cacheManager = slicer.vtkCacheManager()
        self.cacheManager.SetRemoteCacheDirectory(cacheDir.as_posix())
        self.dataIOManager = slicer.vtkDataIOManager()
        self.dataIOManager.SetCacheManager(self.cacheManager)
        scene.SetCacheManager(self.cacheManager)
        scene.SetDataIOManager(self.dataIOManager)
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        scene.AddNode(crosshair)
        self.appLogic = app = slicer.vtkSlicerApplicationLogic()
        app.SetMRMLScene(scene)
        app.SetSliceLogics(vtk.vtkCollection())
        app.SetViewLogics(vtk.vtkCollection())
        self.colors = app.GetColorLogic()
        self.colors.SetMRMLScene(scene)
        self.colors.AddDefaultColorNodes()
        app.SetModuleLogic("Colors", self.colors)

        def register(logic, name, share: Optional[Path] = None):
            if share is not None:
                logic.SetModuleShareDirectory(share.as_posix())
            logic.SetMRMLScene(scene)
            logic.SetMRMLApplicationLogic(app)
            app.SetModuleLogic(name, logic)
            return logic

        self.volumes = register(slicer.vtkSlicerVolumesLogic(), "Volumes")
        self.terminologies = register(slicer.vtkSlicerTerminologiesModuleLogic(), "Terminologies", terminologies_dir())
        self.segmentations = register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
        self.markups = register(slicer.vtkSlicerMarkupsLogic(), "Markups")
        self.subjectHierarchy = register(slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy")
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
        self.sliceLogics = {}
        if slice_logics:
            for name, orientation in SLICE_VIEWS.items():
                logic = slicer.vtkMRMLSliceLogic()
                logic.SetMRMLApplicationLogic(app)
                logic.SetMRMLScene(scene)
                logic.AddSliceNode(name).SetOrientation(orientation)
                app.GetSliceLogics().AddItem(logic)
                self.sliceLogics[name] = logic

        slicer.mrmlScene = scene
        slicer.app = _App(self)
        logics = {"volumes": self.volumes, "segmentations": self.segmentations, "markups": self.markups,
                  "subjecthierarchy": self.subjectHierarchy, "terminologies": self.terminologies,
                  "colors": self.colors}
        slicer.modules = types.SimpleNamespace(
            **{name: types.SimpleNamespace(logic=(lambda lg=lg: lg)) for name, lg in logics.items()})

    def __enter__(self) -> "RealScene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Tear down in a safe order: empty the scene, then detach the logics from it.

        Letting Python free two scenes' logics and nodes in arbitrary order can crash VTK (seen with
        slicer-core 5.11 after ``ReadFromMRB``); tests call this in their teardown.
        """
        import slicer

        self.scene.Clear(1)
        for logic in (*self.sliceLogics.values(), self.subjectHierarchy, self.markups, self.segmentations,
                      self.terminologies, self.volumes):
            logic.SetMRMLScene(None)
        self.sliceLogics.clear()
        self.appLogic.SetMRMLScene(None)
        if slicer.mrmlScene is self.scene:
            slicer.mrmlScene = None

    def nodes(self, className: str) -> list:
        """All nodes of a class (real ``GetNodesByClass``), as a list."""
        collection = self.scene.GetNodesByClass(className)
        return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]

    def node_names(self, className: str) -> list[str]:
        return sorted(n.GetName() for n in self.nodes(className))
