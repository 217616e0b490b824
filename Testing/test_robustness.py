"""Issue 12's additions (all ours, off by default): RR from a finer canvas (``roi_source_factor``), box
prompts for S-Net, domain randomisation, the shift tests and box-prompt DSC of ``training.evaluate``,
and the shipped sample CT behind ``lsnet demo``.

Checks of what the code does, on small synthetic data; no figure that only a long training run
reaches is asserted here (those are in docs/results.md with their commands).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lsnet.config import ModelConfig
from lsnet.method.model import LSNet, pool_masks, pool_to_lnet
from lsnet.method.recalibration import recalibrate, theta_from_xyxy
from lsnet.pipeline.inference import Segmenter, box_prompt_predict, lsnet_predict
from training.augment import AugmentConfig, augment_batch, domain_shift, gaussian_blur, jpeg_round_trip
from training.evaluate import SHIFTS, apply_shift, prompt_boxes_of
from training.methods import jittered_prompt_boxes

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "training" / "configs" / "tiny_cpu.json"


def _smooth_image(h: int, w: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return (0.5 + 0.25 * torch.sin(6 * x) * torch.cos(4 * y))[None, None]


# ------------------------------------------------------------------ RR from the finer canvas
def test_pooled_canvas_keeps_the_normalised_frame():
    """theta means the same region on the fine canvas and on L-Net's pooled one (align_corners=False)."""
    fine = _smooth_image(128, 96)
    coarse = pool_to_lnet(fine, 2)
    assert coarse.shape[-2:] == (64, 48)
    box = torch.tensor([[10.0, 12.0, 30.0, 28.0]])  # L-Net pixels
    theta = theta_from_xyxy(box, (64, 48), alpha=4.0)
    a = recalibrate(coarse, theta, (32, 32))
    b = recalibrate(fine, theta, (32, 32))
    assert float((a - b).abs().mean()) < 0.01  # same content; only the sampling resolution differs
    m = torch.zeros(1, 8, 8)
    m[0, 2:6, 2:4] = 1
    m[0, 0, 0] = 1  # a single fine pixel is less than half of its cell
    pm = pool_masks(m, 2)
    assert pm.shape == (1, 4, 4) and int(pm.sum()) == 2 and pm[0, 0, 0] == 0  # rows 2-5, cols 2-3 = 2 cells


def _tiny_lsnet(factor: int) -> LSNet:
    torch.manual_seed(0)
    return LSNet(ModelConfig(width=8, roi_size=32, roi_source_factor=factor, spacing=4.0)).eval()


def test_lsnet_predict_on_a_fine_canvas_returns_fine_grids_and_boxes():
    model = _tiny_lsnet(2)
    with torch.no_grad():
        model.lnet.kp_head[-1].bias.fill_(5.0)  # every cell a keypoint: RoIs exist
    x = _smooth_image(128, 128).repeat(2, 1, 1, 1)
    with torch.no_grad():
        prob, heat, rois = lsnet_predict(model, x)
    assert prob.shape == (2, 128, 128)
    assert heat.shape == (2, 1, 16, 16)  # L-Net stride 4 on the 64 px pooled canvas
    assert len(rois) > 0
    assert float(rois.boxes[:, 2].max()) <= 128 + 1e-3 and float(rois.boxes[:, 2].max()) > 64  # fine pixels


def test_box_prompt_predict_is_zero_outside_the_box_and_matches_the_engine_path():
    model = _tiny_lsnet(1)
    x = _smooth_image(64, 64)
    box = torch.tensor([[16.0, 20.0, 40.0, 36.0]])
    with torch.no_grad():
        p = box_prompt_predict(model, x, box, torch.tensor([0]))[0]
    alpha = model.config.alpha
    outside = torch.ones_like(p, dtype=torch.bool)
    y0, y1 = int(20 - alpha / 2) - 1, int(math.ceil(36 + alpha / 2)) + 1
    x0, x1 = int(16 - alpha / 2) - 1, int(math.ceil(40 + alpha / 2)) + 1
    outside[max(0, y0):y1, max(0, x0):x1] = False
    assert float(p[outside].abs().max()) == 0.0 and float(p.max()) > 0


