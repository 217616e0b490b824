"""S-Net test-time zooms (ours, ``ModelConfig.roi_zooms``): each RoI sampled at several scales, the
pasted-back probabilities averaged before the max over RoIs; ``(1.0,)`` is the paper's single RoI."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lsnet.config import ModelConfig
from lsnet.method.model import LSNet
from lsnet.pipeline.inference import box_prompt_predict, lsnet_predict


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    m = LSNet(ModelConfig(width=8, roi_size=64, spacing=2.0, roi_source_factor=2))
    torch.nn.init.constant_(m.lnet.kp_head[-1].bias, 0.4)  # the heatmap fires: L-Net RoIs exist
    return m.eval()


@pytest.fixture(scope="module")
def slices():
    torch.manual_seed(4)
    return torch.rand(2, 1, 128, 128)


BOXES = torch.tensor([[40.0, 50.0, 80.0, 70.0], [30.0, 30.0, 60.0, 90.0]])
BATCH = torch.tensor([0, 1])


def with_zooms(model, zooms):
    model.config = replace(model.config, roi_zooms=tuple(zooms))
    return model


@torch.no_grad()
def test_zooms_average_the_single_zoom_maps(model, slices):
    base = box_prompt_predict(with_zooms(model, (1.0,)), slices, BOXES, BATCH)
    twice = box_prompt_predict(with_zooms(model, (1.0, 1.0)), slices, BOXES, BATCH)
    assert torch.allclose(base, twice, atol=1e-6)
    small = box_prompt_predict(with_zooms(model, (0.8,)), slices, BOXES, BATCH)
    large = box_prompt_predict(with_zooms(model, (1.25,)), slices, BOXES, BATCH)
    both = box_prompt_predict(with_zooms(model, (0.8, 1.25)), slices, BOXES, BATCH)
    assert torch.allclose(both, (small + large) / 2, atol=1e-6)  # one box per slice: the mean is the result
    # a factor > 1 is more context: the sampled RoI (where the probability is not 0) is larger
    assert int((large > 0).sum()) > int((base > 0).sum()) > int((small > 0).sum())
    with_zooms(model, (1.0,))


@torch.no_grad()
def test_zooms_apply_to_lnet_rois_too(model, slices):
    prob1, heat1, rois1 = lsnet_predict(with_zooms(model, (1.0,)), slices)
    prob3, heat3, rois3 = lsnet_predict(with_zooms(model, (0.9, 1.0, 1.1)), slices)
    with_zooms(model, (1.0,))
    assert len(rois1) > 0 and torch.equal(rois1.boxes, rois3.boxes) and torch.equal(heat1, heat3)
    assert not torch.allclose(prob1, prob3)
    assert prob3.shape == prob1.shape and float(prob3.min()) >= 0 and float(prob3.max()) <= 1


def test_zooms_round_trip_through_the_card_and_bad_values_are_refused():
    c = ModelConfig(roi_zooms=(0.9, 1.0, 1.1))
    d = c.to_dict()
    assert d["roi_zooms"] == [0.9, 1.0, 1.1]
    assert ModelConfig.from_dict(d) == c
    assert ModelConfig.from_dict({k: v for k, v in d.items() if k != "roi_zooms"}).roi_zooms == (1.0,)
    for bad in ([], [0.0], [1.0, -1.0]):
        with pytest.raises(ValueError, match="roi_zooms"):
            ModelConfig.from_dict({**d, "roi_zooms": bad})
