"""Network shapes, torchvision-compatible names, ImageNet-weight loading."""

import pytest
import torch

from lsnet.config import ModelConfig
from lsnet.method.lnet import LNet
from lsnet.method.model import LSNet, count_parameters
from lsnet.method.resnet import ResNetEncoder, load_imagenet_state_dict
from lsnet.method.snet import build_snet

# Parameter counts of torchvision resnet18/resnet34 without the 1000-class fc (512*1000+1000).
TORCHVISION_PARAMS = {"resnet18": 11_689_512 - 513_000, "resnet34": 21_797_672 - 513_000}


@pytest.mark.parametrize("depth", ["resnet18", "resnet34"])
def test_encoder_matches_torchvision_layout(depth):
    enc = ResNetEncoder(depth, in_channels=3, width=64)
    assert count_parameters(enc) == TORCHVISION_PARAMS[depth]
    names = set(enc.state_dict())
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.bias"]:
        assert key in names
    feats = enc(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]


def test_imagenet_state_dict_loads_into_grey_encoder():
    rgb = ResNetEncoder("resnet18", in_channels=3, width=64)
    sd = dict(rgb.state_dict())
    sd["fc.weight"] = torch.zeros(1000, 512)
    sd["fc.bias"] = torch.zeros(1000)
    grey = ResNetEncoder("resnet18", in_channels=1, width=64)
    left = load_imagenet_state_dict(grey, sd)
    assert left == []
    assert torch.allclose(grey.conv1.weight, rgb.conv1.weight.mean(1, keepdim=True))
    assert torch.equal(grey.layer3[1].conv2.weight, rgb.layer3[1].conv2.weight)


def test_lnet_outputs_stride4_and_nonnegative_distances():
    net = LNet("resnet18", 1, 16).eval()
    k, t = net(torch.randn(2, 1, 96, 128))
    assert k.shape == (2, 1, 24, 32) and t.shape == (2, 4, 24, 32)
    assert (t >= 0).all()
    assert net.bbr_head[-1].kernel_size == (13, 13)


@pytest.mark.parametrize("structure", ["unet", "fcn"])
def test_snet_full_resolution(structure):
    net = build_snet(structure, "resnet34", 1, 1, 16).eval()
    assert net(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_lsnet_paper_size_builds():
    m = LSNet(ModelConfig())
    assert m.lnet.encoder.depth == "resnet18" and m.snet.encoder.depth == "resnet34"


def test_snet_width_widens_snet_only_and_is_checked():
    """``ModelConfig.snet_width`` (ours): S-Net built at its own width, L-Net at ``width``; 0 = ``width``
    (the paper's one width); a negative width is refused."""
    m = LSNet(ModelConfig(width=8, snet_width=24))
    assert m.lnet.encoder.conv1.out_channels == 8 and m.snet.encoder.conv1.out_channels == 24
    assert LSNet(ModelConfig(width=8)).snet.encoder.conv1.out_channels == 8
    assert ModelConfig.from_dict(ModelConfig(width=8, snet_width=24).to_dict()).snet_channels == 24
    with pytest.raises(ValueError, match="snet_width"):
        ModelConfig.from_dict({"width": 8, "snet_width": -1})
