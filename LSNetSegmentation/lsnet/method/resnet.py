"""ResNet18 / ResNet34 encoders with torchvision-compatible parameter names.

The module tree (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0`` ...) matches
``torchvision.models.resnet18/34`` so an ImageNet state dict (paper section 3.1: "All backbones are
pretrained on ImageNet") loads with :func:`load_imagenet_state_dict` when a user has one. None is shipped
or downloaded; the classifier ``fc`` is not part of an encoder and is ignored.

Feature strides (for an input of ``(B, C, H, W)``):

========  =========================  ==============
name      shape                      stride
========  =========================  ==============
``c1``    ``(B, w, H/2, W/2)``       2 (after conv1+bn+relu)
``c2``    ``(B, w, H/4, W/4)``       4 (layer1)
``c3``    ``(B, 2w, H/8, W/8)``      8 (layer2)
``c4``    ``(B, 4w, H/16, W/16)``    16 (layer3)
``c5``    ``(B, 8w, H/32, W/32)``    32 (layer4)
========  =========================  ==============

``w`` is ``width`` (64 in torchvision).  The encoder thus "down-samples five times" (paper 2.1).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """The two-3x3-conv residual block of ResNet18/34 (He et al. 2016)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet18/34 trunk without ``avgpool``/``fc``; returns the five feature maps ``c1..c5``."""

    def __init__(self, depth: str = "resnet18", in_channels: int = 1, width: int = 64):
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"unknown ResNet depth {depth!r}; choose one of {sorted(BLOCKS)}")
        self.depth = depth
        self.channels = (width, width, 2 * width, 4 * width, 8 * width)
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers = []
        inplanes = width
        for i, n in enumerate(BLOCKS[depth]):
            planes = width * 2**i
            blocks = [BasicBlock(inplanes, planes, 1 if i == 0 else 2)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: ``(B, C, H, W)`` with H, W multiples of 32 -> ``[c1, c2, c3, c4, c5]``."""
        c1 = self.relu(self.bn1(self.conv1(x)))
        c2 = self.layer1(self.maxpool(c1))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c1, c2, c3, c4, c5]


def load_imagenet_state_dict(encoder: ResNetEncoder, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a torchvision ResNet state dict (e.g. ``resnet34-b627a593.pth`` read by the user).

    ``fc.*`` is skipped. When the encoder takes ``C != 3`` input channels, ``conv1.weight``
    ``(w, 3, 7, 7)`` is adapted by averaging over RGB and repeating over ``C`` (a grey CT slice is
    closest to the mean of the RGB filters). Returns the list of keys that were not loaded.
    """
    own = encoder.state_dict()
    converted = {}
    skipped = []
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        if key not in own:
            skipped.append(key)
            continue
        if key == "conv1.weight" and value.shape[1] != own[key].shape[1]:
            value = value.mean(dim=1, keepdim=True).repeat(1, own[key].shape[1], 1, 1)
        if value.shape != own[key].shape:
            raise ValueError(
                f"ImageNet weight {key} has shape {tuple(value.shape)} but the encoder expects "
                f"{tuple(own[key].shape)} (ImageNet weights need width=64)"
            )
        converted[key] = value
    missing = sorted(set(own) - set(converted))
    encoder.load_state_dict(converted, strict=False)
    return skipped + missing
