"""CI checks of the 3D Slicer module without Slicer.

* the .ui: every ``ui.<name>`` used in Python exists, every ``SlicerParameterName`` is a parameter-node
  field, and the file loads with Qt (PySide6, offscreen) with Slicer's custom widgets as placeholders;
* every ``slicer.util.X`` call exists in Slicer's util.py API list with compatible arguments, and
  every ``vtkMRML*`` class named is a real Slicer class (checked list with provenance);
* the CMake files declare every Python file (module, Lib, bundled engine) and resource;
* the module file imports with real slicer-core (and the Qt-side shims of ``Testing/slicer_scene.py``)
  while ``torch`` cannot be imported (the module on a real scene: ``Testing/test_slicer_real.py``);
* unit tests of the plain-Python helpers in ``LSNetSegmentationLib`` with real libraries (numpy, the
  engine's geometry) and a real child process tree for cancel.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "LSNetSegmentation"
sys.path.insert(0, str(MODULE_DIR))  # conftest does this too; kept so the file runs on its own

from LSNetSegmentationLib import (  # noqa: E402
    geometry_bridge,
    install,
    model_card,
    overlay_layout,
    parameters,
    process,
    results,
    roi_table,
)
from lsnet.results import RoiBox  # noqa: E402

MODULE_FILE = MODULE_DIR / "LSNetSegmentation.py"
LOGIC_FILE = MODULE_DIR / "LSNetSegmentationLib" / "logic.py"  # parameter node and logic
LIB_DIR = MODULE_DIR / "LSNetSegmentationLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LSNetSegmentation.ui"
SLICER_REF = ROOT.parent / "shared" / "slicer"
DATA = Path(__file__).resolve().parent / "data"
TESTING = Path(__file__).resolve().parent

SLICER_PY_FILES = [MODULE_FILE, *sorted(LIB_DIR.glob("*.py")), MODULE_DIR / "Testing" / "Python" / "LSNetSegmentationModuleTest.py"]


def _sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in SLICER_PY_FILES}


# =====================================================================================================
# .ui file
# =====================================================================================================
def _ui_tree():
    return ET.parse(UI_FILE).getroot()


def _ui_widget_names() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in _ui_tree().iter("widget")}


def test_ui_names_used_in_python_exist():
    names = _ui_widget_names()
    used = set()
    for src in _sources().values():
        used |= set(re.findall(r"\bui\.([A-Za-z_]\w*)", src))
    assert used, "no ui.<name> usages found: the check would be vacuous"
    missing = sorted(used - set(names))
    assert not missing, f"used in Python but not in {UI_FILE.name}: {missing}"


def test_ui_connections_and_custom_widgets_are_declared():
    names = _ui_widget_names()
    custom = {c.find("class").text for c in _ui_tree().iter("customwidget")}
    used = {cls for cls in names.values() if not cls.startswith("Q")}
    assert used <= custom, f"custom widget classes not declared in <customwidgets>: {sorted(used - custom)}"
    connections = list(_ui_tree().iter("connection"))
    assert {c.find("receiver").text for c in connections} == {"inputVolumeSelector", "outputSegmentationSelector"}
    for c in connections:
        assert c.find("sender").text in names and c.find("receiver").text in names
        assert c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"


def _parameter_fields() -> dict[str, str]:
    tree = ast.parse(LOGIC_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in LSNetSegmentationLib/logic.py")


# widget class -> parameter annotation it can be bound to (Slicer Docs/developer_guide/parameter_nodes/gui_connection.md)
_BINDABLE = {
    "qMRMLNodeComboBox": lambda a: a.startswith("vtkMRML"),
    "QComboBox": lambda a: a in ("Device", "ModelSource") or "Choice" in a,
    "ctkPathLineEdit": lambda a: a == "Path",
    "QSpinBox": lambda a: a.startswith("Annotated[int") or a == "int",
    "ctkSliderWidget": lambda a: a.startswith("Annotated[float") or a == "float",
    "QCheckBox": lambda a: a == "bool",
}


def test_ui_parameter_bindings_match_parameter_node():
    fields = _parameter_fields()
    bound = {}
    for w in _ui_tree().iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[w.get("name")] = (w.get("class"), prop.find("string").text)
    assert len(bound) >= 10
    for widget, (cls, param) in bound.items():
        assert param in fields, f"{widget} binds to unknown parameter {param!r}"
        assert cls in _BINDABLE and _BINDABLE[cls](fields[param]), f"{widget} ({cls}) cannot bind {param}: {fields[param]}"
    # every GUI setting is bound (heatmapVolume is a result reference, not a setting)
    assert set(fields) - {p for _, p in bound.values()} == {"heatmapVolume"}


_UI_LOADER = r"""
import sys, json
from PySide6.QtWidgets import QApplication, QWidget
from PySide6.QtUiTools import QUiLoader
app = QApplication([])
loader = QUiLoader()
def _init(self, parent=None):
    QWidget.__init__(self, parent)
