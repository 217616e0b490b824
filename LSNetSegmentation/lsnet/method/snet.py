"""S-Net, the segmentation network applied to recalibrated RoIs (paper section 2.3).

Two "basic structures" (Table 1), both on a ResNet34 encoder (paper section 3.1):

* :class:`UNetSNet` - U-Net: decoder up-samples from ``H/32`` back to ``H`` with skips from every
  encoder stage.
* :class:`FCNSNet` - FCN-8s: class scores from ``c5``, ``c4``, ``c3`` fused by addition after x2
  up-sampling, then x8 bilinear up-sampling to ``H``.

Both map ``(B, C_in, Hs, Ws)`` to logits ``(B, num_classes, Hs, Ws)`` (M of section 2.3).  They are
also the one-stage U-Net / FCN baselines of Table 1 when applied to the whole slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lsnet.method.decoder import UpBlock, conv_bn_relu
from lsnet.method.resnet import ResNetEncoder


class UNetSNet(nn.Module):
    def __init__(self, backbone: str = "resnet34", in_channels: int = 1, num_classes: int = 1, width: int = 64):
        super().__init__()
        self.encoder = ResNetEncoder(backbone, in_channels, width)
        c = self.encoder.channels
        # (open choice) the two full-resolution stages keep at least 16 channels: with narrow networks
        # (width < 64) width // 4 would leave 2-4 channels there and S-Net barely learns (tested).
        d = [4 * width, 2 * width, width, max(width // 2, 16), max(width // 4, 16)]
        self.decoder_channels = d
        self.up1 = UpBlock(c[4], c[3], d[0])  # /16
        self.up2 = UpBlock(d[0], c[2], d[1])  # /8
        self.up3 = UpBlock(d[1], c[1], d[2])  # /4
        self.up4 = UpBlock(d[2], c[0], d[3])  # /2
        self.up5 = UpBlock(d[3], 0, d[4])  # /1
        self.head = nn.Conv2d(d[4], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.encoder(x)
        y = self.up3(self.up2(self.up1(c5, c4), c3), c2)
        return self.head(self.up5(self.up4(y, c1), None))


class FCNSNet(nn.Module):
    def __init__(self, backbone: str = "resnet34", in_channels: int = 1, num_classes: int = 1, width: int = 64):
        super().__init__()
        self.encoder = ResNetEncoder(backbone, in_channels, width)
        c = self.encoder.channels
        self.score5 = nn.Sequential(conv_bn_relu(c[4], c[4]), nn.Conv2d(c[4], num_classes, 1))
        self.score4 = nn.Conv2d(c[3], num_classes, 1)
        self.score3 = nn.Conv2d(c[2], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, c3, c4, c5 = self.encoder(x)
        s = self.score5(c5)
        s = F.interpolate(s, size=c4.shape[-2:], mode="bilinear", align_corners=False) + self.score4(c4)
        s = F.interpolate(s, size=c3.shape[-2:], mode="bilinear", align_corners=False) + self.score3(c3)
        return F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)


STRUCTURES: dict[str, type] = {"unet": UNetSNet, "fcn": FCNSNet}
"""S-Net "basic structures" by ``ModelConfig.snet_structure``: the paper's two (Table 1) here; other
rooms add theirs with :func:`register_structure` (DSMS U-Net as S-Net, ``lsnet.seeds.dsms_unet``,
registered when ``lsnet.architectures`` is imported)."""


def register_structure(name: str, cls: type) -> None:
    """Make ``cls(backbone, in_channels, num_classes, width)`` buildable as S-Net structure ``name``."""
    STRUCTURES[name] = cls


def build_snet(structure: str, backbone: str, in_channels: int, num_classes: int, width: int) -> nn.Module:
    if structure not in STRUCTURES:
        raise ValueError(
            f"unknown S-Net structure {structure!r}; choose one of {sorted(STRUCTURES)} "
            "('dsms' is registered by lsnet.seeds.dsms_unet, which lsnet.architectures imports)"
        )
    return STRUCTURES[structure](backbone, in_channels, num_classes, width)
