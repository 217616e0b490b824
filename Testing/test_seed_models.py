"""The other seed systems (issue 5): RSTN, DSMS U-Net, RPN-FCN with RoI convolution.

Each defining piece is tested against its definition in the paper; each model trains a few CPU
iterations on phantom slices (the loss must drop), saves/loads through ``lsnet.io.weights`` and segments a
phantom volume through ``seed_models.make_segmenter``.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lsnet.seeds.dsms_unet import DSMSUNet, DSMSUNetModel, MultiScaleConv, reconstruction_loss
from lsnet.errors import InputError, WeightsError
from lsnet.method.model import LSNet
from lsnet.samples.phantom import make_phantom, make_phantom_volume
from lsnet.pipeline.preprocess import window
from lsnet.architectures import build_model, known_architectures
from lsnet.seeds.rpn_fcn import RoIConv2d, RoIConvFunction, box_iou, decode_boxes, encode_boxes, make_anchors, nms, roi_mask
from lsnet.seeds.rstn import RSTN, SaliencyTransform
from lsnet.pipeline.seed_inference import SeedSegmenter, make_segmenter
from lsnet.seeds.common import box_of_mask, default_config, training_losses
from lsnet.method.snet import build_snet
from lsnet.architectures import load_model
from lsnet.io.weights import read_model_card, save_model

SMALL = dict(width=8, roi_size=32, snet_backbone="resnet18")


class Fn(torch.nn.Module):
    """A fixed function standing in for a sub-network."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def small(arch, **options):
    return build_model(default_config(arch, options=options, **SMALL))


@pytest.fixture(scope="module")
def phantom_batch():
    """Three 64 x 64 phantom slices (two with the target, one without) in [0, 1] and their labels."""
    p = make_phantom((40, 64, 64), (2.5, 2.5, 2.5), seed=3, target_scale=1.2)
    idx = [12, 18, 30]
    assert p.label[12].any() and p.label[18].any() and not p.label[30].any()
    x = torch.from_numpy(window(p.array[idx], (0.0, 255.0)))[:, None]
    y = torch.from_numpy(p.label[idx]).float()
    return x, y


def _support(grad: torch.Tensor) -> tuple[int, int]:
    nz = torch.nonzero(grad.abs().sum((0, 1)) > 0)
    return int(nz[:, 0].max() - nz[:, 0].min() + 1), int(nz[:, 1].max() - nz[:, 1].min() + 1)


def test_registry_knows_the_seed_architectures():
    assert {"lsnet", "rstn", "dsms_unet", "rpn_fcn"} <= set(known_architectures())
    with pytest.raises(ValueError, match="unknown rstn option"):
        build_model(default_config("rstn", options={"saliency_kernel": 5}, **SMALL))


def test_box_of_mask_is_the_minimal_rectangle():
    m = torch.zeros(3, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:9] = True
    m[1, 7, 1] = True
    m[1, 0, 10] = True
    boxes, has = box_of_mask(m)
    assert has.tolist() == [True, True, False]
    assert boxes.tolist() == [[3, 2, 9, 5], [1, 0, 11, 8], [0, 0, 0, 0]]


# ------------------------------------------------------------------------------------------- RSTN
@pytest.mark.parametrize("kernels,field", [([1], 1), ([3], 3), ([5], 5), ([3, 3], 5), ([5, 5], 9)])
def test_saliency_transform_is_size_preserving_with_the_expected_receptive_field(kernels, field):
    torch.manual_seed(0)
    g = SaliencyTransform(channels=3, kernels=kernels)
    z = torch.rand(2, 1, 21, 23, requires_grad=True)
    w = g(z)
    assert w.shape == (2, 3, 21, 23)
    w[:, :, 10, 11].sum().backward()
    assert _support(z.grad) == (field, field)


