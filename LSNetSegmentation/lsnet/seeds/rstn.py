"""Saliency Transformation Network (Yu et al., AAAI 2018, "RSTN"), axial view.

Pieces (paper section "Formulation", Eq. 1-2)::

    Z^C = f^C(X; theta^C)                         coarse FCN on the whole slice      (B, 1, H, W)
    X^F = Crop[X (x) g(Z^C; theta^T); Z^C]        saliency transformation, then crop (B, C, Hf, Wf)
    Z^F = f^F(X^F; theta^F)                       fine FCN on the crop               (B, 1, Hf, Wf)
    L   = lambda L{Y, Z^C} + (1 - lambda) L{Y^F, Z^F},  lambda = 1/3,  L = soft-DSC loss   (Eq. 2)

* ``f^C``, ``f^F``: two independent FCN-8s (``snet.FCNSNet``, the engine's FCN-8s on a
  ``config.snet_backbone`` ResNet encoder; the paper uses VGG-based FCN-8s).  Option ``structure``
  ("fcn" default, "unet" = ``snet.UNetSNet``).
* ``g`` (:class:`SaliencyTransform`): size-preserving convolutions of the coarse *score map*
  (probability, sigmoid of the coarse logits) producing one weight map per input channel (``g`` has
  "the same dimensionality as X").  Default = the paper's best variant: two stacked 5x5 layers
  (option ``saliency_kernels``; ``[1]``, ``[3]``, ``[5]``, ``[3, 3]`` are the Table 1 variants).
* Crop: binarise the reference map at 0.5, take the minimal rectangle covering all activated pixels
  and add a ``crop_margin``-pixel margin on every side (Zhou et al. 2016).  In training the reference
  is the ground truth (paper), optionally the coarse prediction (``crop_from="coarse"``, the paper's
  "fine-tuning with noisy data" phase).
* Testing: coarse pass, then at most ``max_rounds`` (10) fine rounds; round r uses the score map of
  round r-1 both for ``g`` and for the crop; the fine probability is pasted back into the slice (0
  outside the crop); slices whose reference is empty are not refined (stay empty, as in the paper);
  stop when the inter-iteration DSC > ``converge_t`` (0.95; 0.99 is the paper's stricter setting).
  Over a volume this is done by ``seed_models.SeedSegmenter``; ``predict_slices`` applies the same
  rule to the batch of slices it is given.

Open choices / deviations (also in docs/seed_models.md):

* The crop is resampled to ``fine_size x fine_size`` (default ``config.roi_size``) with the engine's
  differentiable RoI sampler (``recalibration.recalibrate``, bilinear, the margin as ``alpha = 2 K``)
  and pasted back with ``recalibration.paste_back``.  The paper feeds the crop at its native size
  (FCN accepts any size); a fixed size keeps one tensor per batch.  The image is therefore also
  zoomed, like L-SNet's RR.  The gradient of the fine loss reaches ``g`` and the coarse FCN through
  the sampled pixels (the crop box itself is not differentiable, as in the paper).
* ``crop_margin`` K = 20 pixels of the 1.25 mm canvas (25 mm).  The paper's K is in pixels of the
  0.5-1 mm originals (value not stated in this paper; 20 in Zhou et al.'s code).
* Soft DSC loss with +1 smoothing (``losses.dice_loss``) per slice, averaged over the batch, so an
  empty slice (the paper's training uses all slices; its loss is undefined on empty ones) has a loss
  that is 0 for an empty prediction.  Slices whose reference is empty have no fine term.
* ``g``: ReLU between stacked layers (3 hidden channels: the paper's g has 3 channels because its
  input has 3 slices; with one hidden channel a dead ReLU can cut the saliency path), no activation
  after the last layer (weights may be negative); all biases start at 1 so that hidden units are
  alive and ``X (x) g(Z) ~ X`` at initialisation (the paper gives no initialisation).
* Only the axial view; the three-view fusion and the 3-slice input of the paper are not implemented
  (``config.in_channels = 3`` gives the 2.5-D input, with one weight map per channel).
"""

from __future__ import annotations

import torch
from torch import nn