# Slicer/CTK widgets do not exist here: register QWidget subclasses of the same names (kept alive)
placeholders = [type(name, (QWidget,), {"__init__": _init}) for name in json.loads(sys.argv[2])]
for cls in placeholders:
    loader.registerCustomWidget(cls)
w = loader.load(sys.argv[1])
if w is None:
    print("LOAD FAILED:", loader.errorString()); sys.exit(2)
found = {c.objectName(): type(c).__name__ for c in w.findChildren(QWidget)}
found[w.objectName()] = type(w).__name__
print(json.dumps(found))
"""


def test_ui_loads_with_qt_offscreen():
    pytest.importorskip("PySide6.QtUiTools", reason="PySide6-Essentials not installed (pip install PySide6-Essentials)")
    custom = sorted({c.find("class").text for c in _ui_tree().iter("customwidget")})
    assert {"qMRMLNodeComboBox", "ctkPathLineEdit", "ctkSliderWidget", "ctkCollapsibleButton", "qMRMLWidget"} <= set(custom)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([sys.executable, "-c", _UI_LOADER, str(UI_FILE), json.dumps(custom)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    expected = _ui_widget_names()
    missing = sorted(set(expected) - set(loaded))
    assert not missing, f"widgets not created by QUiLoader: {missing}"
    for name, cls in expected.items():
        if cls in custom:
            assert loaded[name] == cls, f"{name} created as {loaded[name]}, expected placeholder {cls}"


# =====================================================================================================
# Slicer API usage
# =====================================================================================================
def _slicer_util_api() -> dict[str, list[str]]:
    api = {}
    for line in (SLICER_REF / "slicer-util-api.txt").read_text().splitlines():
        m = re.match(r"(\w+)\((.*)\)", line.strip())
        if m:
            api[m.group(1)] = [a.strip() for a in m.group(2).split(",") if a.strip()]
    return api


def _slicer_util_calls():
    """``(file, name, n_positional, keywords, is_call)`` for every ``slicer.util.X`` in the module."""
    found = []
    for path, src in _sources().items():
        tree = ast.parse(src)
        calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "util" and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "slicer"):
                call = calls.get(id(node))
                if call is None:
                    found.append((path.name, node.attr, 0, [], False))
                else:
                    found.append((path.name, node.attr, len(call.args), [k.arg for k in call.keywords], True))
    return found


@pytest.mark.skipif(not (SLICER_REF / "slicer-util-api.txt").exists(), reason="../shared/slicer not present")
def test_slicer_util_calls_exist_with_compatible_arguments():
    api = _slicer_util_api()
    calls = _slicer_util_calls()
    assert len(calls) >= 20
    for fname, name, npos, keywords, is_call in calls:
        assert name in api, f"{fname}: slicer.util.{name} is not in Slicer's util.py"
        params = api[name]
        if is_call and params:  # classes (NodeModify, ...) list no parameters
            assert npos <= len(params), f"{fname}: slicer.util.{name} given {npos} positional args, takes {params}"
            bad = [k for k in keywords if k not in params]
            assert not bad, f"{fname}: slicer.util.{name} has no argument(s) {bad} (has {params})"


def test_mrml_classes_are_real_slicer_classes():
    listed = {}
    for line in (DATA / "slicer_mrml_classes.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, header = line.split("\t")
            assert header.endswith(name + ".h")
            listed[name] = header
    used = set()
    ui_text = UI_FILE.read_text(encoding="utf-8")
    color_ids = [l for l in (DATA / "slicer_color_node_ids.txt").read_text().splitlines() if l and not l.startswith("#")]
    for src in list(_sources().values()) + [ui_text]:
        for color_id in color_ids:  # colour node IDs are checked by their own list
            src = src.replace(f'"{color_id}"', '""')
        used |= set(re.findall(r"\bvtkMRML[A-Za-z0-9]+\b(?![.\w])", src))
    assert {"vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLMarkupsROINode"} <= used
    unknown = sorted(used - set(listed))
    assert not unknown, f"MRML classes not in Testing/data/slicer_mrml_classes.txt: {unknown}"


def test_heatmap_colour_nodes_are_slicer_default_colour_nodes():
    ids = [l for l in (DATA / "slicer_color_node_ids.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert overlay_layout.HEATMAP_COLOR_NODE_IDS[0] == overlay_layout.HEATMAP_COLOR_NODE_ID
    assert set(overlay_layout.HEATMAP_COLOR_NODE_IDS) <= set(ids)
    present = {"vtkMRMLColorTableNodeIron"}
    assert overlay_layout.pick_color_node_id(present.__contains__) == "vtkMRMLColorTableNodeIron"
    assert overlay_layout.pick_color_node_id(lambda i: True) == overlay_layout.HEATMAP_COLOR_NODE_ID
    assert overlay_layout.pick_color_node_id(lambda i: False) is None


# =====================================================================================================
# CMake
# =====================================================================================================
def _cmake_list(text: str, var: str) -> list[str]:
    m = re.search(rf"set\({var}\s+(.*?)\n\s*\)", text, re.S)
    assert m, f"set({var} ...) not found"
    items = []
    for line in m.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            items.append(line.replace("${MODULE_NAME}", "LSNetSegmentation"))
    return items


def test_module_cmake_lists_every_python_file_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = {"LSNetSegmentation.py"}
    for folder in ("LSNetSegmentationLib", "lsnet"):
        on_disk |= {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / folder).rglob("*.py")
                    if "__pycache__" not in p.parts}
    assert len(scripts) == len(set(scripts)), "duplicate script entries"
    assert sorted(set(scripts) ^ on_disk) == [], f"missing from / stale in MODULE_PYTHON_SCRIPTS: {sorted(set(scripts) ^ on_disk)}"
    engine_data = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "lsnet").rglob("*")
                   if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    expected = {"Resources/Icons/LSNetSegmentation.png", "Resources/UI/LSNetSegmentation.ui",
                "Resources/requirements.txt"} | engine_data
    expected |= {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").glob("*.term.json")}
    expected |= {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources" / "SampleData").iterdir()}
    assert set(resources) == expected
    for r in resources:
        assert (MODULE_DIR / r).is_file(), r
    # weights and model cards are globbed (they come from training/export.py)
    assert "Resources/Models/*.safetensors" in text and "Resources/Models/*.json" in text
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "add_subdirectory(Testing)" in text
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text().strip() == "add_subdirectory(Python)"
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}ModuleTest.py)" in (
        MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text()
    assert (MODULE_DIR / "Testing" / "Python" / "LSNetSegmentationModuleTest.py").is_file()


def test_extension_cmake_follows_the_template():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "project(LSNetSegmentation)" in text
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf"set\(EXTENSION_{key} ", text), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(LSNetSegmentation)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    icon = ROOT / "Resources" / "LSNetSegmentation.png"
    assert icon.is_file() and icon.name in re.search(r"EXTENSION_ICONURL \"([^\"]+)\"", text).group(1)


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for path in (ROOT / "Resources" / "LSNetSegmentation.png", MODULE_DIR / "Resources" / "Icons" / "LSNetSegmentation.png"):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (128, 128)
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20  # a drawing, not a flat placeholder


def test_requirements_match_engine_dependencies_without_torch():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = install.read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    assert sorted(reqs) == sorted(d for d in deps if not d.startswith("torch"))


# =====================================================================================================
# The module imports without Slicer's real modules and without torch
# =====================================================================================================
_IMPORT_CHECK = r"""
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked for this test")
        return None
