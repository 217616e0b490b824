"""The paper's equations against hand-computed values (Eq. 1-6, decode, gradient decay)."""

import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from lsnet.method.components import components, label_by_propagation, label_components
from lsnet.config import ModelConfig
from lsnet.method.decode import decode, sample_topk_keypoints
from lsnet.method.heatmap import targets_from_boxes, targets_from_masks
from lsnet.method.losses import cls_loss, dice_loss, diou_loss, focal_loss, lnet_loss
from lsnet.method.model import LSNet
from lsnet.method.recalibration import decay_gradient, invert_theta, paste_back, recalibrate, theta_from_box, theta_from_xyxy


# ---------------------------------------------------------------- Eq. 1
def test_eq1_heatmap_values_by_hand():
    # One object with box centre at input pixel (42, 26) -> cell (10, 6) exactly.
    box = torch.tensor([[32.0, 20.0, 52.0, 32.0]])
    k, t = targets_from_boxes(box, torch.tensor([0]), 1, (16, 20), delta=20.0, beta=2.0)
    assert k[0, 0, 6, 10] == 1.0
    # within the tolerance beta = 2 cells: still 1
    assert k[0, 0, 8, 12] == 1.0 and k[0, 0, 4, 8] == 1.0
    # |dx| = 5 cells -> max(0, 5-2) = 3 -> exp(-9/40)
    assert k[0, 0, 6, 15].item() == pytest.approx(math.exp(-9 / 40), rel=1e-6)
    # dx = 4 -> 2, dy = 3 -> 1: exp(-(4+1)/40)
    assert k[0, 0, 9, 14].item() == pytest.approx(math.exp(-5 / 40), rel=1e-6)
    # T* at cell (10, 6): centre (42, 26): l=10, r=10, t=6, b=6
    assert t[0, :, 6, 10].tolist() == [10.0, 10.0, 6.0, 6.0]
    # at cell (12, 6): u = 50 -> l = 18, r = 2
    assert t[0, :, 6, 12].tolist() == [18.0, 2.0, 6.0, 6.0]


def test_eq1_sum_of_objects_is_clipped_at_one():
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 0.0, 32.0, 16.0]])  # centres 2 cells apart... (8,8),(24,8)
    k, _ = targets_from_boxes(boxes, torch.tensor([0, 0]), 1, (8, 12), 20.0, 2.0)
    # cell 4 lies between the centres x_c = 1.5 and 5.5: each term exp(-(0.5^2)/40) -> sum > 1 -> clipped
    assert k.max().item() == 1.0
    assert k[0, 0, 1, 3].item() == 1.0


def test_targets_from_masks_uses_component_boxes():
    m = torch.zeros(1, 64, 64)
    m[0, 8:20, 4:16] = 1  # object A: box (4, 8, 16, 20), centre (10, 14)
    m[0, 40:44, 40:60] = 1  # object B: box (40, 40, 60, 44), centre (50, 42)
    k, t, boxes = targets_from_masks(m)
    got = sorted(boxes[:, 1:].tolist())
    assert got == [[4.0, 8.0, 16.0, 20.0], [40.0, 40.0, 60.0, 44.0]]
    # peak cells: (10-2)/4 = 2, (14-2)/4 = 3 -> K*=1; (50-2)/4 = 12, (42-2)/4 = 10
    assert k[0, 0, 3, 2] == 1.0 and k[0, 0, 10, 12] == 1.0
    assert t[0, :, 10, 12].tolist() == [10.0, 10.0, 2.0, 2.0]  # (u, v) = (50, 42) in box (40, 40, 60, 44)


# ---------------------------------------------------------------- components (8-connectivity as scipy)
@pytest.mark.parametrize("seed", range(5))
def test_components_match_scipy(seed):
    rng = np.random.default_rng(seed)
    m = ndi.binary_opening(rng.random((3, 40, 50)) > 0.6, structure=np.ones((1, 2, 2)))
    labels = label_components(torch.from_numpy(m)).numpy()
    for b in range(3):
        ref, n = ndi.label(m[b], structure=np.ones((3, 3)))
        assert len(np.unique(labels[b][labels[b] > 0])) == n
        # same partition: each scipy component maps to exactly one id
        for i in range(1, n + 1):
            assert len(np.unique(labels[b][ref == i])) == 1
    comp = components(torch.from_numpy(m))
    objs = [ndi.find_objects(ndi.label(m[b], structure=np.ones((3, 3)))[0]) for b in range(3)]
    ref_boxes = sorted((b, s[1].start, s[0].start, s[1].stop, s[0].stop) for b in range(3) for s in objs[b])
    got = sorted((int(b), *map(int, bx)) for b, bx in zip(comp.batch.tolist(), comp.boxes.tolist()))
    assert got == ref_boxes


