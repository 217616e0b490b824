"""End to end through the users' entry points: train a tiny L-SNet on generated CTs whose target
organ varies strongly in size (``training.train``), export it (``training.export``), segment held-out
generated volumes with ``lsnet segment`` and measure the DSC of the written ``.seg.nrrd``.

Stated quality bar, over 18 held-out phantoms (seeds 901-906, each at a small, a medium and a large
target scale): mean DSC >= 0.55, and for each scale a mean DSC > 0.3 (every size is found, not just
the large ones).  Measured 2026-12-03 on a 2-core AMD EPYC with ~2-5 minutes of CPU training (30 short
epochs): per-scale means 0.44 / 0.73 / 0.76, overall 0.64; the same run trained for 40 epochs gave
0.38 / 0.73 / 0.77, overall 0.63.  Single phantoms vary far more (small target: 0.05 to 0.77 over the
six seeds), which is why the bar is a mean over many: the earlier version of this test scored three
phantoms, one per scale, and failed on another CPU when its one small phantom (seed 901, the hardest
of the six) dropped from 0.41 to 0.05.  The tiny model works on a 2 mm grid, so delta and beta are
scaled to keep the paper's physical heatmap size (docs/method.md).  A randomly initialised model scores
~0.0 here (checked below), so the test cannot pass on random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from lsnet.app.cli import main as lsnet_main
from lsnet.config import ModelConfig
from lsnet.method.model import LSNet
from lsnet.samples.phantom import make_phantom_volume
from lsnet.io.weights import save_model
from training.export import export
from training.train import main as train_main

SHAPE, SPACING = (12, 96, 96), (2.5, 2.5, 3.0)
SCALES = (0.35, 0.8, 1.5)  # target scale: small, medium, large
HELD_OUT = [(seed, scale) for scale in SCALES for seed in range(901, 907)]
DSC_BAR = 0.55
PER_SCALE_BAR = 0.3


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _config(tmp: Path) -> Path:
    cfg = {
        "method": "lsnet",
        "model": {"width": 8, "spacing": 2.0, "roi_size": 64, "delta": 8.0, "beta": 1.25},
        "data": {
            "datasets": [{"type": "phantom", "count": 16, "seed": 0, "shape": list(SHAPE), "spacing": list(SPACING)}],
            "cache_dir": str(tmp / "cache"), "folds": 4, "fold": -1, "crop": 128, "workers": 0,
        },
        "train": {"epochs": 30, "lr": 0.002, "lr_step": 24, "batch_size": 8, "device": "cpu", "log_every": 50},
    }
    p = tmp / "e2e.json"
    p.write_text(json.dumps(cfg))
    return p


def _segment_all(weights: Path, tmp: Path, tag: str) -> list:
    scores = []
    for seed, scale in HELD_OUT:
        img, lab = make_phantom_volume(SHAPE, SPACING, seed=seed, target_scale=scale)
        ct = tmp / f"ct_{seed}_{scale}.nrrd"
        if not ct.exists():
            sitk.WriteImage(img.to_sitk(), str(ct))
        out = tmp / f"{tag}_{seed}_{scale}"
        assert lsnet_main(["segment", str(ct), "-o", str(out), "--weights", str(weights), "--device", "cpu", "-q"]) == 0
        seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
        voxels = seg["voxels"]
        assert voxels.shape == img.array.shape[::-1] or voxels.shape == img.array.shape
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.seg.nrrd")))
        scores.append(dsc(mask, lab.array))
    return scores


@pytest.mark.slow
def test_train_export_segment_reaches_stated_dsc(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--config", str(_config(tmp_path)), "--out", str(run), "-q"]) == 0
    weights = export(run, tmp_path / "tiny.safetensors", which="last", description="end-to-end test model")
    assert json.loads(weights.with_suffix(".json").read_text())["config"]["width"] == 8
    scores = _segment_all(weights, tmp_path, "trained")
    per_scale = {scale: float(np.mean([s for (_, sc), s in zip(HELD_OUT, scores) if sc == scale])) for scale in SCALES}
    print("held-out phantom DSC:", [round(s, 3) for s in scores], "per scale:", per_scale)
    assert np.mean(scores) >= DSC_BAR, (per_scale, scores)
    assert min(per_scale.values()) > PER_SCALE_BAR, (per_scale, scores)  # every size is found, not just the large ones

    # control: the same pipeline with random weights does not pass
    rnd = save_model(LSNet(ModelConfig(width=8, spacing=2.0, roi_size=64)), tmp_path / "random.safetensors", {"description": "random"})
    assert np.mean(_segment_all(rnd, tmp_path, "random")) < 0.2
