"""The trainable systems of the paper's tables, each as one ``nn.Module`` whose ``forward(mode, ...)``
does one piece of an iteration (so ``DistributedDataParallel`` sees every pass through ``forward``).

* :class:`LSNetSystem` - L-SNet (section 2.5).  ``forward("lnet")`` = L_L-Net (Eq. 5) through
  ``LSNet.lnet_losses``; ``forward("snet")`` = RoI from a keypoint drawn among the top-3 peaks, RR,
  S-Net, L_S-Net (Eq. 6) with the gradient into L-Net decayed by gamma, through ``LSNet.snet_losses``
  (``roi_mode="crop"``: the quantised box is hard-cropped without gradient to L-Net - Table 2's
  "L-Net without RR" row).  Networks, targets and losses are the engine's (one code path).
* :class:`SegSystem` - one-stage U-Net or FCN on ResNet34 on the whole slice (Table 1 baselines).
* :class:`CoarseToFineSystem` - 2-D coarse-to-fine (Table 1): a coarse network (ResNet18) segments the
  slice, the box around its mask padded by 15 px is hard-cropped (integer pixel box, resized to the
  fine network's input), a fine network (ResNet34) segments the crop, the result is pasted back.  The
  fine network trains on crops around the ground-truth box jittered by a few pixels (``fine_box="gt"``,
  the usual practice of the cited cascades) or around the coarse prediction (``"coarse"``).

``predict(images)`` of every system maps ``(B, C, H, W)`` windowed slices to probabilities ``(B, H, W)``
and, for the two-stage systems, the first stage's boxes ``(N, 4)`` with their image index ``(N,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsnet.architectures import build_model
from lsnet.config import ModelConfig
from lsnet.errors import InputError
from lsnet.method.decode import decode, rois_from_cells, sample_topk_keypoints
from lsnet.method.losses import cls_loss, snet_loss
from lsnet.method.model import LSNet
from lsnet.method.recalibration import paste_back, recalibrate, theta_from_xyxy
from lsnet.method.snet import build_snet
from lsnet.pipeline.inference import lsnet_predict, merge_max
from lsnet.seeds.common import SEED_ARCHITECTURES, box_of_mask, predict_slices
from lsnet.seeds.common import training_losses as seed_training_losses


def seg_loss(logits: torch.Tensor, target: torch.Tensor, kind: str, mc: ModelConfig) -> torch.Tensor:
    """``paper``: L_cls = Focal + 0.2 Dice (section 2.5); ``bce``: binary cross-entropy (Table 2 ablation)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return cls_loss(logits, target, mc.dice_weight, mc.focal_alpha, mc.focal_gamma)


def quantised_boxes(boxes: torch.Tensor, pad: float, hw: tuple) -> torch.Tensor:
    """Grow ``(N, 4)`` boxes by ``pad`` px per side, snap outward to whole pixels, clip to the image."""
    h, w = hw
    x0 = (boxes[:, 0] - pad).floor().clamp(0, w - 1)
    y0 = (boxes[:, 1] - pad).floor().clamp(0, h - 1)
    x1 = torch.maximum((boxes[:, 2] + pad).ceil().clamp(1, w), x0 + 1)
    y1 = torch.maximum((boxes[:, 3] + pad).ceil().clamp(1, h), y0 + 1)
    return torch.stack([x0, y0, x1, y1], 1)


def hard_crop(images: torch.Tensor, boxes: torch.Tensor, size: tuple) -> tuple:
    """Crop integer boxes ``(N, 4)`` (one per image of ``images`` ``(N, C, H, W)``) and resize them to
    ``size`` bilinearly; returns ``(crops, theta)`` (theta for :func:`paste_back`)."""
    theta = theta_from_xyxy(boxes.float(), tuple(images.shape[-2:]), alpha=0.0)
    return recalibrate(images, theta, size), theta


