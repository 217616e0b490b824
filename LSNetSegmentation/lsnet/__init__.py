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

__version__ = "0.1.0"

from .errors import (  # noqa: F401
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
        from . import api

        return getattr(api, name)
    if name in {"load_model", "save_model", "read_model_card", "default_weights_path"}:
        from . import weights

        return getattr(weights, name)
    if name in {"read_volume", "Volume"}:
        from . import volume

        return getattr(volume, name)
    if name == "write_outputs":
        from . import outputs

        return outputs.write_outputs
    raise AttributeError(f"module 'lsnet' has no attribute {name!r}")
