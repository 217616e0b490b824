"""Deeply Supervised Multi-Scale U-Net (Wang, Wang & Xu, "DSMS U-Net").

Pieces (paper section III):

* U-Net body.  The engine's U-Net (``snet.UNetSNet`` layout: ResNet encoder ``c1..c5``, decoder of
  ``decoder.UpBlock`` s with skips from ``c4, c3, c2, c1``, a last x2 block without skip, 1x1 head).
* Multi-scale convolution module (:class:`MultiScaleConv`, Fig. 2a) "before the concatenation on every
  level": the skip feature goes through 1x1, 3x3 and 5x5 convolutions in parallel (same size by
  padding), the three maps are concatenated and a 1x1 convolution adjusts the channels back to the
  skip width.  Option ``msc_kernels`` = ``[3, 3, 3]`` gives the paper's "same size kernel" control
  (Fig. 2b, KCM).
* Restoration decoder (:class:`RestorationDecoder`, section III-B): an independent branch from the
  bottom feature map back to the input size, every level = two 3x3 convolutions + one 2x2
  deconvolution (stride 2), then a 1x1 convolution to the input channels.
* Loss (section III-D, Eq. 1): BCE(prediction, annotation) + BCE(restoration, input), weighted 10 : 1
  (``L = L_seg + 0.1 L_rec``; the paper gives only the ratio).

Usable alone (architecture ``dsms_unet``, :class:`DSMSUNetModel`, whole slices) and as L-SNet's S-Net
(``ModelConfig.snet_structure = "dsms"`` -> ``snet.build_snet`` builds :class:`DSMSUNet` with the module
defaults).  As an S-Net, ``forward(x)`` returns only the logits, like the other S-Nets;
``forward_with_aux(x)`` also returns the weighted reconstruction loss for a trainer that adds it.

Open choices / deviations (also in docs/seed_models.md):

* Encoder = the engine's ResNet (``config.snet_backbone``, ResNet34 by default, five down-samplings,
  ImageNet-loadable) instead of the paper's plain U-Net encoder with four poolings; hence five
  restoration levels (x32) instead of four (x16).
* Branch widths: each of the 1x1/3x3/5x5 branches has the skip's channel count; every convolution is
  conv-BN-ReLU (BN is not mentioned in the paper).  Restoration channels halve per level from
  ``8 w`` to ``w / 4`` (the U-Net decoder's widths).
* ``seg_loss``: "bce" (paper) or "focal_dice" (L-SNet's L_cls, Focal + 0.2 Dice) for like-for-like
  comparisons.  The reconstruction target is the preprocessed input in [0, 1] (BCE with soft targets).
* Gradient accumulation (a memory trick in the paper) is the trainer's business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsnet.config import ModelConfig
from lsnet.method.decoder import conv_bn_relu
from lsnet.method.losses import cls_loss
from lsnet.method.snet import UNetSNet, register_structure
from lsnet.seeds.common import SlicePrediction, check_binary, resolve_options

DSMS_DEFAULTS = {
    "msc_kernels": [1, 3, 5],  # paper Fig. 2a
    "restoration": True,  # paper: restoration decoder (deep supervision)
    "reconstruction_weight": 0.1,  # paper: Loss 1 : Loss 2 = 10 : 1
    "seg_loss": "bce",  # paper: BCE; "focal_dice" = L-SNet's L_cls
}


class MultiScaleConv(nn.Module):
    """Fig. 2a: ``(B, C, h, w)`` -> ``(B, C_out, h, w)``; parallel k x k conv-BN-ReLU (``C`` channels
    each, k in ``kernels``), concatenation (``len(kernels) * C``), 1x1 conv-BN-ReLU to ``C_out``.
    The receptive field of the module is ``max(kernels)``."""

    def __init__(self, channels: int, out_channels: int | None = None, kernels=(1, 3, 5)):
        super().__init__()
        if not kernels or any(int(k) % 2 == 0 for k in kernels):
            raise ValueError(f"multi-scale kernels must be odd (size-preserving), got {list(kernels)}")
        self.kernels = tuple(int(k) for k in kernels)
        self.branches = nn.ModuleList(conv_bn_relu(channels, channels, k) for k in self.kernels)
        self.adjust = conv_bn_relu(len(self.kernels) * channels, out_channels or channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adjust(torch.cat([b(x) for b in self.branches], 1))


class RestorationDecoder(nn.Module):
    """Section III-B: bottom feature ``(B, c_in, H/2^n, W/2^n)`` -> restoration logits ``(B, out, H, W)``.

    ``n = len(channels)`` levels, each two 3x3 conv-BN-ReLU and a 2x2 stride-2 transposed convolution.
    """

    def __init__(self, c_in: int, channels, out_channels: int):
        super().__init__()
        levels = []
        for c in channels:
            levels.append(nn.Sequential(conv_bn_relu(c_in, c), conv_bn_relu(c, c), nn.ConvTranspose2d(c, c, 2, stride=2)))
            c_in = c
        self.levels = nn.Sequential(*levels)
        self.head = nn.Conv2d(c_in, out_channels, 1)

    def forward(self, bottom: torch.Tensor) -> torch.Tensor:
        return self.head(self.levels(bottom))


class DSMSUNet(UNetSNet):
    """``(B, C_in, H, W)`` -> logits ``(B, num_classes, H, W)`` (H, W multiples of 32).

    The ResNet U-Net of ``snet.UNetSNet`` plus a multi-scale module on every skip and the restoration
    decoder."""

    def __init__(self, backbone: str = "resnet34", in_channels: int = 1, num_classes: int = 1, width: int = 64,
                 msc_kernels=(1, 3, 5), restoration: bool = True, reconstruction_weight: float = 0.1):
        super().__init__(backbone, in_channels, num_classes, width)
        c = self.encoder.channels
        d = self.decoder_channels
        self.msc4 = MultiScaleConv(c[3], kernels=msc_kernels)
        self.msc3 = MultiScaleConv(c[2], kernels=msc_kernels)
        self.msc2 = MultiScaleConv(c[1], kernels=msc_kernels)
        self.msc1 = MultiScaleConv(c[0], kernels=msc_kernels)
        self.restoration = RestorationDecoder(c[4], d, in_channels) if restoration else None
        self.reconstruction_weight = float(reconstruction_weight)

    def _segment(self, feats) -> torch.Tensor:
        c1, c2, c3, c4, c5 = feats
        y = self.up1(c5, self.msc4(c4))
        y = self.up2(y, self.msc3(c3))
        y = self.up3(y, self.msc2(c2))
        y = self.up4(y, self.msc1(c1))
        return self.head(self.up5(y, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._segment(self.encoder(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits (B, K, H, W), restoration logits (B, C_in, H, W) or None)`` from one encoder pass."""
        feats = self.encoder(x)
        rec = self.restoration(feats[4]) if self.restoration is not None else None
        return self._segment(feats), rec

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, reconstruction_weight * L_rec)`` — the S-Net hook for L-SNet training."""
        logits, rec = self.forward_train(x)
        return logits, self.reconstruction_weight * reconstruction_loss(rec, x) if rec is not None else logits.sum() * 0.0


def reconstruction_loss(restoration_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Loss 2 (Eq. 1): mean BCE between the restoration and the input image (values in [0, 1])."""
    return F.binary_cross_entropy_with_logits(restoration_logits.float(), images.float().clamp(0, 1))