def test_segmenter_with_roi_source_factor_two_segments_and_corrects_a_box():
    from lsnet.io.geometry import Volume
    from lsnet.results import RoiBox

    model = _tiny_lsnet(2)
    with torch.no_grad():
        model.lnet.kp_head[-1].bias.fill_(5.0)
    seg = Segmenter(model=model, device="cpu", batch_size=2, drop_small_components=False)
    arr = (np.random.default_rng(0).normal(40, 20, (3, 80, 72))).astype(np.float32)
    vol = Volume(arr, (1.5, 1.5, 3.0), (0.0, 0.0, 0.0), np.eye(3))
    res = seg.segment_volume(vol)
    assert res.mask.shape == arr.shape and res.heatmap.shape == arr.shape and res.boxes
    assert all(0 <= b.x0 < b.x1 <= 72 + 1e-3 and 0 <= b.y0 < b.y1 <= 80 + 1e-3 for b in res.boxes)
    # the margin is reported in original pixels: alpha L-Net pixels of 4 mm = 4 * 15 / 1.5 = 40 px
    assert abs(res.boxes[0].margin_px - 15.0 * 4.0 / 1.5) < 0.5
    mask, prob = seg.segment_box(vol, 1, RoiBox(1, 20.0, 20.0, 40.0, 50.0, 1.0))
    assert mask.shape == (80, 72) and prob.shape == (80, 72)


def test_old_cards_without_the_field_keep_the_papers_rr():
    d = ModelConfig().to_dict()
    d.pop("roi_source_factor")
    assert ModelConfig.from_dict(d).roi_source_factor == 1


# ------------------------------------------------------------------ box prompts for S-Net
def test_jittered_prompt_boxes_surround_the_organ():
    masks = torch.zeros(4, 64, 64)
    masks[0, 20:30, 10:40] = 1
    masks[2, 5:15, 5:15] = 1
    g = torch.Generator().manual_seed(0)
    boxes = jittered_prompt_boxes(masks, 1.0, (-2.0, 10.0), 0.1, pixel_mm=1.0, generator=g)
    assert sorted(boxes[:, 0].long().tolist()) == [0, 2]  # only slices with foreground
    b0 = boxes[boxes[:, 0] == 0][0, 1:]
    assert -2 - 3.1 <= float(b0[0]) - 10 <= 2 + 3.1 + 0.1  # left edge within the jitter of the tight box
    assert float(b0[2] - b0[0]) >= 30 - 4 - 1e-4 and float(b0[2] - b0[0]) <= 30 + 20 + 1e-4
    assert (boxes[:, 1:] >= 0).all() and (boxes[:, 1:] <= 64).all()
    none = jittered_prompt_boxes(masks, 0.0, (-2.0, 10.0), 0.1, pixel_mm=1.0, generator=g)
    assert none.shape == (0, 5)


def test_prompt_boxes_join_the_snet_loss_without_reaching_lnet():
    model = _tiny_lsnet(2)
    images = _smooth_image(128, 128).repeat(2, 1, 1, 1)
    masks = torch.zeros(2, 128, 128)
    masks[0, 40:70, 30:90] = 1
    prompts = torch.tensor([[0.0, 26.0, 36.0, 94.0, 74.0]])
    out = model.snet_losses(images, masks, gamma=0.0, topk=3, prompt_boxes=prompts)
    assert out["roi_logits"].shape[0] == 3 and out["roi_target"].shape[0] == 3  # 2 drawn RoIs + 1 prompt
    assert float(out["roi_target"][2].mean()) > 0.15  # the prompt's RoI holds the organ (+ the alpha margin)
    out["loss"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.lnet.parameters())  # gamma 0