def test_saliency_gradient_reaches_the_coarse_network_through_the_fine_loss(phantom_batch):
    """Joint optimisation (Eq. 2): with lambda = 0 only the fine loss remains, yet g and f^C get gradients."""
    x, y = phantom_batch
    torch.manual_seed(0)
    m = small("rstn", **{"lambda": 0.0})
    out = m.training_losses(x, y)
    assert int(out["num_fine"]) == 2  # the slice without target has no fine term
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.saliency.parameters())
    assert m.coarse.score5[-1].weight.grad.abs().sum() > 0
    assert m.fine.score5[-1].weight.grad.abs().sum() > 0


def test_rstn_default_is_the_papers_best_variant():
    m = RSTN(default_config("rstn"))
    convs = [l for l in m.saliency.layers if isinstance(l, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(5, 5), (5, 5)]
    assert m.lam == pytest.approx(1 / 3) and m.converge_t == 0.95 and m.max_rounds == 10
    assert type(m.coarse).__name__ == "FCNSNet" and type(m.fine).__name__ == "FCNSNet"


def test_rstn_crop_samples_the_weighted_input_inside_box_plus_margin():
    """With g == 1 the fine input is exactly the box grown by K px, resampled; pasting back covers it."""
    m = small("rstn", crop_margin=4, fine_size=16)
    with torch.no_grad():
        for layer in m.saliency.layers:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.zero_()
        m.saliency.layers[-1].bias.fill_(1.0)
    x = torch.arange(64 * 64, dtype=torch.float32).view(1, 1, 64, 64) / 4096
    theta = m.crop_theta(torch.tensor([[20.0, 10.0, 28.0, 18.0]]), (64, 64))
    seen = {}
    m.fine = Fn(lambda crop: seen.setdefault("crop", crop)[:, :1] * 0 + 10.0)  # records its input
    m.fine_logits(x, torch.zeros(1, 1, 64, 64), theta)
    crop = seen["crop"]
    # region [16, 32) x [6, 22): 16 x 16 pixels sampled at their centres == the original pixels
    assert torch.allclose(crop[0, 0], x[0, 0, 6:22, 16:32], atol=1e-5)
    ref = torch.zeros(2, 1, 64, 64)
    ref[0, 0, 10:18, 20:28] = 0.9
    new, boxes, has = m.refine(x.expand(2, 1, 64, 64), ref)
    assert has.tolist() == [True, False] and boxes[0].tolist() == [20, 10, 28, 18]
    assert new[1].abs().sum() == 0  # empty reference: the fine stage is not run
    inside = new[0, 0, 7:21, 17:31]
    assert (inside > 0.99).all() and new[0, 0, :, :15].abs().sum() == 0 and new[0, 0, 23:].abs().sum() == 0


def test_rstn_iteration_stops_on_the_inter_iteration_dsc():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    m = small("rstn", max_rounds=3, converge_t=2.0).eval()  # never converges -> max_rounds
    m.coarse = Fn(lambda t: 20 * (t - 0.5))  # a deterministic coarse map with foreground on both slices
    info = m.predict_slices(x).info
    assert info["rounds"] == 3 and len(info["inter_iteration_dsc"]) == 3
    m.converge_t = -1.0  # any DSC exceeds it -> one round
    assert m.predict_slices(x).info["rounds"] == 1


def test_rstn_volume_iteration_matches_the_batch_rule_and_is_batch_size_independent():
    """SeedSegmenter iterates over the whole volume; with a 1.25 mm / 64 px phantom the canvas is the
    slice grid, so its probabilities must equal predict_slices on all slices at once (without the
    volume step of lsnet.pipeline.postprocess, which would remove small components)."""
    img, _ = make_phantom_volume((5, 64, 64), (1.25, 1.25, 2.5), seed=4, target_scale=1.0)
    torch.manual_seed(0)
    m = small("rstn", max_rounds=4, converge_t=0.999).eval()
    m.coarse = Fn(lambda t: 20 * (t - 0.5))
    m.fine = Fn(lambda t: 20 * (t[:, :1] - 0.4))
    x = torch.from_numpy(window(img.array.astype(np.float32), (0.0, 255.0)))[:, None]
    want = m.predict_slices(x)
    res2 = SeedSegmenter(model=m, device="cpu", batch_size=2, drop_small_components=False).segment_volume(img)
    res5 = SeedSegmenter(model=m, device="cpu", batch_size=5, drop_small_components=False).segment_volume(img)
    assert res2.timings["rstn_rounds"] == res5.timings["rstn_rounds"] == want.info["rounds"]
    assert np.allclose(res2.heatmap, want.prob[:, 0].numpy(), atol=2e-3)
    assert np.array_equal(res2.mask, res5.mask)
    assert len(res2.boxes) == len(want.boxes) and {b.source for b in res2.boxes} <= {"rstn"}
    # with the volume step (default) the iterative path post-processes too
    res_pp = SeedSegmenter(model=m, device="cpu", batch_size=5).segment_volume(img)
    assert res_pp.postprocess["step"] == "large_components" and res_pp.mask.sum() <= res2.mask.sum()


# ------------------------------------------------------------------------------------------- DSMS U-Net
@pytest.mark.parametrize("kernels,field", [((1, 3, 5), 5), ((3, 3, 3), 3)])
def test_multiscale_module_shapes_and_receptive_field(kernels, field):
    torch.manual_seed(0)
    msc = MultiScaleConv(6, 5, kernels).eval()
    assert [b[0].kernel_size[0] for b in msc.branches] == list(kernels)
    assert msc.adjust[0].in_channels == 18 and msc.adjust[0].kernel_size == (1, 1)
    x = torch.rand(1, 6, 17, 19, requires_grad=True)
    y = msc(x)
    assert y.shape == (1, 5, 17, 19)
    y[:, :, 8, 9].sum().backward()
    assert _support(x.grad) == (field, field)


def test_dsms_unet_outputs_segmentation_and_restoration_at_input_size():
    net = DSMSUNet("resnet18", 1, 1, 8).eval()
    logits, rec = net.forward_train(torch.rand(2, 1, 64, 96))
    assert logits.shape == (2, 1, 64, 96) and rec.shape == (2, 1, 64, 96)
    levels = net.restoration.levels
    assert len(levels) == 5 and all(isinstance(l[-1], torch.nn.ConvTranspose2d) and l[-1].stride == (2, 2) for l in levels)
    assert DSMSUNet("resnet18", 1, 1, 8, restoration=False).restoration is None


def test_dsms_loss_is_seg_plus_a_tenth_of_reconstruction(phantom_batch):
    x, y = phantom_batch
    torch.manual_seed(0)
    m = small("dsms_unet").eval()  # eval: both passes use the same BN statistics
    with torch.no_grad():
        out = m.training_losses(x, y)
        logits, rec = m.net.forward_train(x)
    seg = F.binary_cross_entropy_with_logits(logits, y[:, None])
    assert float(out["loss"]) == pytest.approx(float(seg + 0.1 * reconstruction_loss(rec, x)), rel=1e-5)
    assert float(out["rec"]) == pytest.approx(float(reconstruction_loss(rec, x)), rel=1e-5)


def test_dsms_as_lsnet_snet():
    snet = build_snet("dsms", "resnet18", 1, 1, 8)
    assert isinstance(snet, DSMSUNet)
    model = LSNet(default_config("lsnet", snet_structure="dsms", lnet_backbone="resnet18", width=8, roi_size=32))
    x = torch.rand(2, 1, 64, 64)
    y = torch.zeros(2, 64, 64)
    y[:, 20:36, 24:44] = 1
    out = model.snet_losses(x, y)
    out["loss"].backward()
    assert out["roi_logits"].shape == (2, 1, 32, 32)
    logits, aux = model.snet.forward_with_aux(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 1, 32, 32) and aux.ndim == 0 and float(aux.detach()) > 0


# ------------------------------------------------------------------------------------------- RPN-FCN
def _roi_case(dtype=torch.float32):
    torch.manual_seed(0)
    z = torch.randn(2, 3, 7, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(4, dtype=dtype, requires_grad=True)
    mask = roi_mask(torch.tensor([[1.0, 1.0, 4.0, 3.0], [3.0, 2.0, 7.0, 6.0], [0.0, 4.0, 2.0, 7.0]]),
                    torch.tensor([0, 0, 1]), 2, (7, 8)).to(dtype)
    return z, w, b, mask


def test_roi_mask_marks_cells_whose_footprint_intersects_a_box():
    m = roi_mask(torch.tensor([[17.0, 3.0, 20.0, 40.0]]), torch.tensor([0]), 2, (4, 4), stride=16)
    assert m[0, 0].tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert m[1].sum() == 0


def test_roi_convolution_forward_and_backward_equal_the_masked_convolution():
    z, w, b, mask = _roi_case()
    conv = RoIConv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    y = conv(z, mask)
    ref = F.conv2d(z, w, b, padding=1) * mask
    assert torch.allclose(y, ref, atol=1e-6)
    assert (y[mask.expand_as(y) == 0] == 0).all() and (y[mask.expand_as(y) == 1] != 0).any()
    up = torch.randn_like(y)
    g_roi = torch.autograd.grad((y * up).sum(), [z, conv.weight, conv.bias])
    g_ref = torch.autograd.grad((ref * up).sum(), [z, w, b])
    for a, r in zip(g_roi, g_ref):
        assert torch.allclose(a, r, atol=1e-5)
    # Eq. 2: gradients arriving outside the RoIs contribute nothing
    outside = torch.randn_like(y) * (1 - mask)
    g_out = torch.autograd.grad((conv(z, mask) * outside).sum(), [z, conv.weight, conv.bias])
    assert all(float(g.abs().max()) == 0.0 for g in g_out)


def test_roi_convolution_gradcheck_double():
    z, w, b, mask = _roi_case(torch.float64)
    z = z[:1, :2, :5, :6].detach().requires_grad_(True)
    w = w[:2, :2].detach().requires_grad_(True)
    b = b[:2].detach().requires_grad_(True)
    m = mask[:1, :, :5, :6]
    assert 0 < m.sum() < m.numel()
    assert torch.autograd.gradcheck(lambda zz, ww, bb: RoIConvFunction.apply(zz, ww, bb, m, 1, 1, 1, 1), (z, w, b))
    m2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)  # stride 2, no padding: 2 x 2 output
    assert torch.autograd.gradcheck(lambda zz, ww: RoIConvFunction.apply(zz, ww, None, m2, 2, 0, 1, 1), (z, w))


def test_anchor_box_coding_round_trip_and_nms():
    a = make_anchors((2, 3), [16, 32], [0.5, 1.0, 2.0])
    assert a.shape == (2 * 3 * 6, 4)
    assert torch.allclose((a[:6, :2] + a[:6, 2:]) / 2, torch.tensor([8.0, 8.0]).expand(6, 2))  # cell (0, 0) centre
    gt = torch.tensor([[5.0, 7.0, 40.0, 30.0]]).expand(len(a), 4)
    assert torch.allclose(decode_boxes(a, encode_boxes(a, gt)), gt, atol=1e-4)
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 1, 11, 11], [20.0, 20, 30, 30]])
    assert nms(boxes, torch.tensor([0.9, 0.95, 0.5]), 0.5).tolist() == [1, 2]
    assert box_iou(boxes[:1], boxes[:1]).item() == pytest.approx(1.0)


