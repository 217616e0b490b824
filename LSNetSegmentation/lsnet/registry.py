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
    from .model import LSNet

    _BUILDERS.setdefault("lsnet", LSNet)
