"""Ensembles of L-SNet models (ours, ``lsnet.method.ensemble``): the mean of the members' maps, one
weights file, the same inference rule and box-prompt path as one model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from lsnet.app.cli import main as cli_main
from lsnet.architectures import build_model, load_model
from lsnet.config import ModelConfig
from lsnet.errors import WeightsError
from lsnet.io.weights import load_state_checked, read_model_card, read_tensors, save_model
from lsnet.method.ensemble import LSNetEnsemble
from lsnet.method.model import LSNet
from lsnet.pipeline.inference import Segmenter, box_prompt_predict, lsnet_predict
from lsnet.results import RoiBox
from lsnet.samples.phantom import make_phantom_volume


def member(seed: int, kp_bias: float) -> LSNet:
    """A random tiny L-SNet whose heatmap fires (bias) so that RoIs, RR and S-Net all run."""
    torch.manual_seed(seed)
    m = LSNet(ModelConfig(width=8, roi_size=64, spacing=2.0))
    torch.nn.init.constant_(m.lnet.kp_head[-1].bias, kp_bias)
    torch.nn.init.constant_(m.snet.head.bias, 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def pair():
    return member(1, 0.4), member(2, 0.2)


@pytest.fixture(scope="module")
def phantom():
    img, _ = make_phantom_volume(shape=(4, 96, 112), spacing=(2.0, 2.0, 3.0), seed=5)
    return img


@torch.no_grad()
def test_ensemble_averages_the_members_probabilities_and_box_distances(pair):
    a, b = pair
    ens = LSNetEnsemble.from_models([a, b]).eval()
    assert ens.config.ensemble == 2 and a.config.ensemble == 1
    x = torch.rand(2, 1, 96, 96)
    (ka, ta), (kb, tb) = a.lnet(x), b.lnet(x)
    k, t = ens.lnet(x)
    mean_heat = (torch.sigmoid(ka) + torch.sigmoid(kb)) / 2
    torch.testing.assert_close(torch.sigmoid(k), mean_heat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t, (ta + tb) / 2)
    assert not torch.allclose(torch.sigmoid(k), torch.sigmoid(ka), atol=1e-3)  # the members differ
    roi = torch.rand(3, 1, 64, 64)
    torch.testing.assert_close(torch.sigmoid(ens.snet(roi)), (torch.sigmoid(a.snet(roi)) + torch.sigmoid(b.snet(roi))) / 2,
                               rtol=1e-5, atol=1e-6)
    # the inference rule runs once on the mean maps
    prob, heat, rois = lsnet_predict(ens, x)
    torch.testing.assert_close(heat, mean_heat, rtol=1e-5, atol=1e-6)
    assert len(rois) > 0 and prob.shape == (2, 96, 96) and float(prob.max()) > 0
    # the box-prompt path: the mean of the members' probabilities inside the same box
    boxes, batch = torch.tensor([[20.0, 30.0, 60.0, 70.0]]), torch.tensor([0])
    pe = box_prompt_predict(ens, x, boxes, batch)
    pm = (box_prompt_predict(a, x, boxes, batch) + box_prompt_predict(b, x, boxes, batch)) / 2
    torch.testing.assert_close(pe, pm, rtol=1e-4, atol=1e-5)
    # the members are the models that went in (shared, not copied)
    assert ens.lnet.nets[1] is b.lnet and ens.snet.nets[0] is a.snet


def test_only_models_of_one_configuration_join(pair):
    a, _ = pair
    other = LSNet(ModelConfig(width=8, roi_size=32, spacing=2.0))
    with pytest.raises(ValueError, match="roi_size"):
        LSNetEnsemble.from_models([a, other])
    with pytest.raises(ValueError, match="at least 2"):
        LSNetEnsemble.from_models([a])
    with pytest.raises(ValueError, match="lsnet models only"):
        build_model(ModelConfig(architecture="rstn", ensemble=2))


def test_ensemble_weights_file_loads_and_segments_like_the_joined_models(pair, phantom, tmp_path, capsys):
    ens = LSNetEnsemble.from_models(list(pair)).eval()
    path = save_model(ens, tmp_path / "ens.safetensors", {"description": "two members"}, dtype="float32")
    card = read_model_card(path)
    assert card["config"]["ensemble"] == 2
    assert cli_main(["info", str(path)]) == 0 and "2 members averaged" in capsys.readouterr().out
    assert any(k.startswith("lnet.nets.1.") for k in ens.state_dict()) and not any(k.startswith("members") for k in ens.state_dict())
    loaded, _ = load_model(path)
    assert isinstance(loaded, LSNetEnsemble) and len(loaded.lnet.nets) == 2
    direct = Segmenter(model=ens, device="cpu", drop_small_components=False).segment_volume(phantom)
    seg = Segmenter(weights=path, device="cpu", drop_small_components=False)
    res = seg.segment_volume(phantom)
    np.testing.assert_array_equal(res.mask, direct.mask)
    np.testing.assert_allclose(res.heatmap, direct.heatmap, atol=1.0 / 255)
    assert res.boxes and res.mask.any()
    # the correction path (S-Net alone in a user's box) runs on the ensemble too
    b = res.boxes[0]
    mask, prob = seg.segment_box(phantom, b.slice_index, RoiBox(b.slice_index, b.x0, b.y0, b.x1, b.y1, 1.0))
    assert mask.shape == phantom.array.shape[1:] and prob.max() > 0
    # a card that says 3 members for a file holding 2 is refused as a mismatch, not half-loaded
    three = replace(ens.config, ensemble=3)
    with pytest.raises(WeightsError, match="does not match"):
        load_state_checked(build_model(three), read_tensors(path), path, "lsnet")