def test_rpn_fcn_output_is_zero_outside_the_proposals(phantom_batch):
    x, _ = phantom_batch
    torch.manual_seed(0)
    m = small("rpn_fcn").eval()
    pred = m.predict_slices(x)
    outside = roi_mask(pred.boxes, pred.batch, x.shape[0], x.shape[-2:]) == 0
    assert len(pred.boxes) > 0 and outside.any()
    assert (pred.prob[outside] == 0).all()
    assert int(torch.bincount(pred.batch, minlength=3).max()) <= m.options["max_rois"]


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch", ["rstn", "dsms_unet", "rpn_fcn"])
def test_short_cpu_training_lowers_the_loss(arch, phantom_batch):
    x, y = phantom_batch
    torch.manual_seed(0)
    m = small(arch)

    def loss_now():
        torch.manual_seed(123)  # same RPN anchor sample for both evaluations
        with torch.no_grad():
            return float(training_losses(m, x, y)["loss"])

    before = loss_now()
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(8):
        out = training_losses(m, x, y)
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = loss_now()
    assert after < 0.95 * before, (before, after)


def test_rstn_noisy_crop_fine_tuning_mode(phantom_batch):
    x, y = phantom_batch
    m = small("rstn")
    with torch.no_grad():
        m.coarse.score5[-1].bias.fill_(5.0)  # coarse predicts foreground everywhere -> crop = whole slice
        out = m.training_losses(x, y, crop_from="coarse")
    assert int(out["num_fine"]) == 3
    with pytest.raises(ValueError):
        m.training_losses(x, y, crop_from="box")


