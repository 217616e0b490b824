"""L-SNet = L-Net + RoI recalibration + S-Net (paper Fig. 2), and its two training losses.

The training losses live here (not in ``training/``) so that training, tests and benchmarks share one
code path; ``training/train.py`` owns the loop, optimisers and data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsnet.config import ModelConfig
from lsnet.method.decode import rois_from_cells, sample_topk_keypoints
from lsnet.method.heatmap import targets_from_masks
from lsnet.method.lnet import LNet
from lsnet.method.losses import lnet_loss, snet_loss
from lsnet.method.recalibration import decay_gradient, recalibrate, theta_from_box, theta_from_xyxy
from lsnet.method.snet import build_snet


def pool_to_lnet(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The RoI-source canvas ``(B, C, f*H, f*W)`` -> L-Net's input ``(B, C, H, W)`` (average pooling by
    ``factor``; identity for 1).  Exact pooling keeps the field of view, so normalised coordinates
    (theta) mean the same point in both."""
    return images if factor == 1 else F.avg_pool2d(images, factor)


def pool_masks(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """``(B, f*H, f*W)`` binary masks -> ``(B, H, W)`` on L-Net's grid (a cell is foreground when at
    least half of its fine pixels are)."""
    if factor == 1:
        return masks
    return (F.avg_pool2d(masks.float().unsqueeze(1), factor)[:, 0] >= 0.5).to(masks.dtype)


class LSNet(nn.Module):
    """``lnet(x)`` -> heatmap logits and T; ``snet(roi)`` -> mask logits (see lnet.py / snet.py).

    With ``config.roi_source_factor = f > 1`` (ours, not the paper) the training losses take the
    RoI-source canvas ``(B, C, f*H, f*W)`` and its masks: L-Net sees them pooled by ``f``
    (:func:`pool_to_lnet`), RR samples the RoI from the fine canvas with the same theta.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        self.lnet = LNet(c.lnet_backbone, c.in_channels, c.width)
        self.snet = build_snet(c.snet_structure, c.snet_backbone, c.in_channels, c.num_classes, c.snet_channels)
        if c.box_snet_width:  # ours: a second S-Net for user-drawn boxes only (config.box_snet_width)
            self.box_snet = build_snet(c.snet_structure, c.snet_backbone, c.in_channels, c.num_classes, c.box_snet_width)

    # ---------------------------------------------------------------- training (section 2.5)
    def lnet_losses(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """First half of an iteration: L_L-Net (Eq. 5).

        ``images`` ``(B, C, H, W)`` preprocessed slices; ``masks`` ``(B, H, W)`` binary labels.
        Also returns ``heat``/``T`` (detached) for the RoI draw.
        """
        c = self.config
        f = c.roi_source_factor
        kstar, tstar, _ = targets_from_masks(pool_masks(masks, f), c.delta, c.beta)
        logits, T = self.lnet(pool_to_lnet(images, f))
        out = lnet_loss(logits, T, kstar, tstar, c.lam, c.dice_weight, c.focal_alpha, c.focal_gamma)
        out["heat"] = torch.sigmoid(logits.detach().float())
        return out

    def snet_losses(self, images: torch.Tensor, masks: torch.Tensor, gamma: float | None = None, topk: int = 3,
                    prompt_boxes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Second half: RoI from a random top-``topk`` keypoint, RR, S-Net, L_S-Net (Eq. 6).

        L-Net is run again (its parameters were just updated) so the S-Net loss reaches L-Net's box
        outputs through theta with the gradient scaled by ``gamma`` (default: config.gamma).
        The target mask is recalibrated with the same (detached) theta, bilinearly, and thresholded at
        0.5.  Slices without foreground still train S-Net (empty target): at inference a false RoI
        must produce an empty mask.

        ``prompt_boxes`` ``(N, 5)`` = ``(slice, x0, y0, x1, y1)`` in pixels of ``images`` (ours, not
        the paper): extra RoIs, e.g. jittered ground-truth boxes, that train S-Net for user-drawn boxes
        (``Segmenter.segment_box``); they carry no gradient into L-Net and join the same loss.
        ``topk = 0`` (ours) draws no L-Net RoI at all: S-Net trains on the prompt boxes alone and L-Net
        is not run; with no prompt box in the batch the result is ``{"loss": None}`` (no step).
        """
        c = self.config
        f = c.roi_source_factor
        gamma = c.gamma if gamma is None else gamma
        small_hw = (images.shape[-2] // f, images.shape[-1] // f)
        thetas, src, src_masks = [], [], []
        if topk > 0:
            logits, T = self.lnet(pool_to_lnet(images, f))
            heat = torch.sigmoid(logits.detach().float())
            cells, scores = sample_topk_keypoints(heat, topk)
            batch = torch.arange(images.shape[0], device=images.device)
            rois = rois_from_cells(T.float(), batch, cells, scores, c.min_box_size)
            thetas.append(decay_gradient(theta_from_box(rois.keypoints, rois.ltrb, small_hw, c.alpha), gamma))
            src.append(images)
            src_masks.append(masks)
        if prompt_boxes is not None and len(prompt_boxes):
            idx = prompt_boxes[:, 0].long()
            thetas.append(theta_from_xyxy(prompt_boxes[:, 1:].float() / f, small_hw, c.alpha))
            src.append(images[idx])
            src_masks.append(masks[idx])
        if not thetas:
            return {"loss": None}
        theta, src, src_masks = torch.cat(thetas), torch.cat(src), torch.cat(src_masks)
        size = (c.roi_size, c.roi_size)
        roi = recalibrate(src, theta, size)
        with torch.no_grad():
            target = (recalibrate(src_masks.unsqueeze(1).float(), theta.detach(), size) > 0.5).float()
        if hasattr(self.snet, "forward_with_aux"):  # DSMS U-Net as S-Net: + its restoration loss
            mlog, aux = self.snet.forward_with_aux(roi)
        else:
            mlog, aux = self.snet(roi), None
        loss = snet_loss(mlog, target, c.dice_weight, c.focal_alpha, c.focal_gamma)
        if aux is not None:
            loss = loss + aux
        return {"loss": loss, "theta": theta.detach(), "roi_logits": mlog.detach(), "roi_target": target}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> L-Net outputs (heatmap probabilities, T); see ``inference.py`` for the rest."""
        logits, T = self.lnet(images)
        return torch.sigmoid(logits), T


def box_prompt_snet(model: nn.Module) -> nn.Module:
    """The network that segments user-drawn boxes: ``model.box_snet`` when the model has one
    (``config.box_snet_width > 0``, ours), else S-Net (the paper's one network).  ``model`` is an
    ``LSNet`` or an ``LSNetEnsemble``."""
    box = getattr(model, "box_snet", None)
    return model.snet if box is None else box


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