# ------------------------------------------------------------------ domain randomisation
@pytest.mark.parametrize("key", ["p_resolution", "p_blur", "p_ct_noise", "p_enhancement", "p_window", "p_jpeg"])
def test_each_domain_shift_changes_the_image_and_stays_in_range(key):
    images = _smooth_image(96, 96).repeat(2, 1, 1, 1)
    images[:, :, 30:60, 30:60] += 0.2
    masks = torch.zeros(2, 96, 96)
    masks[:, 35:55, 35:55] = 1
    cfg = AugmentConfig(**{key: 1.0})
    out = domain_shift(images, masks, cfg, pixel_mm=1.0, generator=torch.Generator().manual_seed(1))
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float((out - images).abs().mean()) > 1e-4, key
    if key == "p_enhancement":  # only the organ and its smoothed rim change
        far = torch.ones(96, 96, dtype=torch.bool)
        far[25:65, 25:65] = False
        assert float((out - images)[:, :, far].abs().max()) < 1e-6


def test_domain_randomisation_off_by_default_leaves_the_augmentation_stream_unchanged():
    images = _smooth_image(64, 64).repeat(2, 1, 1, 1)
    masks = torch.zeros(2, 64, 64)
    a = augment_batch(images, masks, AugmentConfig(), torch.Generator().manual_seed(3), pixel_mm=1.0)[0]
    b = augment_batch(images, masks, AugmentConfig(), torch.Generator().manual_seed(3), pixel_mm=2.0)[0]
    assert torch.equal(a, b)


def test_blur_and_jpeg_helpers():
    img = torch.zeros(1, 1, 31, 31)
    img[0, 0, 15, 15] = 1.0
    out = gaussian_blur(img, torch.tensor([2.0]))
    assert abs(float(out.sum()) - 1.0) < 1e-4 and float(out[0, 0, 15, 15]) < 0.1
    x = _smooth_image(64, 64)[0, 0]
    j = jpeg_round_trip(x, 90)
    assert j.shape == x.shape and float((j - x).abs().mean()) < 0.02


# ------------------------------------------------------------------ shift tests and box prompts in evaluation
def test_shifts_are_deterministic_and_clean_is_the_identity():
    x = _smooth_image(64, 64).repeat(2, 1, 1, 1)
    assert torch.equal(apply_shift(x, "clean", 1.0, seed=0), x)
    for name in SHIFTS:
        a, b = apply_shift(x, name, 1.0, seed=5), apply_shift(x, name, 1.0, seed=5)
        assert torch.equal(a, b), name
        assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((apply_shift(x, "noise", 1.0, seed=0) - x).std()) > 0.05  # 25 HU of 255
    assert torch.equal(apply_shift(x, "res2mm", 2.0, seed=0), x)  # already at 2 mm: nothing to lose


def test_prompt_boxes_of_grow_the_tight_box():
    m = torch.zeros(2, 32, 32, dtype=torch.bool)
    m[1, 10:20, 5:9] = True
    boxes, idx = prompt_boxes_of(m, 2.0)
    assert idx.tolist() == [1] and boxes.tolist() == [[3.0, 8.0, 11.0, 22.0]]