# ------------------------------------------------------------------------------------------- save / load / inference
@pytest.mark.parametrize("arch,options", [("rstn", {"converge_t": 0.99, "max_rounds": 3}), ("dsms_unet", {"msc_kernels": [3, 3, 3]}), ("rpn_fcn", {"max_rois": 4})])
def test_save_load_and_segment_volume(arch, options, tmp_path):
    torch.manual_seed(0)
    m = small(arch, **options).eval()
    path = save_model(m, tmp_path / f"{arch}.safetensors", {"description": f"test {arch}"}, dtype="float32")
    card = read_model_card(path)
    assert card["config"]["architecture"] == arch and card["config"]["options"] == options
    loaded, card2 = load_model(path)
    assert type(loaded) is type(m) and loaded.config.options == options
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(loaded.predict_slices(x).prob, m.predict_slices(x).prob)

    seg = make_segmenter(weights=path, device="cpu", batch_size=3)
    assert isinstance(seg, SeedSegmenter)
    img, _ = make_phantom_volume((4, 64, 64), (2.0, 2.0, 2.5), seed=1)
    res = seg.segment_volume(img)
    assert res.mask.shape == img.array.shape and res.mask.dtype == np.uint8
    assert res.heatmap.shape == img.array.shape and 0 <= res.heatmap.min() and res.heatmap.max() <= 1
    assert res.model_card["config"]["architecture"] == arch
    with pytest.raises(InputError, match="L-SNet"):
        seg.segment_box(img, 0, res.boxes[0] if res.boxes else None)