sys.meta_path.insert(0, BlockTorch())
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import slicer_scene
slicer_scene.install_shims()  # real slicer-core; shims only for qt, ScriptedLoadableModule, parameterNodeWrapper, i18n
import LSNetSegmentation as m
assert "torch" not in sys.modules
assert isinstance(m.LSNetSegmentationParameterNode.batchSize, property)
for cls in ("LSNetSegmentation", "LSNetSegmentationWidget", "LSNetSegmentationLogic", "LSNetSegmentationTest"):
    assert hasattr(m, cls), cls
import LSNetSegmentationLib.results, LSNetSegmentationLib.install, LSNetSegmentationLib.model_card
import lsnet.io.geometry, lsnet.results, lsnet.io.terminology, lsnet.io.weights
assert "torch" not in sys.modules
card_path = LSNetSegmentationLib.model_card.bundled_weights_path()
LSNetSegmentationLib.model_card.format_card(LSNetSegmentationLib.model_card.read_card(card_path), card_path)
assert "torch" not in sys.modules
try:
    import lsnet.pipeline.inference
except ImportError:
    print("OK")
else:
    raise SystemExit("torch blocker did not work")
"""


def test_module_imports_without_torch():
    sys.path.insert(0, str(TESTING))
    import slicer_scene

    why = slicer_scene.import_error()
    if why:
        pytest.skip(why)
    out = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, str(TESTING), str(MODULE_DIR)], capture_output=True,
                         text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr


# =====================================================================================================
# Plain helpers: parameters
# =====================================================================================================
def test_parameter_defaults_and_choices():
    assert parameters.BATCH_SIZE_RANGE[0] <= parameters.DEFAULT_BATCH_SIZE <= parameters.BATCH_SIZE_RANGE[1]
    assert 0.0 <= parameters.DEFAULT_HEATMAP_OPACITY <= 1.0
    assert {d.value for d in parameters.Device} == {"auto", "cuda", "cpu"}
    assert parameters.DEFAULT_DEVICE is parameters.Device.AUTO
    assert all(d.label() for d in parameters.Device) and all(s.label() for s in parameters.ModelSource)
    assert parameters.clamp_batch_size(0) == 1 and parameters.clamp_batch_size(1000) == 64
    # the defaults in the parameter node are the ones defined here
    fields = _parameter_fields()
    src = LOGIC_FILE.read_text()
    assert "batchSize: Annotated[int, WithinRange(*parameters.BATCH_SIZE_RANGE)] = parameters.DEFAULT_BATCH_SIZE" in src
    assert fields["device"] == "Device" and fields["modelPath"] == "Path"


def test_weights_argument(tmp_path):
    assert parameters.weights_argument(parameters.ModelSource.BUNDLED, None) is None
    with pytest.raises(ValueError, match="Choose a weights file"):
        parameters.weights_argument(parameters.ModelSource.FILE, Path("."))
    with pytest.raises(ValueError, match="safetensors"):
        parameters.weights_argument(parameters.ModelSource.FILE, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="does not exist"):
        parameters.weights_argument(parameters.ModelSource.FILE, tmp_path / "model.safetensors")
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert parameters.weights_argument(parameters.ModelSource.FILE, f) == str(f)


# =====================================================================================================
# geometry_bridge
# =====================================================================================================
def _random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_ijk_to_ras_round_trip_and_engine_agreement():
    from lsnet.io.geometry import Volume

    rng = np.random.default_rng(0)
    for _ in range(5):
        spacing, origin, direction = rng.uniform(0.5, 3, 3), rng.normal(0, 50, 3), _random_rotation(rng)
        m = geometry_bridge.ijk_to_ras_matrix(spacing, origin, direction)
        s2, o2, d2 = geometry_bridge.geometry_from_ijk_to_ras(m)
        np.testing.assert_allclose(s2, spacing)
        np.testing.assert_allclose(o2, origin, atol=1e-9)
        np.testing.assert_allclose(d2, direction, atol=1e-12)
        vol = geometry_bridge.volume_from_slicer(np.zeros((3, 4, 5), np.int16), m)
        assert isinstance(vol, Volume)
        np.testing.assert_allclose(vol.ijk_to_ras(), m, atol=1e-9)
        np.testing.assert_allclose(geometry_bridge.ijk_to_ras_from_volume(vol), m, atol=1e-9)
    # Slicer's default axial volume: IJKToRAS = diag(-sx, -sy, sz) (LPS-aligned)
    m = geometry_bridge.ijk_to_ras_matrix((0.7, 0.7, 2.5), (0, 0, 0), np.eye(3))
    np.testing.assert_allclose(np.diag(m), [-0.7, -0.7, 2.5, 1])


def _permuted_ijk_to_ras():
    # i -> anterior (RAS +y), j -> inferior (-z), k -> right (+x): a sagittal-ordered, flipped acquisition
    return np.array([[0.0, 0.0, 2.0, -30.0], [0.9, 0.0, 0.0, 10.0], [0.0, -0.8, 0.0, 40.0], [0, 0, 0, 1]])


def test_canonicalizer_matches_engine_and_writes_through():
    from lsnet.io.geometry import to_canonical

    m = _permuted_ijk_to_ras()
    arr = np.arange(7 * 6 * 5, dtype=np.int16).reshape(7, 6, 5)
    c = geometry_bridge.Canonicalizer(m, arr.shape)
    can, _ = to_canonical(geometry_bridge.volume_from_slicer(arr, m))
    np.testing.assert_array_equal(c.view(arr), can.array)
    np.testing.assert_allclose(c.ijk_to_ras, can.ijk_to_ras(), atol=1e-9)
    assert c.shape == can.array.shape
    # canonical axes point to L, P, S: RAS columns (-, -, +)
    assert c.ijk_to_ras[0, 0] < 0 and c.ijk_to_ras[1, 1] < 0 and c.ijk_to_ras[2, 2] > 0
    mask = np.zeros(arr.shape, np.uint8)
    c.view(mask)[2, 1, 3] = 1
    (k, j, i), = np.argwhere(mask)
    # the written voxel is at the same RAS position in both index spaces
    np.testing.assert_allclose(m @ [i, j, k, 1], c.ijk_to_ras @ [3, 1, 2, 1], atol=1e-9)
    assert c.slice_of_ras((c.ijk_to_ras @ [0, 0, 4.3, 1])[:3]) == 4
    assert c.slice_of_ras((c.ijk_to_ras @ [0, 0, -3, 1])[:3]) is None


def test_box_roi_geometry_round_trip_and_engine_corners():
    from lsnet.io.geometry import Volume
    from lsnet.io.outputs import box_corners_ras

    m = _permuted_ijk_to_ras()
    arr = np.zeros((40, 30, 20), np.int16)
    c = geometry_bridge.Canonicalizer(m, arr.shape)
    box = RoiBox(7, 3.5, 4.0, 12.25, 9.5, 0.8, margin_px=2.0)
    center, axes, size = geometry_bridge.box_roi_geometry(box, c.ijk_to_ras)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-12)
    corners = geometry_bridge.roi_corners_ras(center, axes, size)
    vol = geometry_bridge.volume_from_slicer(arr, m)
    assert isinstance(vol, Volume)
    engine = box_corners_ras(box, vol)
    key = lambda a: sorted(map(tuple, np.round(a, 6)))  # noqa: E731
    assert key(corners) == key(engine)
    back = geometry_bridge.box_from_roi_geometry(center, size, c.ijk_to_ras, c.shape, score=0.8, margin_px=2.0,
                                                 source="lnet")
    assert back.slice_index == 7
    np.testing.assert_allclose([back.x0, back.y0, back.x1, back.y1], [3.5, 4.0, 12.25, 9.5], atol=1e-9)
    # the margin grows the box by margin/2 per side
    _, _, grown = geometry_bridge.box_roi_geometry(box, c.ijk_to_ras, include_margin=True)
    np.testing.assert_allclose(grown[:2] - size[:2], 2.0 * c.spacing[:2])
    with pytest.raises(ValueError, match="outside"):
        geometry_bridge.box_from_roi_geometry((c.ijk_to_ras @ [5, 5, 99, 1])[:3], size, c.ijk_to_ras, c.shape)


def test_default_box_is_clipped_square_around_point():
    m = geometry_bridge.ijk_to_ras_matrix((1.0, 1.0, 2.0), (0, 0, 0), np.eye(3))
    c = geometry_bridge.Canonicalizer(m, (10, 100, 100))
    ras = (c.ijk_to_ras @ [49.5, 49.5, 3, 1])[:3]  # pixel-edge position x = y = 50
    box = geometry_bridge.default_box_at(ras, c, size_mm=20.0)
    assert (box.slice_index, box.x0, box.y0, box.x1, box.y1, box.source) == (3, 40.0, 40.0, 60.0, 60.0, "user")
    corner = (c.ijk_to_ras @ [-0.5, -0.5, 3, 1])[:3]
    clipped = geometry_bridge.default_box_at(corner, c, size_mm=20.0)
    assert (clipped.x0, clipped.y0, clipped.x1, clipped.y1) == (0.0, 0.0, 10.0, 10.0)


def test_paste_box_mask_only_touches_the_box_region():
    sl = np.zeros((20, 30), np.uint8)
    sl[2:5, 2:5] = 1  # another RoI's mask, outside the box
    sl[10:12, 10:12] = 1  # old mask inside the box
    box = RoiBox(0, 8.2, 7.0, 15.0, 14.5, 0.9, margin_px=2.0)  # with margin: rows 6..15, cols 7..16
    new = np.zeros_like(sl)
    new[8:10, 12:14] = 1
    new[0, 0] = 1  # outside the region: ignored
    changed = geometry_bridge.paste_box_mask(sl, box, new)
    assert changed == 4 + 4
    assert sl[2:5, 2:5].all() and sl[0, 0] == 0 and sl[8:10, 12:14].all() and not sl[10:12, 10:12].any()
    rows, cols = geometry_bridge.box_pixel_bounds(box, sl.shape)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (6, 16, 7, 16)
    assert geometry_bridge.paste_box_mask(sl, box, None) == 4
    assert sl.sum() == 9


# =====================================================================================================
# roi_table
# =====================================================================================================
def _boxes():
    return [RoiBox(4, 10, 10, 20, 30, 0.6), RoiBox(2, 0, 0, 40, 10, 0.9), RoiBox(4, 30, 5, 35, 8, 0.95),
            RoiBox(9, 1, 1, 5, 5, 0.0, source="user")]


def test_roi_table_sort_filter_display():
    t = roi_table.RoiTableModel(_boxes(), pixel_spacing=(0.5, 2.0))
    assert [r.box.slice_index for r in t.rows()] == [2, 4, 4, 9]
    assert [r.id for r in t.rows(slice_index=4)] == [2, 0]  # same slice: top row first
    t.set_sort("score", descending=True)
    assert [r.id for r in t.rows()] == [2, 1, 0, 3]
    t.set_sort("size", descending=True)
    assert [r.id for r in t.rows()][0] == 1  # 40 x 10 px = 20 x 20 mm
    with pytest.raises(ValueError):
        t.set_sort("colour")
    shown = dict(t.display_rows())
    assert shown[0] == ("4", "0.60", "5 x 40 mm") and shown[3][1] == "user"
    assert roi_table.RoiTableModel(_boxes()).display_rows()[0][1][2] == "40 x 10 px"
    assert t.slices() == [2, 4, 9]


def test_roi_table_ids_are_stable_and_json_round_trips():
    t = roi_table.RoiTableModel(_boxes())
    removed = t.remove(1)
    assert removed.slice_index == 2 and len(t) == 3
    new_id = t.add(RoiBox(5, 1, 1, 2, 2, 0.1))
    assert new_id == 4 and t.row(3).box.source == "user"
    with pytest.raises(KeyError):
        t.row(1)
    t.update(0, RoiBox(4, 11, 11, 21, 31, 0.6, source="user"))
    back = roi_table.RoiTableModel.boxes_from_json(t.to_json())
    assert back == t.boxes
    # boxes.json records of the engine (canonical_xyxy) parse to the same boxes
    records = {"boxes": [{"slice_index": b.slice_index, "score": b.score, "source": b.source, "margin_px": b.margin_px,
                          "canonical_xyxy": [b.x0, b.y0, b.x1, b.y1]} for b in t.boxes]}
    assert roi_table.boxes_from_dicts(records) == t.boxes
    moved = roi_table.with_slice(t.boxes[0], 8)
    assert moved.slice_index == 8 and moved.x0 == t.boxes[0].x0


def test_roi_table_jump_target_is_box_centre():
    c = geometry_bridge.Canonicalizer(_permuted_ijk_to_ras(), (40, 30, 20))
    t = roi_table.RoiTableModel(_boxes())
    for row in t.rows():
        centre, _, _ = geometry_bridge.box_roi_geometry(row.box, c.ijk_to_ras)
        np.testing.assert_allclose(t.jump_target_ras(row.id, c.ijk_to_ras), centre)
        assert c.slice_of_ras(centre) == row.box.slice_index


# =====================================================================================================
# overlay_layout
# =====================================================================================================
def test_heatmap_display_settings():
    d = overlay_layout.heatmap_display(True, 0.4)
    assert (d.window_min, d.window_max) == (0.0, 1.0)
    assert 0 < d.lower_threshold < 0.5 and d.upper_threshold == 1.0 and d.foreground_opacity == 0.4
    assert overlay_layout.heatmap_display(False, 0.4).foreground_opacity == 0.0
    assert overlay_layout.heatmap_display(True, 7).foreground_opacity == 1.0


def test_visible_rois_follow_the_viewed_slice():
    t = roi_table.RoiTableModel(_boxes())
    assert overlay_layout.visible_roi_ids(t.rows(), 4) == {0, 2}
    assert overlay_layout.visible_roi_ids(t.rows(), 4, show=False) == set()
    assert overlay_layout.visible_roi_ids(t.rows(), None) == set()
    assert overlay_layout.visibility_changes({0, 2}, {1}) == ({1}, {0, 2})
    assert overlay_layout.roi_label(t.row(3).box) == "user" and overlay_layout.roi_label(t.row(0).box) == "0.60"
    assert overlay_layout.roi_color(t.row(0).box, selected=True) == overlay_layout.ROI_COLOR_SELECTED


# =====================================================================================================
# process: command line, JSON progress, real child processes, cancel of a process tree
# =====================================================================================================
def test_build_segment_command_matches_cli():
    cmd = process.build_segment_command("PythonSlicer", "/tmp/in.nrrd", "/tmp/out", weights="/w.safetensors",
                                        device="cuda", batch_size=4)
    assert cmd[:6] == ["PythonSlicer", "-m", "lsnet.app.cli", "segment", "/tmp/in.nrrd", "-o"]
    assert "--progress-json" in cmd and cmd[cmd.index("--weights") + 1] == "/w.safetensors"
    assert cmd[cmd.index("--batch-size") + 1] == "4" and "--overwrite" in cmd
    assert "--weights" not in process.build_segment_command("p", "i", "o")
    with pytest.raises(ValueError):
        process.build_segment_command("p", "i", "o", device="tpu")
    # the engine's argument parser accepts it
    from lsnet.app import cli

    args = cli.build_parser().parse_args(cmd[3:])
    assert args.batch_size == 4 and args.progress_json and args.device == "cuda" and args.overwrite


def test_parse_line():
    e = process.parse_line('{"event": "progress", "done": 3, "total": 10}\n')
    assert e.kind == "progress" and e.data["done"] == 3
    assert process.parse_line('{"event": "boxes", "slice": 2, "boxes": []}').kind == "boxes"
    assert process.parse_line("lsnet:  30%|###   | 3/10").kind == "log"
    assert process.parse_line('{"not": "an event"}').kind == "log"
    assert process.parse_line("{broken json").kind == "log"
    assert process.parse_line('{"event": "other"}').kind == "log"
    assert process.progress_percent(3, 10) == 30 and process.progress_percent(1, 0) == 0


def test_output_paths_and_failure_messages(tmp_path):
    paths = process.output_paths(tmp_path, {"seg_nrrd": "/x/s.seg.nrrd"})
    assert paths["seg_nrrd"] == Path("/x/s.seg.nrrd") and paths["heatmap"] == tmp_path / "heatmap.nrrd"
    from lsnet.io.outputs import FILE_NAMES

    for key, name in process.OUTPUT_FILES.items():
        assert FILE_NAMES[key] == name
    f = process.explain_failure("CUDA out of memory. Tried to allocate", 8, "cuda")
    assert f.retry == {"batch_size": 4}
    assert process.explain_failure("CUDA out of memory", 1, "auto").retry == {"device": "cpu"}
    assert process.explain_failure("Weights file not found", 8, "cpu").retry is None


_CHILD = r"""
import json, sys, time
print("starting", flush=True)
for k in range(1, 4):
    print(json.dumps({"event": "progress", "done": k, "total": 3}), flush=True)