@pytest.mark.parametrize("seed", range(4))
def test_cpu_labels_equal_the_device_path_ids(seed):
    """The CPU (scipy) path must give every pixel the very id the GPU path gives: the order of the
    components, hence training and decoding, must not depend on the device."""
    rng = np.random.default_rng(seed)
    m = torch.from_numpy(ndi.binary_opening(rng.random((4, 37, 53)) > 0.55, structure=np.ones((1, 2, 2))))
    m[1] = False  # an empty image among full ones
    cpu = label_components(m)
    assert cpu.dtype == torch.long and cpu.shape == m.shape
    assert torch.equal(cpu, label_by_propagation(m))
    assert int(cpu[1].abs().sum()) == 0


def test_centre_cell_is_inside_a_curved_component():
    m = torch.zeros(1, 20, 20, dtype=torch.bool)
    m[0, 2:18, 2:4] = True  # an L / U shape whose centroid falls outside
    m[0, 16:18, 2:18] = True
    m[0, 2:18, 16:18] = True
    comp = components(m)
    x, y = comp.centre_cell[0].tolist()
    assert m[0, y, x]


# ---------------------------------------------------------------- Eqs. 2-4 (RR)
def test_eq3_theta_by_hand():
    # W = H = 320, keypoint (100, 60), l=10, r=30, t=5, b=15, alpha=15
    th = theta_from_box(torch.tensor([[100.0, 60.0]]), torch.tensor([[10.0, 30.0, 5.0, 15.0]]), (320, 320), 15.0)[0]
    assert th[0, 0].item() == pytest.approx((10 + 30 + 15) / 320)
    assert th[1, 1].item() == pytest.approx((5 + 15 + 15) / 320)
    assert th[0, 2].item() == pytest.approx((100 + 10 - 160) * 2 / 320)
    assert th[1, 2].item() == pytest.approx((60 + 5 - 160) * 2 / 320)
    assert th[0, 1] == 0 and th[1, 0] == 0


def test_rr_samples_exactly_the_box_plus_margin():
    # an image whose value is the column index: the RoI's first/last columns sample x0 - alpha/2 ... x1 + alpha/2
    w = h = 64
    img = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 1, h, w).contiguous() + 0.5
    box = torch.tensor([[20.0, 10.0, 40.0, 30.0]])
    th = theta_from_xyxy(box, (h, w), alpha=4.0)
    roi = recalibrate(img, th, (22, 22))
    # 22 output pixels over [18, 42] -> each covers 24/22 px; first centre at 18 + 12/22
    assert roi[0, 0, 5, 0].item() == pytest.approx(18 + 12 / 22, abs=1e-4)
    assert roi[0, 0, 5, -1].item() == pytest.approx(42 - 12 / 22, abs=1e-4)


def test_rr_round_trip_returns_the_same_pixels():
    torch.manual_seed(0)
    h = w = 96
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ramp = (0.01 * xx + 0.02 * yy).view(1, 1, h, w)  # bilinear interpolation is exact on a linear image
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 1, h, w), 9, 1, 4)
    th = theta_from_box(torch.tensor([[50.0, 42.0]]), torch.tensor([[18.0, 22.0, 15.0, 9.0]]), (h, w), 15.0)
    x0, y0, x1, y1 = 50 - 18 - 7.5, 42 - 15 - 7.5, 50 + 22 + 7.5, 42 + 9 + 7.5
    inner = (slice(None), slice(None), slice(int(y0) + 2, int(y1) - 2), slice(int(x0) + 2, int(x1) - 2))
    back = paste_back(recalibrate(ramp, th, (128, 128)), th, (h, w))
    assert (back[inner] - ramp[inner]).abs().max().item() < 1e-4
    back_s = paste_back(recalibrate(smooth, th, (128, 128)), th, (h, w))
    err = (back_s[inner] - smooth[inner]).abs()
    assert err.mean().item() < 0.005 and err.max().item() < 0.03
    back = back_s
    # outside the RoI the pasted map is 0
    assert back[0, 0, :, : int(x0) - 1].abs().max().item() == 0
    # theta^-1 composed with theta is the identity (Eq. 4, exact inverse)
    inv = invert_theta(th)
    a = torch.cat([th[0], torch.tensor([[0.0, 0, 1]])])
    b = torch.cat([inv[0], torch.tensor([[0.0, 0, 1]])])
    assert torch.allclose(a @ b, torch.eye(3), atol=1e-5)


def test_paste_back_into_a_finer_grid():
    # paste into a grid twice as fine (f = 0.5: L-Net pixels = original * 0.5)
    h = w = 64
    th = theta_from_xyxy(torch.tensor([[16.0, 16.0, 48.0, 48.0]]), (h, w), alpha=0.0)
    ones = torch.ones(1, 1, 32, 32)
    fine = paste_back(ones, th, (128, 128), scale=(0.5 * 128 / 64, 0.5 * 128 / 64))[0, 0]
    on = fine > 0.5
    ys, xs = torch.nonzero(on, as_tuple=True)
    assert (xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()) == (32, 95, 32, 95)


