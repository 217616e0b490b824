"""L-SNet = L-Net + RoI recalibration + S-Net (paper Fig. 2), and its two training losses.

The training losses live here (not in ``training/``) so that training, tests and benchmarks share one
code path; ``training/train.py`` owns the loop, optimisers and data.
"""

from __future__ import annotations

import torch
from torch import nn

from lsnet.config import ModelConfig
from lsnet.method.decode import rois_from_cells, sample_topk_keypoints
from lsnet.method.heatmap import targets_from_masks
from lsnet.method.lnet import LNet
from lsnet.method.losses import lnet_loss, snet_loss
from lsnet.method.recalibration import decay_gradient, recalibrate, theta_from_box
from lsnet.method.snet import build_snet


class LSNet(nn.Module):
    """``lnet(x)`` -> heatmap logits and T; ``snet(roi)`` -> mask logits (see lnet.py / snet.py)."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        self.lnet = LNet(c.lnet_backbone, c.in_channels, c.width)
        self.snet = build_snet(c.snet_structure, c.snet_backbone, c.in_channels, c.num_classes, c.width)

    # ---------------------------------------------------------------- training (section 2.5)
    def lnet_losses(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """First half of an iteration: L_L-Net (Eq. 5).

        ``images`` ``(B, C, H, W)`` preprocessed slices; ``masks`` ``(B, H, W)`` binary labels.
        Also returns ``heat``/``T`` (detached) for the RoI draw.
        """
        c = self.config
        kstar, tstar, _ = targets_from_masks(masks, c.delta, c.beta)
        logits, T = self.lnet(images)
        out = lnet_loss(logits, T, kstar, tstar, c.lam, c.dice_weight, c.focal_alpha, c.focal_gamma)
        out["heat"] = torch.sigmoid(logits.detach().float())
        return out

    def snet_losses(self, images: torch.Tensor, masks: torch.Tensor, gamma: float | None = None, topk: int = 3) -> dict[str, torch.Tensor]:
        """Second half: RoI from a random top-``topk`` keypoint, RR, S-Net, L_S-Net (Eq. 6).

        L-Net is run again (its parameters were just updated) so the S-Net loss reaches L-Net's box
        outputs through theta with the gradient scaled by ``gamma`` (default: config.gamma).
        The target mask is recalibrated with the same (detached) theta, bilinearly, and thresholded at
        0.5.  Slices without foreground still train S-Net (empty target): at inference a false RoI
        must produce an empty mask.
        """
        c = self.config
        gamma = c.gamma if gamma is None else gamma
        logits, T = self.lnet(images)
        heat = torch.sigmoid(logits.detach().float())
        cells, scores = sample_topk_keypoints(heat, topk)
        batch = torch.arange(images.shape[0], device=images.device)
        rois = rois_from_cells(T.float(), batch, cells, scores, c.min_box_size)
        theta = theta_from_box(rois.keypoints, rois.ltrb, images.shape[-2:], c.alpha)
        theta = decay_gradient(theta, gamma)
        size = (c.roi_size, c.roi_size)
        roi = recalibrate(images, theta, size)
        with torch.no_grad():
            target = (recalibrate(masks.unsqueeze(1).float(), theta.detach(), size) > 0.5).float()
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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