print(json.dumps({"event": "boxes", "slice": 1, "boxes": [{"slice_index": 1, "x0": 1, "y0": 2, "x1": 3, "y1": 4, "score": 0.5}]}), flush=True)
if sys.argv[1] == "ok":
    print(json.dumps({"event": "done", "outputs": {}, "summary": {}}), flush=True)
else:
    print(json.dumps({"event": "error", "message": "The input is not a CT"}), flush=True)
    sys.exit(3)
"""


def test_child_process_events_success_and_error():
    p = process.SegmentationProcess([sys.executable, "-c", _CHILD, "ok"])
    p.start()
    events = p.wait(timeout=30)
    assert [e.kind for e in events] == ["log", "progress", "progress", "progress", "boxes", "done"]
    assert p.succeeded and p.returncode == 0
    assert roi_table.boxes_from_dicts(events[4].data["boxes"])[0].y1 == 4.0
    p = process.SegmentationProcess([sys.executable, "-c", _CHILD, "fail"])
    p.start()
    p.wait(timeout=30)
    assert not p.succeeded and p.returncode == 3 and p.error_message() == "The input is not a CT"


_TREE = r"""
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(g.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux) to check that processes are gone")
def test_cancel_kills_the_whole_process_tree():
    p = process.SegmentationProcess([sys.executable, "-c", _TREE])
    p.start()
    grandchild = None
    deadline = time.monotonic() + 20
    while grandchild is None and time.monotonic() < deadline:
        for e in p.poll():
            if e.kind == "log" and e.text.strip().isdigit():
                grandchild = int(e.text.strip())
        time.sleep(0.02)
    assert grandchild is not None and _alive(grandchild) and p.running
    t0 = time.monotonic()
    p.cancel()
    p.poll()
    assert p.finished and p.cancelled and not p.succeeded
    while _alive(grandchild) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert not _alive(grandchild), "grandchild survived cancel"
    assert time.monotonic() - t0 < 5


