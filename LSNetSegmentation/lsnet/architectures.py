"""Architecture name (``ModelConfig.architecture`` in a model card) -> network class: the one table.

This module sits above the method room (``lsnet.method``, L-SNet) and the comparison systems
(``lsnet.seeds``) and below the pipeline: it is the only place that knows every architecture, so that
reading weights (``lsnet.io.weights``) needs none of them and the seed systems never reach up into
the pipeline.  Importing it also registers DSMS U-Net as an S-Net structure
(``lsnet.seeds.dsms_unet`` calls ``lsnet.method.snet.register_structure``).

Adding an architecture: a class with ``__init__(config)``, ``training_losses`` / ``predict_slices``
(``lsnet.seeds.common``), one line in :data:`ARCHITECTURES`; its card then loads everywhere
(CLI, Slicer module, ``lsnet.load_segmenter``, ``training.export``).  An ``lsnet`` card with
``ensemble > 1`` builds :class:`~lsnet.method.ensemble.LSNetEnsemble` (ours: several L-SNets averaged).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from lsnet.config import ModelConfig
from lsnet.errors import WeightsError
from lsnet.io.weights import checked_card, load_state_checked, read_tensors
from lsnet.method.ensemble import LSNetEnsemble
from lsnet.method.model import LSNet
from lsnet.seeds.dsms_unet import DSMSUNetModel
from lsnet.seeds.rpn_fcn import RPNFCN
from lsnet.seeds.rstn import RSTN

ARCHITECTURES: dict[str, type] = {
    "lsnet": LSNet,  # Xie et al., L-SNet (lsnet.method.model)
    "rstn": RSTN,  # Yu et al. 2018, saliency transformation network (lsnet.seeds.rstn)
    "dsms_unet": DSMSUNetModel,  # Wang et al., DSMS U-Net (lsnet.seeds.dsms_unet)
    "rpn_fcn": RPNFCN,  # Zhang et al., RPN-FCN with RoI convolution (lsnet.seeds.rpn_fcn)
}


def known_architectures() -> list[str]:
    """Names accepted in ``ModelConfig.architecture``."""
    return sorted(ARCHITECTURES)


def build_model(config: ModelConfig) -> torch.nn.Module:
    """A freshly initialised network for ``config`` (``ValueError`` for an unknown architecture)."""
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.architecture!r}; known: {known_architectures()}")
    if config.ensemble != 1:
        if config.architecture != "lsnet":
            raise ValueError(f"ensembles are built for lsnet models only, not {config.architecture!r}")
        return LSNetEnsemble(config)
    return ARCHITECTURES[config.architecture](config)


def load_model(path: Optional[os.PathLike] = None, device: str = "cpu"):
    """Build the network described by the card and load its tensors; returns ``(model, card)``.

    Raises :class:`WeightsError` with a clear message for a missing, pickled, truncated, foreign or
    mismatched file.  ``model`` is in eval mode on ``device`` (fp32).
    """
    card, path = checked_card(path)
    try:
        config = ModelConfig.from_dict(card["config"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"The model card of {path} has an invalid config: {e}") from e
    try:
        model = build_model(config)
    except ValueError as e:
        raise WeightsError(f"The model card of {path} describes an architecture this version cannot build: {e}") from e
    load_state_checked(model, read_tensors(Path(path)), path, config.architecture)
    return model.to(torch.device(device)).eval(), card
