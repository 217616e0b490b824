"""Architecture name (``ModelConfig.architecture``) -> network class.

Other seed systems (RSTN, DSMS U-Net, RPN-FCN) register here so their cards load through the same
``weights.load_model``.
"""

from __future__ import annotations

from typing import Callable

_BUILDERS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def build_model(config):
    if config.architecture not in _BUILDERS:
        _load_builtin()
    if config.architecture not in _BUILDERS:
        raise ValueError(f"unknown architecture {config.architecture!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[config.architecture](config)


def _load_builtin() -> None:
    from .dsms_unet import DSMSUNetModel
    from .model import LSNet
    from .rpn_fcn import RPNFCN
    from .rstn import RSTN

    _BUILDERS.setdefault("lsnet", LSNet)
    _BUILDERS.setdefault("rstn", RSTN)  # Yu et al. 2018, saliency transformation network (rstn.py)
    _BUILDERS.setdefault("dsms_unet", DSMSUNetModel)  # Wang et al., DSMS U-Net (dsms_unet.py)
    _BUILDERS.setdefault("rpn_fcn", RPNFCN)  # Zhang et al., RPN-FCN with RoI convolution (rpn_fcn.py)


def known_architectures() -> list[str]:
    """Names accepted in ``ModelConfig.architecture``."""
    _load_builtin()
    return sorted(_BUILDERS)