# ---------------------------------------------------------------- gradient through RR, gamma hook
@pytest.mark.parametrize("gamma", [0.0, 0.1, 1.0])
def test_gradient_reaches_box_outputs_scaled_by_gamma(gamma):
    torch.manual_seed(0)
    img = torch.rand(1, 1, 64, 64)
    ltrb = torch.tensor([[10.0, 12.0, 8.0, 9.0]], requires_grad=True)
    kp = torch.tensor([[30.0, 34.0]])

    def grad_with(g):
        ltrb.grad = None
        th = theta_from_box(kp, ltrb, (64, 64), 15.0)
        th = decay_gradient(th, g)
        recalibrate(img, th, (32, 32)).square().sum().backward()
        return ltrb.grad.clone()

    full = grad_with(1.0)
    assert full.abs().sum() > 0
    assert torch.allclose(grad_with(gamma), gamma * full, atol=1e-6)


def test_snet_loss_reaches_lnet_through_theta_only_scaled():
    torch.manual_seed(0)
    cfg = ModelConfig(width=8, roi_size=32, gamma=0.1)
    model = LSNet(cfg)
    images = torch.rand(2, 1, 64, 64)
    masks = torch.zeros(2, 64, 64)
    masks[:, 20:40, 24:36] = 1

    def lnet_grad(gamma):
        model.zero_grad()
        torch.manual_seed(1)  # same keypoint draw
        model.snet_losses(images, masks, gamma=gamma)["loss"].backward()
        return model.lnet.bbr_head[-1].weight.grad.clone()

    g1 = lnet_grad(1.0)
    assert g1.abs().sum() > 0
    assert torch.allclose(lnet_grad(0.1), 0.1 * g1, rtol=1e-4, atol=1e-8)
    assert lnet_grad(0.0).abs().sum() == 0
    # the KP head gets nothing from S-Net (keypoint choice is discrete)
    assert model.lnet.kp_head[-1].weight.grad is None or model.lnet.kp_head[-1].weight.grad.abs().sum() == 0


def test_snet_on_prompt_boxes_alone_does_not_run_lnet():
    """``topk = 0`` (ours): S-Net learns from the prompt boxes only; L-Net is never called, a batch
    without a prompt box gives no loss, and the RoIs are exactly the prompts (same targets as with
    L-Net's RoIs present, minus those)."""
    torch.manual_seed(0)
    model = LSNet(ModelConfig(width=8, roi_size=64))  # 64 px: S-Net's deepest map is 2x2, so one RoI can train BatchNorm
    images = torch.rand(2, 1, 64, 64)
    masks = torch.zeros(2, 64, 64)
    masks[1, 20:40, 24:36] = 1
    prompts = torch.tensor([[1.0, 22.0, 18.0, 38.0, 42.0]])
    calls = []
    model.lnet.register_forward_hook(lambda *a: calls.append(1))
    assert model.snet_losses(images, masks, topk=0)["loss"] is None
    out = model.snet_losses(images, masks, topk=0, prompt_boxes=prompts)
    assert not calls and out["theta"].shape == (1, 2, 3) and out["roi_target"].sum() > 0
    out["loss"].backward()
    assert all(p.grad is None for p in model.lnet.parameters())
    assert model.snet.encoder.conv1.weight.grad.abs().sum() > 0
    both = model.snet_losses(images, masks, topk=3, prompt_boxes=prompts)
    assert calls and both["theta"].shape == (3, 2, 3)
    assert torch.allclose(both["theta"][2:], out["theta"]) and torch.equal(both["roi_target"][2:], out["roi_target"])


# ---------------------------------------------------------------- losses
def test_focal_loss_by_hand():
    x = torch.tensor([0.0, 2.0])
    t = torch.tensor([1.0, 0.0])
    p = torch.sigmoid(x)
    ref = -(0.5 * (1 - p[0]) ** 2 * torch.log(p[0]) + 0.5 * p[1] ** 2 * torch.log(1 - p[1])) / 2
    assert focal_loss(x, t).item() == pytest.approx(ref.item(), rel=1e-6)
    ref25 = -(0.25 * (1 - p[0]) ** 2 * torch.log(p[0]) + 0.75 * p[1] ** 2 * torch.log(1 - p[1])) / 2
    assert focal_loss(x, t, alpha=0.25).item() == pytest.approx(ref25.item(), rel=1e-6)


