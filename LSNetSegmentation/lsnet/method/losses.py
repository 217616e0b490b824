"""Losses of section 2.5: L_cls = Focal + 0.2 Dice, L_reg = DIoU, Eqs. 5 and 6.

Open choices (docs/method.md):

* Focal loss (Lin et al. 2017), gamma = 2 (their default) and alpha = 0.5 (neutral; their 0.25 pairs
  with a 0.05 score threshold, ours is the paper's 0.5 — see config.py), in the binary form that also
  accepts the soft targets K* of Eq. 1:
  ``FL = -[a t (1-p)^g log p + (1-a)(1-t) p^g log(1-p)]``; mean over all positions (1/N_l, 1/N_s).
* Dice loss: ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` per image, averaged over the batch; the
  "+1" smoothing makes an empty prediction on an empty target a zero loss.
* DIoU (Zheng et al. 2020) between the boxes ``(u-l, v-t, u+r, v+b)`` and ``(u-l*, v-t*, u+r*, v+b*)``
  of the same point: ``1 - IoU + rho^2 / c^2`` (rho = centre distance, c = diagonal of the enclosing
  box); averaged over positives ``K* >= 0.5`` (1/N_l^+).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 2.0) -> torch.Tensor:
    """Mean binary focal loss; ``logits`` and ``target`` (in [0, 1]) of the same shape."""
    logits = logits.float()
    p = torch.sigmoid(logits)
    logp = F.logsigmoid(logits)
    log1mp = F.logsigmoid(-logits)
    pos = alpha * target * (1 - p) ** gamma * logp
    neg = (1 - alpha) * (1 - target) * p**gamma * log1mp
    return -(pos + neg).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image (all dims after the first), averaged over the batch."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def cls_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.2, alpha: float = 0.5, gamma: float = 2.0) -> torch.Tensor:
    """L_cls of section 2.5: Focal + ``dice_weight`` * Dice."""
    return focal_loss(logits, target, alpha, gamma) + dice_weight * dice_loss(logits, target)


def diou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """DIoU loss per element for point-anchored distances ``(..., 4)`` = (l, r, t, b) -> ``(...)``."""
    pred = pred.float()
    target = target.float()
    pl, pr, pt, pb = pred.unbind(-1)
    tl, tr, tt, tb = target.unbind(-1)
    # boxes relative to the shared point: x in [-l, r], y in [-t, b]
    iw = (torch.minimum(pr, tr) + torch.minimum(pl, tl)).clamp_min(0)
    ih = (torch.minimum(pb, tb) + torch.minimum(pt, tt)).clamp_min(0)
    inter = iw * ih
    area_p = (pl + pr) * (pt + pb)
    area_t = (tl + tr) * (tt + tb)
    iou = inter / (area_p + area_t - inter + eps)
    cw = torch.maximum(pr, tr) + torch.maximum(pl, tl)
    ch = torch.maximum(pb, tb) + torch.maximum(pt, tt)
    c2 = cw**2 + ch**2 + eps
    rho2 = (((pr - pl) - (tr - tl)) / 2) ** 2 + (((pb - pt) - (tb - tt)) / 2) ** 2
    return 1 - iou + rho2 / c2


def lnet_loss(heat_logits, T, kstar, tstar, lam=0.5, dice_weight=0.2, focal_alpha=0.5, focal_gamma=2.0) -> dict[str, torch.Tensor]:
    """Eq. 5.  ``heat_logits`` ``(B,1,h,w)``, ``T``/``tstar`` ``(B,4,h,w)``, ``kstar`` ``(B,1,h,w)``.

    Returns ``{"loss", "cls", "reg", "num_pos"}``; ``reg`` is 0 when a batch has no positive.
    """
    lcls = cls_loss(heat_logits, kstar, dice_weight, focal_alpha, focal_gamma)
    pos = (kstar >= 0.5).squeeze(1)  # (B, h, w)
    npos = pos.sum()
    if int(npos) > 0:
        lreg = diou_loss(T.permute(0, 2, 3, 1)[pos], tstar.permute(0, 2, 3, 1)[pos]).sum() / npos
    else:
        lreg = T.sum() * 0.0
    return {"loss": lcls + lam * lreg, "cls": lcls.detach(), "reg": lreg.detach(), "num_pos": npos}


def snet_loss(mask_logits, mask_target, dice_weight=0.2, focal_alpha=0.5, focal_gamma=2.0) -> torch.Tensor:
    """Eq. 6: L_cls over the S-Net output ``(N, C, Hs, Ws)`` and its target of the same shape."""
    return cls_loss(mask_logits, mask_target, dice_weight, focal_alpha, focal_gamma)