def test_child_environment_makes_the_bundled_engine_importable(tmp_path):
    env = process.child_environment({k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, MODULE_DIR)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(MODULE_DIR) and env["PYTHONUNBUFFERED"] == "1"
    out = subprocess.run([sys.executable, "-c", "import lsnet, lsnet.app.cli; print(lsnet.__file__)"], env=env,
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == MODULE_DIR / "lsnet"


# =====================================================================================================
# install, model card, naming
# =====================================================================================================
def test_requirement_checks(tmp_path):
    f = tmp_path / "requirements.txt"
    f.write_text("# comment\nnumpy>=1.20\n\n--index-url x\nscipy>=99  # too new\nnotinstalled-pkg\n")
    reqs = install.read_requirements(f)
    assert reqs == ["numpy>=1.20", "scipy>=99", "notinstalled-pkg"]
    versions = {"numpy": "1.26.0", "scipy": "1.11.0"}

    def version_of(name):
        if name not in versions:
            import importlib.metadata

            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    assert install.missing_requirements(reqs, version_of) == ["scipy>=99", "notinstalled-pkg"]
    assert install.torch_is_recent_enough("2.4.1+cu121") and not install.torch_is_recent_enough("1.13.0")
    assert not install.torch_is_recent_enough(None)


def test_model_card_formatting(tmp_path):
    w = tmp_path / "m.safetensors"
    text = model_card.format_card({"name": "LSNet <pancreas>", "metrics": {"dice": 0.8123}}, w)
    assert "LSNet &lt;pancreas&gt;" in text and "dice: 0.812" in text and str(w) in text
    assert "No model card" in model_card.format_card(None, w)
    assert "No weights" in model_card.format_card(None, None)
    assert model_card.selected_weights_path(parameters.ModelSource.FILE, Path(".")) is None
    assert model_card.selected_weights_path(parameters.ModelSource.FILE, w) == w
    assert model_card.read_card(w) is None  # missing file -> no card, no exception


def test_unique_segment_names():
    assert results.unique_name("Pancreas", []) == "Pancreas"
    assert results.unique_name("Pancreas", ["Pancreas", "Pancreas (2)"]) == "Pancreas (3)"
    assert results.segment_mask_summary(np.array([[[0, 1]], [[0, 0]], [[1, 1]]])) == {"voxels": 3, "slices": 2}


def test_module_self_test_exists_and_generates_its_data():
    src = (MODULE_DIR / "Testing" / "Python" / "LSNetSegmentationModuleTest.py").read_text()
    assert "ScriptedLoadableModuleTest" in src and "make_phantom" in src
    assert "downloadSample" not in src and "downloadFile" not in src