def jittered_prompt_boxes(masks: torch.Tensor, fraction: float, side_mm: tuple, shift: float, pixel_mm: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Boxes a user might draw around the organ (ours, not the paper): for a random ``fraction`` of the
    slices with foreground, the tight box of the slice's foreground, each side moved outward by a
    uniform draw in ``side_mm`` (negative = tighter than the organ), the centre shifted by up to
    ``shift`` x the box size.  ``masks`` ``(B, H, W)``; returns ``(N, 5)`` = ``(slice, x0, y0, x1, y1)``
    in pixels of ``masks`` (``pixel_mm`` mm each)."""
    boxes, has = box_of_mask(masks > 0.5)
    dev = masks.device
    pick = has & (torch.rand(has.shape, device=dev, generator=generator) < fraction)
    idx = torch.nonzero(pick).flatten()
    if not len(idx):
        return torch.zeros(0, 5, device=dev)
    b = boxes[idx]
    n = len(idx)
    lo, hi = side_mm
    grow = (lo + (hi - lo) * torch.rand(n, 4, device=dev, generator=generator)) / pixel_mm
    size = torch.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    move = (2 * torch.rand(n, 2, device=dev, generator=generator) - 1) * shift * size
    out = torch.stack([b[:, 0] - grow[:, 0] + move[:, 0], b[:, 1] - grow[:, 1] + move[:, 1],
                       b[:, 2] + grow[:, 2] + move[:, 0], b[:, 3] + grow[:, 3] + move[:, 1]], 1)
    h, w = masks.shape[-2:]
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    c = (out[:, :2] + out[:, 2:]) / 2  # keep at least 2 px per axis
    half = ((out[:, 2:] - out[:, :2]) / 2).clamp(min=1.0)
    out = torch.cat([c - half, c + half], 1)
    return torch.cat([idx.float().unsqueeze(1), out], 1)


def negative_prompt_boxes(masks: torch.Tensor, prompts: torch.Tensor, fraction: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Boxes on slices without foreground (ours, not the paper): each such slice of the batch, with
    probability ``fraction``, gets the pixels of a random prompt box of the batch (``prompts`` ``(N, 5)``,
    from :func:`jittered_prompt_boxes`), so that S-Net learns to return nothing where a user's box holds
    no organ (one box dragged over a slice range beyond the pancreas).  ``masks`` ``(B, H, W)``;
    returns ``(M, 5)`` = ``(slice, x0, y0, x1, y1)``."""
    dev = masks.device
    empty = ~(masks > 0.5).flatten(1).any(1)
    pick = empty & (torch.rand(empty.shape, device=dev, generator=generator) < fraction)
    idx = torch.nonzero(pick).flatten()
    if not len(idx) or not len(prompts):
        return torch.zeros(0, 5, device=dev)
    src = prompts[torch.randint(len(prompts), (len(idx),), device=dev, generator=generator)]
    return torch.cat([idx.float().unsqueeze(1), src[:, 1:]], 1)


class LSNetSystem(nn.Module):
    def __init__(self, mc: ModelConfig, topk: int = 3, roi_mode: str = "rr", prompt_boxes: float = 0.0,
                 prompt_jitter_mm: tuple = (-2.0, 10.0), prompt_shift: float = 0.1, prompt_negatives: float = 0.0):
        super().__init__()
        self.model = LSNet(mc)
        self.topk = topk
        self.roi_mode = roi_mode
        self.prompt_boxes = float(prompt_boxes)
        self.prompt_jitter_mm = tuple(float(v) for v in prompt_jitter_mm)
        self.prompt_shift = float(prompt_shift)
        self.prompt_negatives = float(prompt_negatives)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def first_stage_parameters(self):
        return list(self.model.lnet.parameters())

    def forward(self, mode: str, images: torch.Tensor, masks: torch.Tensor | None = None, gamma: float | None = None):
        if mode == "lnet":
            return self.model.lnet_losses(images, masks)
        if mode == "snet":
            if self.roi_mode == "rr":
                prompts = None
                if self.prompt_boxes > 0 and self.training:
                    prompts = jittered_prompt_boxes(masks, self.prompt_boxes, self.prompt_jitter_mm, self.prompt_shift,
                                                    self.config.roi_source_spacing)
                    if self.prompt_negatives > 0:
                        prompts = torch.cat([prompts, negative_prompt_boxes(masks, prompts, self.prompt_negatives)])
                return self.model.snet_losses(images, masks, gamma=gamma, topk=self.topk, prompt_boxes=prompts)
            return self._snet_crop(images, masks)
        if mode == "predict":
            return self.predict(images)
        raise ValueError(mode)

    def _snet_crop(self, images, masks):
        """Table 2 ablation: the drawn RoI, quantised and hard-cropped, no gradient to L-Net."""
        c = self.config
        with torch.no_grad():
            logits, T = self.model.lnet(images)
            heat = torch.sigmoid(logits.float())
            cells, scores = sample_topk_keypoints(heat, self.topk)
            batch = torch.arange(images.shape[0], device=images.device)
            rois = rois_from_cells(T.float(), batch, cells, scores, c.min_box_size)
            boxes = quantised_boxes(rois.boxes, c.alpha / 2, tuple(images.shape[-2:]))
        size = (c.roi_size, c.roi_size)
        roi, theta = hard_crop(images, boxes, size)
        with torch.no_grad():
            target = (recalibrate(masks.unsqueeze(1).float(), theta, size) > 0.5).float()
        mlog = self.model.snet(roi)
        loss = snet_loss(mlog, target, c.dice_weight, c.focal_alpha, c.focal_gamma)
        return {"loss": loss, "theta": theta, "roi_logits": mlog.detach(), "roi_target": target}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict:
        """Inference rule of section 2.5 on windowed inputs: K > 0.5 -> components -> RoIs -> RR (or
        hard crop) -> S-Net -> theta^-1 -> pixel-wise max over the RoIs of a slice."""
        if self.roi_mode == "rr":  # the engine's own inference rule
            prob, heat, rois = lsnet_predict(self.model, images)
        else:  # Table 2 ablation: hard crop of the quantised box instead of RR
            c = self.config
            b, _, h, w = images.shape
            logits, T = self.model.lnet(images)
            heat = torch.sigmoid(logits.float())
            rois = decode(heat, T.float(), c.heatmap_threshold, c.min_box_size)
            prob = images.new_zeros(b, h, w, dtype=torch.float32)
            if len(rois):
                roi, theta = hard_crop(images[rois.batch], quantised_boxes(rois.boxes, c.alpha / 2, (h, w)), (c.roi_size, c.roi_size))
                p = torch.sigmoid(self.model.snet(roi).float()[:, :1])
                prob = merge_max(paste_back(p, theta, (h, w))[:, 0], rois.batch, b)
        return {"prob": prob, "boxes": rois.boxes.float(), "box_batch": rois.batch, "box_scores": rois.scores, "heat": heat}


class SegSystem(nn.Module):
    """One network on the whole slice."""

    def __init__(self, mc: ModelConfig, structure: str = "unet", backbone: str = "resnet34", loss: str = "paper"):
        super().__init__()
        self.mc = mc
        self.net = build_snet(structure, backbone, mc.in_channels, mc.num_classes, mc.width)
        self.loss_kind = loss

    def forward(self, mode: str, images: torch.Tensor, masks: torch.Tensor | None = None, **_):
        if mode == "seg":
            logits = self.net(images)
            return {"loss": seg_loss(logits[:, :1], masks.unsqueeze(1).float(), self.loss_kind, self.mc)}
        if mode == "predict":
            return self.predict(images)
        raise ValueError(mode)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict:
        return {"prob": torch.sigmoid(self.net(images).float()[:, 0])}


def mask_boxes(masks: torch.Tensor) -> tuple:
    """Union box ``(x0, y0, x1, y1)`` of every non-empty mask ``(B, H, W)`` -> ``(boxes (N, 4), batch (N,))``."""
    boxes, has = box_of_mask(masks > 0)
    idx = torch.nonzero(has).flatten()
    return boxes[idx].float(), idx


class CoarseToFineSystem(nn.Module):
    def __init__(self, mc: ModelConfig, structure: str = "unet", coarse_backbone: str = "resnet18",
                 fine_backbone: str = "resnet34", pad: float = 15.0, fine_box: str = "gt", jitter: float = 8.0,
                 loss: str = "paper"):
        super().__init__()
        self.mc = mc
        self.coarse = build_snet(structure, coarse_backbone, mc.in_channels, mc.num_classes, mc.width)
        self.fine = build_snet(structure, fine_backbone, mc.in_channels, mc.num_classes, mc.width)
        self.pad, self.fine_box, self.jitter, self.loss_kind = float(pad), fine_box, float(jitter), loss

    def first_stage_parameters(self):
        return list(self.coarse.parameters())

    def forward(self, mode: str, images: torch.Tensor, masks: torch.Tensor | None = None, **_):
        if mode == "coarse":
            logits = self.coarse(images)
            return {"loss": seg_loss(logits[:, :1], masks.unsqueeze(1).float(), self.loss_kind, self.mc)}
        if mode == "fine":
            return self._fine_loss(images, masks)
        if mode == "predict":
            return self.predict(images)
        raise ValueError(mode)

    def _fine_loss(self, images, masks):
        hw = tuple(images.shape[-2:])
        with torch.no_grad():
            if self.fine_box == "coarse":
                cm = torch.sigmoid(self.coarse(images).float()[:, 0]) > 0.5
                boxes, idx = mask_boxes(cm)
                gt_boxes, gt_idx = mask_boxes(masks > 0)
                missing = ~torch.isin(gt_idx, idx)
                boxes = torch.cat([boxes, gt_boxes[missing]])
                idx = torch.cat([idx, gt_idx[missing]])
            else:
                boxes, idx = mask_boxes(masks > 0)
                if self.jitter > 0 and len(idx):
                    boxes = boxes + (torch.rand_like(boxes) * 2 - 1) * self.jitter
            qb = quantised_boxes(boxes, self.pad, hw)
        if len(idx) == 0:  # no foreground and no coarse detection in the batch: nothing for the fine net
            return {"loss": sum(p.sum() * 0.0 for p in self.fine.parameters()), "num_crops": 0}
        size = (self.mc.roi_size, self.mc.roi_size)
        crops, theta = hard_crop(images[idx], qb, size)
        with torch.no_grad():
            target = (recalibrate(masks[idx].unsqueeze(1).float(), theta, size) > 0.5).float()
        logits = self.fine(crops)
        return {"loss": seg_loss(logits[:, :1], target, self.loss_kind, self.mc), "num_crops": int(len(idx))}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict:
        b, _, h, w = images.shape
        cm = torch.sigmoid(self.coarse(images).float()[:, 0]) > 0.5
        boxes, idx = mask_boxes(cm)
        prob = images.new_zeros(b, h, w, dtype=torch.float32)
        qb = quantised_boxes(boxes, self.pad, (h, w)) if len(idx) else boxes
        if len(idx):
            size = (self.mc.roi_size, self.mc.roi_size)
            crops, theta = hard_crop(images[idx], qb, size)
            p = torch.sigmoid(self.fine(crops).float()[:, :1])
            prob = merge_max(paste_back(p, theta, (h, w))[:, 0], idx, b)
        return {"prob": prob, "boxes": boxes, "box_batch": idx, "box_scores": torch.ones(len(idx), device=images.device)}


class SeedSystem(nn.Module):
    """A seed system of issue 5 (RSTN, DSMS U-Net, RPN-FCN: ``lsnet.seeds.common``) trained end to end on
    its own objective (``training_losses``), one optimiser step per iteration, as in its paper."""

    def __init__(self, mc: ModelConfig):
        super().__init__()
        self.model = build_model(mc)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def first_stage_parameters(self):
        return []

    def forward(self, mode: str, images: torch.Tensor, masks: torch.Tensor | None = None, **_):
        if mode == "seed":
            return seed_training_losses(self.model, images, masks)
        if mode == "predict":
            return self.predict(images)
        raise ValueError(mode)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict:
        return predict_slices(self.model, images).as_dict()


def build_system(cfg: dict) -> nn.Module:
    """The system named by ``cfg["method"]`` (see :mod:`training.config`)."""
    mc = ModelConfig.from_dict(cfg["model"])
    m = cfg["method"]
    bl = cfg["baseline"]
    loss = cfg["loss"]["kind"]
    if m == "lsnet":
        if loss != "paper":
            raise InputError("loss.kind='bce' is only available for the baselines (Table 2 ablates it on S-Net alone)")
        ls = cfg["lsnet"]
        if ls["roi_mode"] != "rr" and mc.roi_source_factor != 1:
            raise InputError("lsnet.roi_mode=crop (Table 2's ablation) is defined on L-Net's grid: use model.roi_source_factor=1")
        return LSNetSystem(mc, int(ls["topk"]), ls["roi_mode"], float(ls["prompt_boxes"]), tuple(ls["prompt_jitter_mm"]),
                           float(ls["prompt_shift"]), float(ls.get("prompt_negatives", 0.0)))  # older runs lack the key
    if m in ("unet", "fcn"):
        return SegSystem(mc, m, bl["backbone"], loss)
    if m in SEED_ARCHITECTURES:
        mc.architecture = m
        return SeedSystem(mc)
    if m == "c2f":
        return CoarseToFineSystem(mc, bl["structure"], bl["coarse_backbone"], bl["backbone"], bl["pad"],
                                  bl["fine_box"], bl["jitter"], loss)
    raise ValueError(m)


DECISION_THRESHOLDS = ("mask_threshold", "heatmap_threshold")
"""The model's decision thresholds that a calibration may set (``ModelConfig`` fields)."""


def set_decision_thresholds(model, thresholds: dict | None, error: type = InputError, what: str = "the model") -> None:
    """Set ``thresholds`` (``{"mask_threshold": 0.4, "heatmap_threshold": None}``; None = keep) on
    ``model.config``; a key the model lacks or a value outside (0, 1) raises ``error``."""
    for key, value in (thresholds or {}).items():
        if value is None:
            continue
        config = getattr(model, "config", None)
        if key not in DECISION_THRESHOLDS or config is None or not hasattr(config, key):
            raise error(f"{what} has no decision threshold {key!r}")
        if not 0.0 < float(value) < 1.0:
            raise error(f"{key} must lie strictly between 0 and 1 (a probability), not {value}")
        setattr(config, key, float(value))


def training_phases(cfg: dict) -> list:
    """The forward modes of one iteration, each followed by its own optimiser step: the method's own
    (``["lnet", "snet"]`` for L-SNet), or the subset ``train.phases`` names (e.g. ``["snet"]`` for a
    fine-tuning stage of S-Net alone)."""
    if cfg["method"] in SEED_ARCHITECTURES:
        own = ["seed"]
    else:
        own = {"lsnet": ["lnet", "snet"], "unet": ["seg"], "fcn": ["seg"], "c2f": ["coarse", "fine"]}[cfg["method"]]
    chosen = cfg["train"].get("phases")
    if chosen is None:
        return own
    if not isinstance(chosen, list) or not chosen or any(p not in own for p in chosen):
        raise InputError(f"train.phases must be null or a non-empty list drawn from {own} for method "
                         f"{cfg['method']!r}, not {chosen!r}")
    return [p for p in own if p in chosen]