from lsnet.config import ModelConfig
from lsnet.method.losses import dice_loss
from lsnet.method.recalibration import paste_back, recalibrate, theta_from_xyxy
from lsnet.method.snet import build_snet
from lsnet.seeds.common import (
    SlicePrediction,
    box_of_mask,
    check_binary,
    dsc_counts,
    dsc_from_counts,
    resolve_options,
)

RSTN_DEFAULTS = {
    "structure": "fcn",  # paper: FCN-8s for both stages
    "saliency_kernels": [5, 5],  # paper's best: two stacked 5x5 layers
    "lambda": 1.0 / 3.0,  # paper, Eq. 2
    "crop_margin": 20,  # K (canvas pixels per side); *open*, see module docstring
    "converge_t": 0.95,  # paper: t = 0.95 (0.99 the stricter option)
    "max_rounds": 10,  # paper: at most T = 10 rounds
    "fine_size": None,  # None -> config.roi_size; *open* (paper: native crop size)
}


class SaliencyTransform(nn.Module):
    """``g(Z; theta^T)``: ``(B, 1, H, W)`` score map -> ``(B, channels, H, W)`` spatial weights.

    Stacked size-preserving convolutions (padding k // 2, stride 1) with ReLU between them; the
    receptive field of ``[5, 5]`` is 9 x 9 pixels.  Hidden layers have ``max(hidden, channels)``
    channels (3 = the paper's three weight maps, whatever the input channel count).
    """

    def __init__(self, channels: int = 1, kernels=(5, 5), hidden: int = 3):
        super().__init__()
        if not kernels or any(int(k) % 2 == 0 or int(k) < 1 for k in kernels):
            raise ValueError(f"saliency kernels must be odd sizes >= 1 (size-preserving), got {list(kernels)}")
        layers: list[nn.Module] = []
        cin = 1
        hidden = max(int(hidden), channels)
        for i, k in enumerate(kernels):
            last = i == len(kernels) - 1
            layers.append(nn.Conv2d(cin, channels if last else hidden, int(k), padding=int(k) // 2))
            if not last:
                layers.append(nn.ReLU(inplace=True))
            cin = hidden
        self.layers = nn.Sequential(*layers)
        # every bias starts at 1: hidden units are alive (score >= 0) and X (x) g(Z) ~ X at the start
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d):
                nn.init.constant_(layer.bias, 1.0)

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        return self.layers(score)


class RSTN(nn.Module):
    """Coarse FCN + saliency transformation + fine FCN (module docstring)."""

    iterative = True

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig(architecture="rstn")
        c = self.config
        check_binary(c)
        o = resolve_options(c, RSTN_DEFAULTS)
        self.options = o
        self.lam = float(o["lambda"])
        self.crop_margin = float(o["crop_margin"])
        self.converge_t = float(o["converge_t"])
        self.max_rounds = int(o["max_rounds"])
        self.fine_size = int(o["fine_size"] or c.roi_size)
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"rstn lambda must be in [0, 1], got {self.lam}")
        self.coarse = build_snet(o["structure"], c.snet_backbone, c.in_channels, 1, c.width)
        self.saliency = SaliencyTransform(c.in_channels, o["saliency_kernels"])
        self.fine = build_snet(o["structure"], c.snet_backbone, c.in_channels, 1, c.width)

    # ---------------------------------------------------------------- the pieces
    def coarse_probs(self, images: torch.Tensor) -> torch.Tensor:
        """``Z^C = sigmoid(f^C(X))``: ``(B, C, H, W)`` -> ``(B, 1, H, W)``."""
        return torch.sigmoid(self.coarse(images))

    def crop_theta(self, boxes: torch.Tensor, image_hw) -> torch.Tensor:
        """Tight boxes ``(N, 4)`` (input px) -> sampling affine ``(N, 2, 3)`` of the box + K px per side."""
        return theta_from_xyxy(boxes.float(), tuple(image_hw), 2.0 * self.crop_margin)

    def fine_logits(self, images: torch.Tensor, score: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """``f^F(Crop[X (x) g(Z)])`` for N slices: ``images`` ``(N, C, H, W)``, ``score`` ``(N, 1, H, W)``,
        ``theta`` ``(N, 2, 3)`` -> fine logits ``(N, 1, fine_size, fine_size)``."""
        weighted = images * self.saliency(score.to(images.dtype))
        crop = recalibrate(weighted, theta, (self.fine_size, self.fine_size))
        return self.fine(crop)

    def refine(self, images: torch.Tensor, ref: torch.Tensor):
        """One fine round: reference score map ``ref`` ``(B, 1, H, W)`` -> new score map ``(B, 1, H, W)``
        (fine probability pasted back, 0 outside the crop and on slices with an empty reference),
        tight crop boxes ``(B, 4)`` and ``has`` ``(B,)`` (slices that were refined)."""
        boxes, has = box_of_mask(ref[:, 0] > 0.5)
        out = torch.zeros_like(ref, dtype=torch.float32)
        idx = torch.nonzero(has).flatten()
        if len(idx):
            theta = self.crop_theta(boxes[idx], images.shape[-2:])
            p = torch.sigmoid(self.fine_logits(images[idx], ref[idx], theta).float())
            out[idx] = paste_back(p, theta, tuple(images.shape[-2:]))
        return out, boxes, has

    # ---------------------------------------------------------------- training (Eq. 2)
    def training_losses(self, images: torch.Tensor, masks: torch.Tensor, crop_from: str = "truth") -> dict[str, torch.Tensor]:
        """Joint loss of Eq. 2.  ``images`` ``(B, C, H, W)``, ``masks`` ``(B, H, W)``.

        ``crop_from``: "truth" (paper's training: the crop box comes from the ground truth) or
        "coarse" (paper's fine-tuning with noisy data: from the binarised coarse prediction).
        The saliency weights are always computed from the coarse score map (differentiable path).
        """
        if crop_from not in ("truth", "coarse"):
            raise ValueError(f"crop_from must be 'truth' or 'coarse', got {crop_from!r}")
        y = masks.float()
        logits_c = self.coarse(images)
        loss_c = dice_loss(logits_c, y.unsqueeze(1))
        score = torch.sigmoid(logits_c.float())
        ref = y if crop_from == "truth" else (score.detach()[:, 0] > 0.5).float()
        boxes, has = box_of_mask(ref > 0.5)
        idx = torch.nonzero(has).flatten()
        if len(idx):
            theta = self.crop_theta(boxes[idx], images.shape[-2:])
            logits_f = self.fine_logits(images[idx], score[idx], theta)
            with torch.no_grad():
                target_f = (recalibrate(y[idx].unsqueeze(1), theta, (self.fine_size, self.fine_size)) > 0.5).float()
            loss_f = dice_loss(logits_f, target_f)
        else:
            loss_f = logits_c.sum() * 0.0
        loss = self.lam * loss_c + (1.0 - self.lam) * loss_f
        return {"loss": loss, "coarse": loss_c.detach(), "fine": loss_f.detach(), "num_fine": torch.tensor(len(idx))}

    # ---------------------------------------------------------------- testing
    @torch.no_grad()
    def predict_slices(self, images: torch.Tensor) -> SlicePrediction:
        """Coarse-to-fine iteration on the batch (the batch plays the volume; see module docstring)."""
        # score maps carried between rounds are rounded to float16, exactly as the volume driver stores them
        prev = self.coarse_probs(images).float().half().float()
        boxes = torch.zeros(images.shape[0], 4, device=images.device)
        has = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        dscs = []
        for _ in range(self.max_rounds):
            new, boxes, has = self.refine(images, prev)
            new = new.half().float()
            dscs.append(dsc_from_counts(*dsc_counts(new > 0.5, prev > 0.5)))
            prev = new
            if dscs[-1] > self.converge_t:
                break
        idx = torch.nonzero(has).flatten()
        scores = prev.flatten(1).amax(1)[idx]
        return SlicePrediction(prev, boxes[idx], idx, scores, {"rounds": len(dscs), "inter_iteration_dsc": dscs})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> final foreground probability ``(B, 1, H, W)`` (iterated)."""
        return self.predict_slices(images).prob
