"""Shared glue of the comparison systems (RSTN, DSMS U-Net, RPN-FCN): one interface for all of them.

Every seed model is an ``nn.Module`` with a ``config`` (:class:`lsnet.config.ModelConfig`, the
architecture-specific options in ``config.options``) and two methods, so that training, evaluation and
inference never special-case an architecture:

* ``training_losses(images (B, C, H, W) in [0, 1], masks (B, H, W) {0, 1}) -> {"loss": scalar, ...}``
  — the paper's full training objective; one optimiser over all parameters (all three papers train
  end to end).  :func:`training_losses` dispatches on the model.
* ``predict_slices(images (B, C, H, W)) -> SlicePrediction`` — foreground probability on the input
  grid, plus the boxes the method used (RSTN crop boxes, RPN proposals; none for DSMS U-Net).

``images`` are preprocessed exactly as for L-SNet (``lsnet.pipeline.preprocess.window`` +
``to_canvas``: the ``config.window`` HU window, ``config.spacing`` mm pixels, zero padding to a
multiple of 32), so every architecture sees the same slices, and the same training data code serves
all of them.  Volumes go through ``lsnet.pipeline.seed_inference`` (its ``make_segmenter`` picks the
runner for any weights file).  ``SegmentationResult.heatmap`` of a seed model holds its final
foreground probability (the seed systems have no keypoint heatmap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lsnet.config import ModelConfig

SEED_ARCHITECTURES = ("rstn", "dsms_unet", "rpn_fcn")


@dataclass
class SlicePrediction:
    """Output of ``predict_slices``.

    ``prob`` ``(B, 1, H, W)`` foreground probability on the input grid; ``boxes`` ``(N, 4)``
    ``(x0, y0, x1, y1)`` in input-grid edge coordinates; ``batch`` ``(N,)`` slice of each box;
    ``scores`` ``(N,)``; ``info`` extra numbers (e.g. RSTN rounds and inter-iteration DSC).
    """

    prob: torch.Tensor
    boxes: torch.Tensor
    batch: torch.Tensor
    scores: torch.Tensor
    info: Optional[dict] = None

    def as_dict(self) -> dict:
        """The ``predict`` format of ``training/methods.py`` systems: ``prob`` ``(B, H, W)``, ``boxes``,
        ``box_batch``, ``box_scores``."""
        return {"prob": self.prob[:, 0], "boxes": self.boxes, "box_batch": self.batch, "box_scores": self.scores}

    @staticmethod
    def without_boxes(prob: torch.Tensor, info: Optional[dict] = None) -> "SlicePrediction":
        dev = prob.device
        return SlicePrediction(prob, torch.zeros(0, 4, device=dev), torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, device=dev), info)


def resolve_options(config: ModelConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``config.options``; unknown keys raise ``ValueError`` (a typo must not
    silently build another network; ``weights.load_model`` turns it into a ``WeightsError``)."""
    given = dict(config.options or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {config.architecture} option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}"
        )
    out = dict(defaults)
    out.update(given)
    return out


def check_binary(config: ModelConfig) -> None:
    if config.num_classes != 1:
        raise ValueError(f"{config.architecture} is implemented for one foreground class (num_classes=1), got {config.num_classes}")


def default_config(architecture: str, **fields) -> ModelConfig:
    """A :class:`ModelConfig` for a seed architecture (module defaults = the paper's settings);
    ``fields`` override ModelConfig fields, e.g. ``width=32`` or ``options={"converge_t": 0.99}``."""
    if architecture not in SEED_ARCHITECTURES + ("lsnet",):
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {('lsnet',) + SEED_ARCHITECTURES}")
    return ModelConfig(architecture=architecture, **fields)


def training_losses(model, images: torch.Tensor, masks: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """The training objective of any seed model: ``{"loss": scalar to back-propagate, ...}`` (other
    entries are detached numbers for logging).  ``images`` ``(B, C, H, W)`` in [0, 1], H and W multiples
    of 32; ``masks`` ``(B, H, W)`` {0, 1}."""
    if not hasattr(model, "training_losses"):
        raise TypeError(f"{type(model).__name__} has no training_losses(); L-SNet trains with lnet_losses/snet_losses")
    return model.training_losses(images, masks, **kwargs)


def predict_slices(model, images: torch.Tensor) -> SlicePrediction:
    """Foreground probability of preprocessed slices ``(B, C, H, W)`` for any seed model (eval mode)."""
    return model.predict_slices(images)


def box_of_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimal rectangle covering all foreground pixels of each image.

    ``mask`` ``(B, H, W)`` bool -> boxes ``(B, 4)`` ``(x0, y0, x1, y1)`` in edge coordinates (pixel p
    spans [p, p+1)) and ``has`` ``(B,)`` (False for an empty image, whose box is all zeros).
    """
    b, h, w = mask.shape
    rows = mask.any(2)
    cols = mask.any(1)
    has = rows.any(1)
    ar_h = torch.arange(h, device=mask.device)
    ar_w = torch.arange(w, device=mask.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(has.unsqueeze(1), boxes, torch.zeros_like(boxes)), has


def dsc_counts(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """``(|A n B|, |A| + |B|)`` of two boolean tensors (summed over everything)."""
    return int((a & b).sum()), int(a.sum()) + int(b.sum())


def dsc_from_counts(inter: int, total: int) -> float:
    """DSC = 2 |A n B| / (|A| + |B|); two empty sets agree perfectly (1.0)."""
    return 1.0 if total == 0 else 2.0 * inter / total
