"""Defaults and choices of the module's settings (plain Python, no Slicer).

The Slicer parameter node (``LSNetSegmentationParameterNode`` in ``LSNetSegmentation.py``) takes its
defaults, ranges and enumerations from here, so CI can check them and the command line and the GUI
agree.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

from .i18n import _


class Device(enum.Enum):
    """Compute device passed to the engine (``--device``)."""

    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        # parameterNodeWrapper uses ``label()`` for the combo box text.
        return {
            Device.AUTO: _("Automatic (GPU if available)"),
            Device.GPU: _("GPU (CUDA)"),
            Device.CPU: _("CPU"),
        }[self]


class ModelSource(enum.Enum):
    """Which weights to use: the model bundled with the extension or a user-chosen file."""

    BUNDLED = "bundled"
    FILE = "file"

    def label(self) -> str:
        return {ModelSource.BUNDLED: _("Bundled model"), ModelSource.FILE: _("Weights file...")}[self]


DEFAULT_DEVICE = Device.AUTO
DEFAULT_MODEL_SOURCE = ModelSource.BUNDLED
DEFAULT_BATCH_SIZE = 8
BATCH_SIZE_RANGE = (1, 64)
"""Slices per forward pass. Smaller needs less GPU memory; the out-of-memory retry halves it."""
DEFAULT_DROP_SMALL_COMPONENTS = True
"""Drop 3-D components smaller than 25 % of the largest (engine ``lsnet.pipeline.postprocess``; ``--all-components`` when off)."""
DEFAULT_SHOW_HEATMAP = True
DEFAULT_HEATMAP_OPACITY = 0.5
DEFAULT_SHOW_ROIS = True
DEFAULT_ROI_CURRENT_SLICE_ONLY = False
SLICE_RANGE_MAX = 200
"""Upper bound of the re-segmentation slice spin boxes before an input is loaded."""

WEIGHTS_SUFFIX = ".safetensors"

# --- result naming (segment names, colours and terminology come from the engine: lsnet.io.terminology) ---
SEGMENTATION_NODE_SUFFIX = " LSNet segmentation"
HEATMAP_NODE_SUFFIX = " LSNet heatmap"
ROI_NODE_PREFIX = "LSNet RoI"
SUBJECT_HIERARCHY_FOLDER = "LSNet results"
HEATMAP_INPUT_REFERENCE = "LSNetSegmentation.heatmapInput"
"""Node-reference role from a heatmap volume to the CT it was computed on (one heatmap per input)."""
BOXES_ATTRIBUTE = "LSNetSegmentation.Boxes"
"""Segmentation-node attribute holding the RoI list as JSON, so a saved scene keeps the RoIs."""


def clamp_batch_size(value: int) -> int:
    lo, hi = BATCH_SIZE_RANGE
    return max(lo, min(hi, int(value)))


def weights_argument(source: ModelSource, custom_path: Optional[Path]) -> Optional[str]:
    """Value of ``--weights`` for the engine: None for the bundled model (the engine's default).

    Raises ValueError with a message for the user when a file is requested but unusable.
    """
    if source == ModelSource.BUNDLED:
        return None
    path = Path(custom_path) if custom_path else None
    if path is None or str(path) in ("", "."):
        raise ValueError(_("Choose a weights file (*.safetensors) or switch to the bundled model."))
    if path.suffix != WEIGHTS_SUFFIX:
        raise ValueError(_("The weights file must be a .safetensors file exported by LSNet: {path}").format(path=path))
    if not path.is_file():
        raise ValueError(_("The weights file does not exist: {path}").format(path=path))
    return str(path)
