"""L-SNet engine: plain Python + PyTorch, never imports ``slicer``.

The same code path serves the 3D Slicer module, the ``lsnet`` command line and Python users::

    import lsnet
    seg = lsnet.load_segmenter(device="auto")       # bundled default weights (or weights="my.safetensors")
    result = seg.segment_file("ct.nii.gz")           # or seg.segment_volume(lsnet.read_volume(path))
    lsnet.write_outputs(result, "out/")
    mask, prob = seg.segment_box(result.volume, k, box)   # S-Net only inside a user box (correction)

See ``docs/conventions.md`` for coordinate conventions and ``docs/method.md`` for how each paper
equation maps onto a module.
"""

from lsnet._version import __version__  # noqa: F401
from lsnet.errors import (  # noqa: F401
    CancelledError,
    DeviceError,
    InputError,
    LSNetError,
    OutputError,
    WeightsError,
)


def __getattr__(name):
    # Lazy re-exports: importing ``lsnet`` must stay cheap and must not import torch (the Slicer
    # module imports lsnet helpers before PyTorch is installed).
    if name in {"segment_volume", "segment_file", "segment_slice", "segment_box", "Segmenter", "load_segmenter"}:
        from lsnet import api

        return getattr(api, name)
    if name == "load_model":
        from lsnet import architectures

        return architectures.load_model
    if name in {"save_model", "read_model_card", "default_weights_path"}:
        from lsnet.io import weights

        return getattr(weights, name)
    if name == "read_volume":
        from lsnet.io import volume

        return volume.read_volume
    if name == "Volume":
        from lsnet.io import geometry

        return geometry.Volume
    if name == "write_outputs":
        from lsnet.io import outputs

        return outputs.write_outputs
    if name == "RoiBox":
        from lsnet import results

        return results.RoiBox
    raise AttributeError(f"module 'lsnet' has no attribute {name!r}")