def test_dice_and_cls_loss_by_hand():
    logits = torch.tensor([[[100.0, -100.0], [100.0, -100.0]]])  # p = [[1,0],[1,0]]
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # 1 - (2*1 + 1) / (2 + 1 + 1) = 0.25
    assert dice_loss(logits, target).item() == pytest.approx(0.25, abs=1e-6)
    assert dice_loss(torch.full((1, 4), -100.0), torch.zeros(1, 4)).item() == pytest.approx(0.0, abs=1e-6)
    assert cls_loss(logits, target).item() == pytest.approx(focal_loss(logits, target).item() + 0.2 * 0.25, rel=1e-5)


def test_diou_properties():
    a = torch.tensor([[10.0, 10.0, 5.0, 5.0]])
    assert diou_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    # same centre, half the size in x: IoU = 0.5, rho = 0
    assert diou_loss(torch.tensor([[5.0, 5.0, 5.0, 5.0]]), a).item() == pytest.approx(0.5, abs=1e-6)
    # shifted box, same size: pred (l=0, r=20) vs target (10, 10) -> x in [0,20] vs [-10,10]
    # IoU = 10*10 / (200+200-100) = 1/3; rho = 10; enclosing 30 x 10 -> c^2 = 1000
    d = diou_loss(torch.tensor([[0.0, 20.0, 5.0, 5.0]]), a).item()
    assert d == pytest.approx(1 - 1 / 3 + 100 / 1000, abs=1e-5)
    # disjoint boxes: loss > 1 and grows with the distance (the property DIoU adds over IoU)
    far = diou_loss(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), torch.tensor([[-40.0, 50.0, 1.0, 1.0]]))
    farther = diou_loss(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), torch.tensor([[-80.0, 90.0, 1.0, 1.0]]))
    assert 1 < far.item() < farther.item() < 2
    # scale invariance
    assert diou_loss(torch.tensor([[0.0, 20.0, 5.0, 5.0]]) * 3, a * 3).item() == pytest.approx(d, abs=1e-5)


def test_eq5_lnet_loss_combines_by_lambda():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 8, 8)
    T = torch.rand(1, 4, 8, 8) * 10
    k, t = targets_from_boxes(torch.tensor([[8.0, 8.0, 24.0, 20.0]]), torch.tensor([0]), 1, (8, 8))
    out = lnet_loss(logits, T, k, t, lam=0.5)
    pos = (k >= 0.5)[0, 0]
    reg = diou_loss(T[0].permute(1, 2, 0)[pos], t[0].permute(1, 2, 0)[pos]).mean()
    assert out["num_pos"] == int(pos.sum())
    assert out["loss"].item() == pytest.approx(cls_loss(logits, k).item() + 0.5 * reg.item(), rel=1e-5)
    empty = lnet_loss(logits, T, torch.zeros_like(k), torch.zeros_like(t))
    assert empty["reg"].item() == 0.0


# ---------------------------------------------------------------- decode (inference rule)
def test_decode_known_heatmap_into_the_right_boxes():
    h, w = 20, 24
    heat = torch.zeros(2, 1, h, w)
    heat[0, 0, 3:6, 4:7] = 0.9  # component 1: centre cell (5, 4)
    heat[0, 0, 12:15, 15:20] = 0.7  # component 2: centre cell (17, 13)
    heat[0, 0, 10, 2] = 0.4  # below threshold: ignored
    T = torch.zeros(2, 4, h, w)
    T[0, :, 4, 5] = torch.tensor([6.0, 10.0, 4.0, 8.0])
    T[0, :, 13, 17] = torch.tensor([3.0, 3.0, 3.0, 3.0])
    rois = decode(heat, T, 0.5, min_box_size=0.0)
    assert len(rois) == 2 and rois.batch.tolist() == [0, 0]
    got = sorted(zip(rois.boxes.tolist(), rois.scores.tolist()))
    # cell (5, 4) -> (22, 18): box (16, 14, 32, 26); cell (17, 13) -> (70, 54): (67, 51, 73, 57)
    assert got[0][0] == [16.0, 14.0, 32.0, 26.0] and got[0][1] == pytest.approx(0.9)
    assert got[1][0] == [67.0, 51.0, 73.0, 57.0] and got[1][1] == pytest.approx(0.7)
    assert len(decode(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4, 4))) == 0


def test_topk_keypoint_draw_picks_distinct_peaks():
    heat = torch.zeros(1, 1, 16, 16)
    heat[0, 0, 2, 2], heat[0, 0, 2, 3] = 0.9, 0.8  # one peak (neighbour suppressed)
    heat[0, 0, 10, 10] = 0.7
    heat[0, 0, 14, 4] = 0.6
    heat[0, 0, 7, 13] = 0.1
    seen = set()
    for s in range(60):
        cells, _ = sample_topk_keypoints(heat, 3, torch.Generator().manual_seed(s))
        seen.add(tuple(cells[0].tolist()))
    assert seen == {(2, 2), (10, 10), (4, 14)}