# ------------------------------------------------------------------ the recipe through the users' entry points
def test_robust_recipe_trains_evaluates_exports_and_segments(tmp_path):
    from lsnet.architectures import load_model
    from training.evaluate import main as evaluate_main
    from training.export import export
    from training.train import main as train_main

    out = tmp_path / "run"
    over = ["--set", "model.roi_source_factor=2", "--set", "lsnet.prompt_boxes=0.5", "--set", "augment.p_resolution=0.5",
            "--set", "augment.p_jpeg=0.5", "--set", "augment.p_enhancement=0.5", "--set", "augment.p_ct_noise=0.5",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=1"]
    assert train_main(["--config", str(TINY), "--out", str(out), "-q", *over]) == 0
    res = tmp_path / "res"
    assert evaluate_main([str(out), "--out", str(res), "--checkpoint", "last", "--shifts", "clean,lowdose3mm,thick5mm"]) == 0
    import csv

    rows = list(csv.DictReader(open(res / "results.csv")))
    assert [r["shift"] for r in rows] == ["clean", "lowdose3mm", "thick5mm"]
    assert all(r["box_dsc"] != "" and 0 <= float(r["box_dsc"]) <= 1 for r in rows)
    w = export(out, tmp_path / "m.safetensors", which="last")
    model, card = load_model(w)
    assert card["config"]["roi_source_factor"] == 2 and model.config.roi_source_factor == 2


# ------------------------------------------------------------------ the sample CT and the demo
def test_sample_ct_ships_small_with_its_label_licence_and_citation():
    from lsnet.samples.sample_ct import SAMPLE_DIR, load_sample_ct

    files = [p for p in SAMPLE_DIR.iterdir() if p.suffix == ".nrrd"]
    assert sum(p.stat().st_size for p in files) <= 6 * 1024 * 1024
    readme = (SAMPLE_DIR / "README.md").read_text()
    assert "CC BY 3.0" in readme and "10.7937/K9/TCIA.2016.tNB1kqBU" in readme and "training data" in readme
    image, label = load_sample_ct()
    assert image.array.dtype == np.int16 and image.array.shape == label.array.shape
    assert np.allclose(image.spacing, (1.0, 1.0, 2.5)) and image.array.min() >= -1024
    ks = np.flatnonzero(label.array.any(axis=(1, 2)))
    assert 0 < ks[0] and ks[-1] < label.array.shape[0] - 1  # pancreas-free slices on both sides


def test_demo_segments_the_sample_ct_and_says_it_is_training_data(tmp_path, capsys):
    from lsnet.app.cli import main

    assert main(["demo", "-o", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "sample CT" in text and "volume DSC against the manual label" in text
    assert "in the bundled model's training data" in text
    dsc = float(text.split("manual label ")[1].split(";")[0])
    assert 0.0 <= dsc <= 1.0
    assert (tmp_path / "demo" / "overview.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "segmentation.seg.nrrd").exists()


def test_cv_summary_means_and_sds_per_shift(tmp_path):
    from training.cv_summary import main as summary_main

    rows = [
        {"label": "cv_x_f0", "shift": "clean", "dsc": "0.5", "box_dsc": "0.8"},
        {"label": "cv_x_f1", "shift": "clean", "dsc": "0.7", "box_dsc": "0.6"},
        {"label": "cv_x_f0", "shift": "noise", "dsc": "0.4", "box_dsc": ""},
        {"label": "cv_y_f0", "shift": "clean", "dsc": "0.1", "box_dsc": "0.1"},
    ]
    csv_path = tmp_path / "results.csv"
    import csv

    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["label", "shift", "dsc", "box_dsc"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "m.json"
    assert summary_main([str(csv_path), "--group", "cv_x", "-o", str(out)]) == 0
    s = json.loads(out.read_text())["cv_estimate"]["by_shift"]
    assert s["clean"]["dsc"] == [60.0, round(100 * math.sqrt(0.02), 2), 2]
    assert s["noise"]["dsc"] == [40.0, 0.0, 1] and "box_dsc" not in s["noise"]
    assert summary_main([str(csv_path), "--group", "missing", "-o", str(out)]) == 2
    # --keys/--into: only the named figures of the group replace a card's, the rest and the protocol stay
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"metrics": {"cv_estimate": {"protocol": "p", "command": "c", "by_shift": {
        "clean": {"dsc": [1.0, 0.0, 4], "box_dsc": [2.0, 0.0, 4]}}}}}))
    assert summary_main([str(csv_path), "--group", "cv_y", "--keys", "box_dsc", "--into", str(card), "-o", str(out),
                         "--command", "cmd y"]) == 0
    e = json.loads(out.read_text())["cv_estimate"]
    assert e["by_shift"]["clean"] == {"dsc": [1.0, 0.0, 4], "box_dsc": [10.0, 0.0, 1]} and e["protocol"] == "p"
    assert e["updates"] == [{"keys": ["box_dsc"], "group": "cv_y", "command": "cmd y"}]
    for extra in (["--keys", "box_dsc"], ["--keys", "nope", "--into", str(card)], ["--keys", "precision", "--into", str(card)],
                  ["--keys", "box_dsc", "--into", str(tmp_path / "none.json")]):
        assert summary_main([str(csv_path), "--group", "cv_y", "-o", str(out), *extra]) == 2