def test_unknown_option_in_a_card_is_a_weights_error(tmp_path):
    m = small("dsms_unet")
    path = save_model(m, tmp_path / "d.safetensors")
    side = path.with_suffix(".json")
    card = json.loads(side.read_text())
    card["config"]["options"] = {"msc_kernel": [1, 3, 5]}
    side.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="msc_kernel"):
        load_model(path)


def test_make_segmenter_keeps_lsnet_on_the_lsnet_path():
    from lsnet.pipeline.inference import Segmenter

    seg = make_segmenter(model=LSNet(default_config("lsnet", lnet_backbone="resnet18", width=8)), device="cpu")
    assert type(seg) is Segmenter
    assert isinstance(make_segmenter(model=DSMSUNetModel(default_config("dsms_unet", **SMALL)), device="cpu"), SeedSegmenter)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["rstn", "dsms_unet", "rpn_fcn"])
def test_bf16_training_step_and_volume_inference_on_cuda(arch, phantom_batch):
    x, y = (t.cuda() for t in phantom_batch)
    torch.manual_seed(0)
    m = small(arch).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = training_losses(m, x, y)
    out["loss"].float().backward()
    assert torch.isfinite(out["loss"].float())
    img, _ = make_phantom_volume((4, 64, 64), (2.0, 2.0, 2.5), seed=1)
    res = make_segmenter(model=m.eval(), device="cuda", batch_size=2).segment_volume(img)
    assert res.mask.shape == img.array.shape and res.device.startswith("cuda")
