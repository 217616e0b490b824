"""The Python API shared by every front end (CLI, Slicer module, notebooks)."""

from __future__ import annotations

from lsnet.pipeline.inference import Segmenter, check_volume_values  # noqa: F401
from lsnet.pipeline.seed_inference import make_segmenter as load_segmenter  # noqa: F401  (any architecture's card)


def segment_volume(volume, weights=None, device: str = "auto", batch_size: int = 8, **kwargs):
    """Segment a :class:`lsnet.io.geometry.Volume` with the bundled (or given) weights."""
    return load_segmenter(weights=weights, device=device, batch_size=batch_size).segment_volume(volume, **kwargs)


def segment_file(path, weights=None, device: str = "auto", batch_size: int = 8, **kwargs):
    """Read an image file / DICOM folder and segment it."""
    return load_segmenter(weights=weights, device=device, batch_size=batch_size).segment_file(path, **kwargs)


def segment_slice(slice_hu, spacing_xy=(1.0, 1.0), weights=None, device: str = "auto"):
    """Segment one 2-D canonical axial slice in HU."""
    return load_segmenter(weights=weights, device=device, batch_size=1).segment_slice(slice_hu, spacing_xy)


def segment_box(volume, slice_index, box, weights=None, device: str = "auto"):
    """S-Net only, inside a user box on one slice (interactive correction)."""
    return load_segmenter(weights=weights, device=device, batch_size=1).segment_box(volume, slice_index, box)
