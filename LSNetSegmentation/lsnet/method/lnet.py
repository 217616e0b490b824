"""L-Net, the localisation network (paper section 2.1, Fig. 3).

ResNet18 encoder down-samples five times to ``H/32``; a U-Net decoder up-samples three times to the
feature map ``F'`` at ``H/4``. Two heads act on ``F'``:

* KP head -> keypoint heatmap logits ``(B, 1, H/4, W/4)`` (sigmoid gives K of section 2.1);
* BBR head -> ``T = (l, r, t, b)`` ``(B, 4, H/4, W/4)``, distances in *input pixels* from the cell
  centre ``(4x+2, 4y+2)`` to the left/right/top/bottom box edges, ``T >= 0``.  As in the paper the BBR
  head is "two convolutions with kernel size 3 followed by one convolution with kernel size 13".

Choices the paper leaves open (also in docs/method.md):

* decoder width = ``width`` channels at every stage of the decoder (64 for the paper-size net);
* KP head = 3x3 conv + ReLU + 1x1 conv, bias initialised to ``-log((1-0.01)/0.01)`` so that the
  initial heatmap is ~0.01 everywhere (the usual focal-loss prior, Lin et al. 2017);
* ``T = softplus(raw) * 16``: non-negative and smooth; the factor 16 px puts the initial boxes at a
  plausible organ size (the DIoU loss itself is scale invariant).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lsnet.method.decoder import UpBlock, conv_bn_relu
from lsnet.method.resnet import ResNetEncoder

T_SCALE = 16.0


class LNet(nn.Module):
    """``forward(x (B, C, H, W)) -> (heatmap_logits (B, 1, H/4, W/4), T (B, 4, H/4, W/4))``."""

    stride = 4

    def __init__(self, backbone: str = "resnet18", in_channels: int = 1, width: int = 64):
        super().__init__()
        self.encoder = ResNetEncoder(backbone, in_channels, width)
        c = self.encoder.channels
        d = width
        self.up1 = UpBlock(c[4], c[3], d)  # H/32 -> H/16
        self.up2 = UpBlock(d, c[2], d)  # H/16 -> H/8
        self.up3 = UpBlock(d, c[1], d)  # H/8 -> H/4 (F')
        self.kp_head = nn.Sequential(conv_bn_relu(d, d), nn.Conv2d(d, 1, 1))
        nn.init.constant_(self.kp_head[-1].bias, -math.log((1 - 0.01) / 0.01))
        self.bbr_head = nn.Sequential(conv_bn_relu(d, d), conv_bn_relu(d, d), nn.Conv2d(d, 4, 13, padding=6))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``F'`` of Fig. 3: ``(B, width, H/4, W/4)``."""
        c1, c2, c3, c4, c5 = self.encoder(x)
        return self.up3(self.up2(self.up1(c5, c4), c3), c2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.kp_head(f), F.softplus(self.bbr_head(f)) * T_SCALE