class DSMSUNetModel(nn.Module):
    """Architecture ``dsms_unet``: :class:`DSMSUNet` on whole slices (``net``) + its losses."""

    iterative = False

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig(architecture="dsms_unet")
        c = self.config
        check_binary(c)
        o = resolve_options(c, DSMS_DEFAULTS)
        if o["seg_loss"] not in ("bce", "focal_dice"):
            raise ValueError(f"dsms_unet seg_loss must be 'bce' or 'focal_dice', got {o['seg_loss']!r}")
        self.options = o
        self.net = DSMSUNet(c.snet_backbone, c.in_channels, 1, c.width, o["msc_kernels"], bool(o["restoration"]), o["reconstruction_weight"])

    def training_losses(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """``L = L_seg + w L_rec`` (10 : 1).  ``images`` ``(B, C, H, W)`` in [0, 1], ``masks`` ``(B, H, W)``."""
        c = self.config
        logits, rec = self.net.forward_train(images)
        y = masks.float().unsqueeze(1)
        if self.options["seg_loss"] == "bce":
            seg = F.binary_cross_entropy_with_logits(logits.float(), y)
        else:
            seg = cls_loss(logits, y, c.dice_weight, c.focal_alpha, c.focal_gamma)
        recl = reconstruction_loss(rec, images) if rec is not None else seg * 0.0
        loss = seg + self.net.reconstruction_weight * recl
        return {"loss": loss, "seg": seg.detach(), "rec": recl.detach()}

    @torch.no_grad()
    def predict_slices(self, images: torch.Tensor) -> SlicePrediction:
        return SlicePrediction.without_boxes(torch.sigmoid(self.net(images).float()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> segmentation logits ``(B, 1, H, W)``."""
        return self.net(images)


register_structure("dsms", DSMSUNet)  # DSMS U-Net as L-SNet's S-Net (ModelConfig.snet_structure = "dsms")
