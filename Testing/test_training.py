"""Training entry point: L-SNet, U-Net, FCN and coarse-to-fine train a few iterations on CPU from
phantoms through ``python -m training.train`` (the users' entry point), resume from checkpoints, and
the 1-process DDP (gloo) path under torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsnet.errors import InputError, WeightsError
from training.config import DEFAULTS, load_config
from training.train import CHECKPOINT_FORMAT, load_checkpoint, main, train_iteration

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "training" / "configs" / "tiny_cpu.json"


def _rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _args(method: str, out: Path, cache_dir: Path) -> list:
    a = ["--config", str(TINY), "--out", str(out), "-q", "--set", f"method={method}", "--set", f"data.cache_dir={cache_dir}"]
    if method == "lsnet":  # also exercise DataLoader worker processes reading the memory-mapped cache
        a += ["--set", "data.workers=1"]
    return a


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One epoch (2 iterations) of each method through the users' entry point."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for method in ("lsnet", "unet", "c2f"):
        out = root / f"{method}_f0"
        assert main(_args(method, out, cache_dir) + ["--set", "train.epochs=1"]) == 0
        runs[method] = out
    return runs


@pytest.mark.parametrize("method", ["lsnet", "unet", "c2f"])
def test_method_trains_and_resumes(method, trained, tmp_path, cache_dir):
    out = tmp_path / method
    shutil.copytree(trained[method], out)
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["format"] == CHECKPOINT_FORMAT and ck["epoch"] == 0
    hist = _rows(out / "history.csv")
    assert len(hist) == 1 and float(hist[0]["iters"]) == 2
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "config.json").exists() and (out / "split.json").exists() and (out / "summary.json").exists()
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train_patients"]) & set(split["val_patients"])
    loss_cols = [k for k in hist[0] if k.startswith("train_loss_")]
    expected = {"lsnet": {"train_loss_lnet", "train_loss_snet"}, "unet": {"train_loss_seg"}, "c2f": {"train_loss_coarse", "train_loss_fine"}}[method]
    assert set(loss_cols) == expected
    assert hist[0]["val_dsc"] != ""  # validation ran on the held-out fold
    if method != "unet":
        assert hist[0]["val_miou"] != ""

    # resume: the weights saved after epoch 0 are loaded and training continues with epoch 1
    before = {k: v.clone() for k, v in ck["system"].items()}
    assert main(_args(method, out, cache_dir) + ["--set", "train.epochs=2"]) == 0
    ck2 = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck2["epoch"] == 1 and [h["epoch"] for h in ck2["history"]] == [0, 1]
    assert len(_rows(out / "history.csv")) == 2
    changed = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], ck2["system"][k])]
    assert changed, "training after resume must update the weights"
    assert ck2["optimizer"]["state"], "optimizer state must be restored and saved"
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == 2
    # nothing left to do: a rerun with the same epochs is a no-op
    assert main(_args(method, out, cache_dir) + ["--set", "train.epochs=2"]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1


def test_fcn_baseline_and_resume_guard(tmp_path, cache_dir):
    out = tmp_path / "fcn"
    args = ["--config", str(TINY), "--out", str(out), "-q", "--set", "method=fcn", "--set", f"data.cache_dir={cache_dir}",
            "--set", "train.epochs=1", "--set", "train.max_iters=1"]
    assert main(args) == 0
    # a different architecture in the same run folder is refused (exit code 2, clear message)
    assert main(args[:-4] + ["--set", "method=unet"]) == 2


def test_config_defaults_are_the_papers_and_overridable(tmp_path):
    assert DEFAULTS["train"]["lr"] == 1e-4 and DEFAULTS["train"]["epochs"] == 60
    assert DEFAULTS["train"]["lr_step"] == 25 and DEFAULTS["train"]["lr_decay"] == 0.1
    assert DEFAULTS["data"]["crop"] == 320 and DEFAULTS["lsnet"]["topk"] == 3 and DEFAULTS["baseline"]["pad"] == 15
    cfg = load_config(ROOT / "training" / "configs" / "c2f_paper.json", ["train.lr=0.001", "model.gamma=0", "data.fold=2"])
    assert cfg["method"] == "c2f" and cfg["train"]["lr"] == 0.001 and cfg["model"]["gamma"] == 0 and cfg["data"]["fold"] == 2
    assert cfg["data"]["datasets"][0]["type"] == "slices2d"  # inherited through "extends"
    with pytest.raises(InputError, match="unknown configuration key"):
        load_config(TINY, ["train.lrr=1"])
    with pytest.raises(InputError, match="multiple of 32"):
        load_config(TINY, ["data.crop=100"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"epoch": 3}}))
    with pytest.raises(InputError, match="train.epoch"):
        load_config(bad)


def test_gamma_zero_leaves_lnet_untouched_in_the_snet_phase():
    from training.methods import LSNetSystem
    from lsnet.config import ModelConfig

    torch.manual_seed(0)
    system = LSNetSystem(ModelConfig(width=8, roi_size=32))
    opt = torch.optim.Adam(system.parameters(), lr=1e-2)
    x = torch.rand(2, 1, 64, 64)
    m = torch.zeros(2, 64, 64)
    m[:, 20:36, 24:40] = 1
    train_iteration(system, system, opt, ["lnet"], x, m, 0.0)  # Adam now has L-Net momentum
    lnet_before = [p.detach().clone() for p in system.model.lnet.parameters()]
    snet_before = [p.detach().clone() for p in system.model.snet.parameters()]
    train_iteration(system, system, opt, ["snet"], x, m, 0.0)
    assert all(torch.equal(a, p) for a, p in zip(lnet_before, system.model.lnet.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(snet_before, system.model.snet.parameters()))
    train_iteration(system, system, opt, ["snet"], x, m, 0.1)  # gamma > 0: S-Net supervises L-Net
    assert any(not torch.equal(a, p) for a, p in zip(lnet_before, system.model.lnet.parameters()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_one_process_gloo_under_torchrun(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "LSNetSegmentation"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "training.train", "--config", str(TINY), "--out", str(tmp_path / "ddp"),
           "-q", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ck["epoch"] == 0
    # DDP wraps the system, but the checkpoint holds the plain system's weights (no "module." prefix)
    assert not any(k.startswith("module.") for k in ck["system"])


def test_evaluate_writes_tables_for_runs(trained, tmp_path):
    from training.evaluate import main as evaluate_main

    res = tmp_path / "res"
    assert evaluate_main([str(trained["lsnet"]), str(trained["c2f"]), "--out", str(res), "--checkpoint", "last"]) == 0
    rows = _rows(res / "results.csv")
    assert [r["method"] for r in rows] == ["lsnet", "c2f"]
    for r in rows:
        assert int(r["slices_fg"]) > 0 and r["dsc"] != "" and r["miou"] != ""
        assert 0.0 <= float(r["dsc"]) <= 1.0
        assert int(r["volumes"]) == int(r["patients"])  # phantoms are volumes: per-volume metrics exist
        # the volume step never adds foreground: its FP-slice rate is at most the raw one
        if r["vol_fp_slice_rate"] != "":
            assert float(r["vol_fp_slice_rate_pp"]) <= float(r["vol_fp_slice_rate"])
        assert r["vol_dsc_pp"] != "" and r["split"] == "val"
    # boxes on the pancreas-free slices next to the organ: L-SNet has a box-prompt path, c2f has none
    assert 0.0 <= float(rows[0]["box_fp_slice_rate"]) <= 1.0 and rows[1]["box_fp_slice_rate"] == ""
    md = (res / "results.md").read_text()
    first_table = md.split("\n\n")[0]
    assert first_table.count("\n| ") == 2 and "DSC %" in md  # two run rows after the header
    assert "volume step" in md and md.count("| lsnet") + md.count("| c2f") >= 2
    # the same runs on their training patients (Table 4's "mIoU in training")
    res_t = tmp_path / "res_train"
    assert evaluate_main([str(trained["lsnet"]), "--out", str(res_t), "--checkpoint", "last", "--split", "train"]) == 0
    (row,) = _rows(res_t / "results.csv")
    assert row["split"] == "train" and int(row["patients"]) > 0 and row["miou"] != ""
    # the paper's tables from these results (one run per group: SD 0, n = 1)
    from training.paper_tables import main as tables_main

    name_l, name_c = Path(trained["lsnet"]).name, Path(trained["c2f"]).name  # lsnet_f0, c2f_f0 -> groups lsnet, c2f
    out_md = tmp_path / "tables.md"
    assert tables_main([str(res / "results.csv"), "--train", str(res_t / "results.csv"),
                        "--table3", f"U-Net={name_c[:-3]}", f"L-Net={name_l[:-3]}",
                        "--table4", f"0.1={name_l[:-3]}", "--table2", "S-Net=missing_group", "--out", str(out_md)]) == 0
    md = out_md.read_text()
    val_l = next(r for r in rows if r["method"] == "lsnet")
    assert f"| L-Net | {100 * float(val_l['miou']):.2f} +- 0.00 (1) | {100 * float(val_l['dsc']):.2f} +- 0.00 (1) |" in md
    assert f"| 0.1 | {100 * float(row['miou']):.2f} +- 0.00 (1) |" in md
    assert "(skipped: no results for missing_group)" in md
    import re

    params = {m.group(1): float(m.group(2)) for m in re.finditer(r"\| (U-Net|L-Net) \| .* \| (\d+\.\d\d) \|", md)}
    assert set(params) == {"U-Net", "L-Net"} and all(v > 0 for v in params.values())  # first-stage sizes counted


def test_metrics_definitions():
    import numpy as np

    from training.metrics import box_iou, hd95, object_best_ious, slice_scores, volume_dsc

    pred = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[0, :4] = True
    pred[0, :2] = True  # half of the object: DSC 2/3, precision 1, recall 1/2
    pred[1, 0, 0] = True  # false positive on an empty slice
    s = slice_scores(pred, gt)
    assert abs(float(s["dsc"][0]) - 2 / 3) < 1e-6 and float(s["precision"][0]) == 1 and float(s["recall"][0]) == 0.5
    assert torch.isnan(s["dsc"][1]) and s["pred_any"].tolist() == [True, True, False] and s["gt_any"].tolist() == [True, False, False]
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [0, 0, 10, 10]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 3, 1.0]]))
    assert torch.allclose(object_best_ious(a, torch.tensor([0]), b, torch.tensor([1, 1])), torch.tensor([0.0]))
    v = np.zeros((5, 20, 20), bool)
    v[1:4, 5:10, 5:10] = True
    w = np.roll(v, 2, axis=2)
    assert volume_dsc(v, v) == 1.0 and abs(volume_dsc(v, w) - 0.6) < 1e-9
    assert hd95(v, v, (1, 1, 1)) == 0.0 and abs(hd95(v, w, (2.0, 1.0, 0.5)) - 1.0) < 1e-9
    from training.metrics import volume_scores

    gt = np.zeros((5, 8, 8), bool)
    gt[1:3, 2:6, 2:6] = True
    pred = gt.copy()
    pred[4, 0, 0] = True  # one false-positive slice of the three without foreground
    s = volume_scores(pred, gt, (1.0, 1.0, 1.0))
    assert (s["slices_with_mask"], s["label_slices"], s["fp_slices"], s["bg_slices"]) == (3, 2, 1, 3)
    assert abs(s["vol_dsc"] - volume_dsc(pred, gt)) < 1e-12 and s["hd95_mm"] == hd95(pred, gt, (1.0, 1.0, 1.0))


def test_extra_phantoms_are_training_only(tmp_path):
    cache = tmp_path / "cache"
    base = ["--config", str(TINY), "-q", "--set", f"data.cache_dir={cache}", "--set", "train.epochs=1",
            "--set", "train.max_iters=1"]
    assert main(base + ["--out", str(tmp_path / "a"), "--phantoms", "2"]) == 0
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    assert split["extra_train_cases"] == 2
    assert {"phantom_100000", "phantom_100001"} <= set(split["train_patients"])
    assert not any(p.startswith("phantom_1000") for p in split["val_patients"])
    # a phantom-only cache has no real cases for a from-cache split: clear error, exit code 2
    assert main(["--config", str(TINY), "-q", "--out", str(tmp_path / "b"), "--set", f"data.cache_dir={cache}",
                 "--set", "data.from_cache=true", "--set", "data.datasets=[]"]) == 2


def test_training_from_a_packed_cache_without_sources(tmp_path):
    """The GPU machine sees no ../shared: build + pack here, delete the sources, train from the pack."""
    import SimpleITK as sitk

    from lsnet.samples.phantom import make_phantom
    from training.cache import main as cache_main

    src = tmp_path / "src"
    src.mkdir()
    rows = ["image,label,patient_id"]
    for n in range(4):
        p = make_phantom(shape=(8, 64, 64), spacing=(3.0, 3.0, 3.0), seed=n, target_scale=0.8)
        for name, arr in ((f"ct{n}.nrrd", p.array), (f"seg{n}.nrrd", p.label)):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(p.spacing)
            sitk.WriteImage(img, str(src / name))
        rows.append(f"ct{n}.nrrd,seg{n}.nrrd,P{n}")
    (src / "cases.csv").write_text("\n".join(rows) + "\n")
    ds = json.dumps([{"type": "list", "path": str(src / "cases.csv")}])
    cfg = ["--config", str(TINY), "--set", f"data.datasets={ds}", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert cache_main(["build"] + cfg) == 0
    assert cache_main(["pack", str(tmp_path / "cache"), str(tmp_path / "packed")]) == 0
    import shutil

    shutil.rmtree(src)
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "-q", "--out", str(out), "--device", "cpu", "--set", f"data.cache_dir={tmp_path / 'packed'}",
                 "--set", "data.from_cache=true", "--set", "data.datasets=[]", "--set", "train.epochs=1",
                 "--set", "train.max_iters=1"]) == 0
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train_patients"] + split["val_patients"]) == ["P0", "P1", "P2", "P3"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["last"]["val_dsc"] is not None and summary["device"] == "cpu"


@pytest.mark.parametrize("method", ["rstn", "dsms_unet", "rpn_fcn"])
def test_seed_systems_train_and_export_through_the_same_entry_point(method, tmp_path, cache_dir):
    """Issue 5: the seed systems train with ``training.train`` and export to engine weights."""
    from lsnet.architectures import load_model
    from training.export import export

    out = tmp_path / method
    assert main(_args(method, out, cache_dir) + ["--set", "train.epochs=1"]) == 0
    rows = _rows(out / "history.csv")
    assert rows and float(rows[-1]["train_loss_seed"]) > 0
    w = export(out, tmp_path / f"{method}.safetensors", which="last")
    model, card = load_model(w)
    assert card["config"]["architecture"] == method and model.config.architecture == method


def test_weight_averaging_of_the_last_epochs_survives_a_resume(tmp_path, cache_dir):
    """``train.average_last 2`` of 3 epochs: ``averaged.pt`` holds the mean of epochs 1 and 2's weights
    (from ``keep_checkpoints``), its BatchNorm statistics recomputed (not the mean); a run cut off after
    epoch 1 and resumed averages epoch 1 (kept in ``last.pt``) with its own epoch 2."""
    a = _args("lsnet", tmp_path / "x", cache_dir)
    base = a[:2] + a[4:]  # without --out
    common = base + ["--set", "train.average_last=2", "--set", "train.keep_checkpoints=true"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["--out", str(full)] + common + ["--set", "train.epochs=3"]) == 0
    ep = [load_checkpoint(full / "checkpoints" / f"epoch_{e:03d}.pt")["system"] for e in (1, 2)]
    avg = load_checkpoint(full / "checkpoints" / "averaged.pt")
    assert avg["averaged"]["epochs_averaged"] == 2 and avg["averaged"]["bn_batches"] >= 1
    sd = avg["system"]
    stats = [k for k in sd if k.endswith("running_mean") or k.endswith("running_var")]
    weights = [k for k in sd if sd[k].is_floating_point() and k not in stats]
    assert stats and weights
    for k in weights:
        torch.testing.assert_close(sd[k], (ep[0][k].float() + ep[1][k].float()) / 2, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(sd[k], (ep[0][k] + ep[1][k]) / 2) for k in stats)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["averaged"]["epochs_averaged"] == 2

    # the same run cut off after epoch 1 (its last.pt is then epoch 1's, the average holding one epoch)
    shutil.copytree(full, cut)
    state = load_checkpoint(full / "checkpoints" / "epoch_001.pt")
    assert state["average"]["n"] == 1
    torch.save(state, cut / "checkpoints" / "last.pt")
    (cut / "checkpoints" / "averaged.pt").unlink()
    assert main(["--out", str(cut)] + common + ["--set", "train.epochs=3"]) == 0
    resumed = load_checkpoint(cut / "checkpoints" / "averaged.pt")["system"]
    ep2 = load_checkpoint(cut / "checkpoints" / "epoch_002.pt")["system"]  # the resumed run's own epoch 2
    for k in weights:
        torch.testing.assert_close(resumed[k], (ep[0][k].float() + ep2[k].float()) / 2, rtol=1e-5, atol=1e-6)


def test_fine_tuning_stage_starts_from_a_run_and_keeps_frozen_parts_fixed(trained, tmp_path, cache_dir, capsys):
    """``train.init_from`` + ``train.freeze ["model.lnet"]`` + ``train.phases ["snet"]`` (the S-Net
    box-prompt stage): the new run starts from the given run's weights, S-Net moves, L-Net's weights
    *and* BatchNorm statistics stay those of the source (also through weight averaging), only the
    S-Net loss is logged; a source of another architecture or of another patient split (its held-out
    patients would leak), an unknown sub-module, a phase the method lacks and a frozen part without a
    source are refused with exit code 2."""
    src = trained["lsnet"]
    before = load_checkpoint(src / "checkpoints" / "last.pt")["system"]
    out = tmp_path / "tune"
    a = _args("lsnet", out, cache_dir) + ["--set", f"train.init_from={src}", "--set", 'train.freeze=["model.lnet"]',
                                          "--set", 'train.phases=["snet"]', "--set", "lsnet.prompt_boxes=1.0",
                                          "--set", "train.epochs=2", "--set", "train.average_last=2"]
    assert main(a) == 0
    for name in ("last.pt", "averaged.pt"):
        after = load_checkpoint(out / "checkpoints" / name)["system"]
        lnet = [k for k in before if k.startswith("model.lnet.")]
        snet = [k for k in before if k.startswith("model.snet.") and before[k].is_floating_point()]
        assert lnet and snet
        for k in lnet:  # weights and running statistics
            assert torch.equal(before[k], after[k]), (name, k)
        assert any(not torch.allclose(before[k], after[k]) for k in snet), name
    hist = _rows(out / "history.csv")
    assert {k for k in hist[0] if k.startswith("train_loss_")} == {"train_loss_snet"}
    record = json.loads((out / "init_source.json").read_text())
    assert record["run"] == str(src) and record["epoch"] == load_checkpoint(src / "checkpoints" / "last.pt")["epoch"]
    # resuming the stage does not go back to the source's weights
    tuned = load_checkpoint(out / "checkpoints" / "last.pt")["system"]
    assert main(a[:-4] + ["--set", "train.epochs=3"]) == 0
    resumed = load_checkpoint(out / "checkpoints" / "last.pt")
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 3
    assert any(not torch.equal(tuned[k], resumed["system"][k]) for k in tuned if k.startswith("model.snet."))
    # a stage started from a stage keeps the chain of sources
    assert main(_args("lsnet", tmp_path / "tune2", cache_dir) + ["--set", f"train.init_from={out}", "--set", "train.epochs=1",
                                                                  "--set", 'train.phases=["snet"]']) == 0
    chain = json.loads((tmp_path / "tune2" / "init_source.json").read_text())
    assert chain["run"] == str(out) and chain["initialised_from"] == record and "initialised_from" not in record

    from_src = ["--set", f"train.init_from={src}", "--set", "train.epochs=1"]
    for i, (extra, why) in enumerate([(from_src + ["--set", "method=unet"], "another method/model"),
                                      (from_src + ["--set", 'train.freeze=["model.nope"]'], "no sub-module 'model.nope'"),
                                      (from_src + ["--set", 'train.phases=["seg"]'], "train.phases must be"),
                                      (from_src + ["--set", "data.fold=1"], "another patient split"),
                                      (["--set", f"train.init_from={tmp_path / 'none'}"], "does not exist"),
                                      (["--set", 'train.freeze=["model.lnet"]'], "give train.init_from")]):
        capsys.readouterr()
        assert main(_args("lsnet", tmp_path / f"bad{i}", cache_dir) + extra) == 2
        assert why in capsys.readouterr().err


SNET_ALONE = ["--set", "lsnet.topk=0", "--set", "lsnet.prompt_boxes=1.0", "--set", 'train.phases=["snet"]',
              "--set", "data.negative_fraction=0.0"]


@pytest.fixture(scope="module")
def snet_alone(tmp_path_factory, cache_dir):
    """S-Net alone on box prompts at width 16 (L-Net width 8), one epoch of the tiny config."""
    out = tmp_path_factory.mktemp("alone") / "snet_alone"
    assert main(_args("lsnet", out, cache_dir) + SNET_ALONE + ["--set", "model.snet_width=16", "--set", "train.epochs=1"]) == 0
    return out


def test_snet_alone_on_prompt_boxes_trains_a_wider_snet_that_is_evaluated_not_exported(snet_alone, tmp_path, cache_dir, capsys):
    """``lsnet.topk 0`` + ``train.phases ["snet"]`` + ``model.snet_width`` (training/configs/snet_boxes_cpu.json,
    ours): S-Net alone learns from jittered ground-truth boxes at its own width; L-Net is never run in
    training (its BatchNorm statistics stay at their start); training.evaluate scores the box-prompt
    path; training.export refuses the run (its L-Net is untrained); topk 0 without prompt boxes and a
    negative topk are refused."""
    from training.evaluate import main as evaluate_main
    from training.export import main as export_main

    out = snet_alone
    state = load_checkpoint(out / "checkpoints" / "last.pt")["system"]
    assert state["model.snet.encoder.conv1.weight"].shape[0] == 16 and state["model.lnet.encoder.conv1.weight"].shape[0] == 8
    counts = [v for k, v in state.items() if k.startswith("model.lnet.") and k.endswith("num_batches_tracked")]
    assert counts and all(int(v) == 0 for v in counts)
    assert {k for k in _rows(out / "history.csv")[0] if k.startswith("train_loss_")} == {"train_loss_snet"}
    assert evaluate_main([str(out), "--checkpoint", "last", "--out", str(tmp_path / "ev")]) == 0
    row = _rows(tmp_path / "ev" / "results.csv")[0]
    assert 0.0 <= float(row["box_dsc"]) <= 1.0
    capsys.readouterr()
    assert export_main([str(out), "-o", str(tmp_path / "m.safetensors"), "--which", "last"]) == 2
    assert "L-Net was never trained" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()
    for i, (extra, why) in enumerate([(["--set", "lsnet.topk=0"], "prompt boxes alone"),
                                      (["--set", "lsnet.topk=-1"], "whole number >= 0")]):
        assert main(_args("lsnet", tmp_path / f"bad{i}", cache_dir) + extra) == 2
        assert why in capsys.readouterr().err


def test_box_prompt_snets_join_an_exported_model_and_serve_only_boxes(trained, snet_alone, tmp_path, cache_dir, capsys):
    """``training.export --box-snet RUN...`` (``config.box_snet_width``, ours): the file holds the
    model's L-Net and S-Net unchanged plus one box-prompt S-Net per member; boxes go to that network
    (the same output as the box run's own S-Net), the automatic path is the model's; the entry is kept
    when the file is exported again; another patient split, another canvas and a wrong count are refused."""
    from lsnet.app.cli import main as cli_main
    from lsnet.architectures import load_model
    from lsnet.method.ensemble import LSNetEnsemble
    from lsnet.pipeline.inference import box_prompt_predict, lsnet_predict
    from training.evaluate import main as evaluate_main
    from training.export import main as export_main
    from training.methods import build_system

    plain, boxed = tmp_path / "plain.safetensors", tmp_path / "boxed.safetensors"
    joint = str(trained["lsnet"])
    assert export_main([joint, "-o", str(plain), "--which", "last", "--dtype", "float32"]) == 0
    assert export_main([joint, "-o", str(boxed), "--which", "last", "--dtype", "float32", "--box-snet", str(snet_alone)]) == 0
    m0, _ = load_model(plain)
    m1, card = load_model(boxed)
    assert m1.config.box_snet_width == 16 and card["box_prompt_snet"]["members"][0]["run"] == str(snet_alone)
    capsys.readouterr()
    assert cli_main(["info", str(boxed)]) == 0 and "box-prompt S-Net of width 16" in capsys.readouterr().out
    ck = load_checkpoint(snet_alone / "checkpoints" / "last.pt")
    alone = build_system(ck["config"])
    alone.load_state_dict(ck["system"])
    alone.eval()
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    boxes, batch = torch.tensor([[10.0, 12.0, 40.0, 44.0], [20.0, 8.0, 50.0, 30.0]]), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.allclose(box_prompt_predict(m1, x, boxes, batch), box_prompt_predict(alone.model, x, boxes, batch), atol=1e-5)
        assert not torch.allclose(box_prompt_predict(m1, x, boxes, batch), box_prompt_predict(m0, x, boxes, batch), atol=1e-3)
        assert torch.equal(lsnet_predict(m1, x)[0], lsnet_predict(m0, x)[0])
    # an ensemble gets one box S-Net per member; exporting the file again keeps them and the card entry
    ens, again = tmp_path / "ens.safetensors", tmp_path / "again.safetensors"
    assert export_main([joint, joint, "-o", str(ens), "--which", "last", "--dtype", "float32",
                        "--box-snet", str(snet_alone), str(snet_alone)]) == 0
    assert export_main([str(ens), "-o", str(again)]) == 0
    m2, card2 = load_model(again)
    assert isinstance(m2, LSNetEnsemble) and len(m2.box_snet.nets) == 2 and len(card2["box_prompt_snet"]["members"]) == 2
    # the exported file scored on the runs' held-out fold (--weights-config): slice figures are the joint
    # run's, box-prompt figures the box run's (two copies average to one)
    assert evaluate_main([str(ens), "--weights-config", str(TINY), "--weights-fold", "0", "--cache-dir", str(cache_dir),
                          "--out", str(tmp_path / "ev_file")]) == 0
    assert evaluate_main([joint, str(snet_alone), "--checkpoint", "last", "--out", str(tmp_path / "ev_runs")]) == 0
    (f,), (j, b) = _rows(tmp_path / "ev_file" / "results.csv"), _rows(tmp_path / "ev_runs" / "results.csv")
    assert abs(float(f["dsc"]) - float(j["dsc"])) < 1e-3 and abs(float(f["box_dsc"]) - float(b["box_dsc"])) < 1e-3
    other = tmp_path / "other_fold"
    assert main(_args("lsnet", other, cache_dir) + SNET_ALONE + ["--set", "data.fold=1", "--set", "train.epochs=1"]) == 0
    canvas = tmp_path / "other_canvas"
    assert main(_args("lsnet", canvas, cache_dir) + SNET_ALONE + ["--set", "model.roi_size=32", "--set", "train.epochs=1"]) == 0
    for i, (extra, why) in enumerate([([str(snet_alone), str(snet_alone)], "give one per member"),
                                      ([str(other)], "another patient split"),
                                      ([str(canvas)], "roi_size")]):
        capsys.readouterr()
        assert export_main([joint, "-o", str(tmp_path / f"bad{i}.safetensors"), "--which", "last", "--box-snet", *extra]) == 2
        assert why in capsys.readouterr().err


def test_negative_prompt_boxes_and_the_neighbour_slices_of_the_box_fp_test():
    """Negative prompts (``lsnet.prompt_negatives``, ours) sit only on pancreas-free slices and copy the
    pixels of a prompt box of the batch; the box-prompt FP test takes the pancreas-free slices within
    ``BOX_NEIGHBOUR_SLICES`` of the organ, each with its nearest slice with pancreas."""
    import numpy as np

    from training.evaluate import neighbour_slices
    from training.methods import jittered_prompt_boxes, negative_prompt_boxes

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 64, 64)
    masks[[1, 4], 20:30, 20:40] = 1
    prompts = jittered_prompt_boxes(masks, 1.0, (0.0, 2.0), 0.0, 1.0, g)
    neg = negative_prompt_boxes(masks, prompts, 1.0, g)
    assert sorted(neg[:, 0].long().tolist()) == [0, 2, 3, 5]
    assert all(any(torch.equal(n[1:], p[1:]) for p in prompts) for n in neg)
    assert len(negative_prompt_boxes(masks, prompts, 0.0, g)) == 0 and len(negative_prompt_boxes(masks, prompts[:0], 1.0, g)) == 0
    has = np.zeros(20, bool)
    has[[8, 9, 11]] = True
    assert neighbour_slices(has, 2) == ([6, 7, 10, 12, 13], [8, 8, 9, 11, 11])
    assert neighbour_slices(np.zeros(5, bool)) == ([], [])


def test_a_phase_with_no_roi_in_the_batch_makes_no_step():
    """S-Net on prompt boxes alone and a batch without pancreas: no loss, no optimiser step."""
    from training.methods import LSNetSystem
    from lsnet.config import ModelConfig

    torch.manual_seed(0)
    system = LSNetSystem(ModelConfig(width=8, roi_size=64), topk=0, prompt_boxes=1.0)
    opt = torch.optim.Adam(system.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in system.parameters()]
    assert train_iteration(system, system, opt, ["snet"], torch.rand(2, 1, 64, 64), torch.zeros(2, 64, 64), 0.1) == {}
    assert all(torch.equal(a, p) for a, p in zip(before, system.parameters())) and not opt.state


def test_fine_tuning_stage_from_a_member_of_an_exported_ensemble(trained, tmp_path, cache_dir, capsys):
    """``train.init_from`` an exported ensemble (the bundled model's form) + ``train.init_member``: the
    new run starts from that member's weights (the file's tensors as fp32); without a member,
    with one out of range, or with a held-out fold (its card does not record every member's held-out patients) it is
    refused."""
    from training.export import export

    a, b = trained["lsnet"], tmp_path / "b"
    shutil.copytree(a, b)
    with torch.no_grad():  # make member 1 differ from member 0
        state = load_checkpoint(b / "checkpoints" / "last.pt")
        state["system"] = {k: (v + 0.01 if v.is_floating_point() and "lnet" in k else v) for k, v in state["system"].items()}
        torch.save(state, b / "checkpoints" / "last.pt")
    w = export([a, b], tmp_path / "ens.safetensors", which="last", dtype="float32")
    out = tmp_path / "tune"
    args = _args("lsnet", out, cache_dir) + ["--set", f"train.init_from={w}", "--set", "data.fold=-1",
                                             "--set", 'train.freeze=["model.lnet"]', "--set", 'train.phases=["snet"]',
                                             "--set", "train.epochs=1"]
    assert main(args + ["--set", "train.init_member=1"]) == 0
    after = load_checkpoint(out / "checkpoints" / "last.pt")["system"]
    src, other = state["system"], load_checkpoint(a / "checkpoints" / "last.pt")["system"]
    lnet = [k for k in src if k.startswith("model.lnet.") and src[k].is_floating_point()]
    assert lnet and all(torch.equal(after[k], src[k]) for k in lnet)  # frozen at member 1's weights
    assert not any(torch.equal(after[k], other[k]) for k in lnet)
    # the source is recorded in the run and carried onto the card of the stage's export, also once the
    # source file is gone (e.g. a bundled model replaced by the stage's own export)
    card = json.loads(w.with_suffix(".json").read_text())
    record = json.loads((out / "init_source.json").read_text())
    assert record["sha256"] == card["sha256"] and record["member"] == 1
    assert record["member_entry"]["run"] == str(b) and record["training"]["epochs_done"] == card["training"]["epochs_done"]
    w.unlink()
    tuned = json.loads(export(out, tmp_path / "tuned.safetensors", which="last").with_suffix(".json").read_text())
    assert tuned["training"]["initialised_from"] == record and tuned["training"]["train"]["init_member"] == 1
    (out / "init_source.json").unlink()
    with pytest.raises(WeightsError, match="init_source.json is missing"):
        export(out, tmp_path / "tuned2.safetensors", which="last")
    w = export([a, b], tmp_path / "ens.safetensors", which="last", dtype="float32")
    for i, (extra, why) in enumerate([([], "pick one with"), (["--set", "train.init_member=2"], "pick one with"),
                                      (["--set", "train.init_member=0", "--set", "data.fold=0"], "does not record")]):
        capsys.readouterr()
        assert main(_args("lsnet", tmp_path / f"bad{i}", cache_dir) + args[len(_args("lsnet", out, cache_dir)):] + extra) == 2
        assert why in capsys.readouterr().err


def test_evaluate_refuses_a_missing_averaged_checkpoint(trained):
    from training.evaluate import load_run

    with pytest.raises(InputError, match="average_last"):
        load_run(trained["lsnet"], "averaged")


def test_runs_of_one_fold_evaluate_and_export_as_their_ensemble(trained, tmp_path):
    """``RUN_A+RUN_B`` in training.evaluate and several runs in training.export (lsnet.method.ensemble).
    Two copies of one run average to that run: every metric equals the single run's."""
    from lsnet.architectures import load_model
    from lsnet.method.ensemble import LSNetEnsemble
    from training.evaluate import main as evaluate_main
    from training.export import export

    a = trained["lsnet"]
    b = tmp_path / "copy"
    shutil.copytree(a, b)
    res = tmp_path / "res"
    low = ["--mask-threshold", "0.05"]  # the 1-epoch model finds no RoI yet; S-Net in a box then segments
    assert evaluate_main([str(a), f"{a}+{b}", "--out", str(res), "--checkpoint", "last"] + low) == 0
    single, ens = _rows(res / "results.csv")
    assert float(single["box_dsc"]) > 0
    assert ens["label"] == f"{a.name[:-3]}_x2_f0" and ens["checkpoint"] == "last x2" and ens["fold"] == single["fold"]
    for k in ("dsc", "box_dsc", "miou", "fp_slice_rate", "vol_dsc_pp"):
        assert float(ens[k]) == pytest.approx(float(single[k]), abs=1e-4), k
    # the volume step's fraction sweep: largest component only keeps a subset of what 0.25 keeps
    assert evaluate_main([str(a), "--out", str(tmp_path / "mf1"), "--checkpoint", "last", "--min-fraction", "1"] + low) == 0
    (largest,) = _rows(tmp_path / "mf1" / "results.csv")
    assert float(largest["min_fraction"]) == 1.0 and single["min_fraction"] == ""
    assert float(largest["vol_fp_slice_rate_pp"]) <= float(single["vol_fp_slice_rate_pp"])
    assert largest["dsc"] == single["dsc"]  # slices are scored before the volume step
    # members that held out other patients are refused (their ensemble has no honest held-out set)
    c = tmp_path / "other_fold"
    shutil.copytree(a, c)
    cfg = json.loads((c / "config.json").read_text())
    cfg["data"]["fold"] = 1
    (c / "config.json").write_text(json.dumps(cfg))
    assert evaluate_main([f"{a}+{c}", "--out", str(tmp_path / "r2"), "--checkpoint", "last"]) == 2
    # one weights file holding both members, listed on the card; a member may be an exported model
    w = export([a, b], tmp_path / "ens.safetensors", which="last")
    model, card = load_model(w)
    assert isinstance(model, LSNetEnsemble) and card["config"]["ensemble"] == 2
    assert [m["run"] for m in card["ensemble_members"]] == [str(a), str(b)]
    one = export(a, tmp_path / "one.safetensors", which="last", dtype="float32")
    model2, card2 = load_model(export([one, b], tmp_path / "ens2.safetensors", which="last", dtype="float32"))
    assert card2["ensemble_members"][0]["weights"] == "one.safetensors" and card2["ensemble_members"][1]["run"] == str(b)
    for k, v in model.state_dict().items():  # fp16 in, fp16 out: the same members
        torch.testing.assert_close(model2.state_dict()[k].to(v.dtype), v, rtol=1e-3, atol=1e-3)
    with pytest.raises(WeightsError, match="baseline"):
        export([a, trained["unet"]], tmp_path / "bad.safetensors", which="last")
    # an exported ensemble exported again with new figures (a new cv_estimate): same tensors, members kept
    again = export(w, tmp_path / "again.safetensors", extra_metrics={"cv_estimate": {"by_shift": {}}})
    model3, card3 = load_model(again)
    assert card3["ensemble_members"] == card["ensemble_members"] and card3["metrics"]["cv_estimate"] == {"by_shift": {}}
    for k, v in model.state_dict().items():
        assert torch.equal(model3.state_dict()[k], v), k
    # decision thresholds chosen by training.calibrate go on the card's config; the tensors stay
    tuned = export(w, tmp_path / "tuned.safetensors", thresholds={"mask_threshold": 0.4, "heatmap_threshold": None})
    model4, card4 = load_model(tuned)
    assert model4.config.mask_threshold == 0.4 and card4["config"]["mask_threshold"] == 0.4
    assert card4["config"]["heatmap_threshold"] == card["config"]["heatmap_threshold"] == 0.5
    assert all(torch.equal(model4.state_dict()[k], v) for k, v in model.state_dict().items())
    for bad in ({"mask_threshold": 1.0}, {"mask_threshold": 0.0}, {"box_threshold": 0.3}):
        with pytest.raises(WeightsError, match="between 0 and 1|no decision threshold"):
            export(w, tmp_path / "bad_threshold.safetensors", thresholds=bad)
    assert not (tmp_path / "bad_threshold.safetensors").exists()


def test_real_columns_score_the_patients_without_the_phantoms(trained):
    """``*_real``: the same metrics over the non-phantom cases only.  The tiny config holds phantoms
    alone, so one held-out case is relabelled as a patient's volume: its ``*_real`` figures must equal
    that case evaluated on its own, and the phantoms-only run must leave them empty."""
    from training.cache import CacheParams, SliceCache
    from training.config import model_config
    from training.evaluate import evaluate_system, evaluated_system

    cfg, system, _, _ = evaluated_system(trained["lsnet"], "last")
    system.model.config.mask_threshold = 0.05  # the 1-epoch model: S-Net in a box segments, L-Net finds little
    split = json.loads((Path(trained["lsnet"]) / "split.json").read_text())
    cache = SliceCache(Path(cfg["data"]["cache_dir"]), CacheParams.from_model_config(model_config(cfg)))
    cache.open(cache.case_ids())
    ids = [cid for cid in cache.case_ids() if cache.patient_of(cid) in split["val_patients"]]
    assert len(ids) >= 1
    cpu = torch.device("cpu")
    phantoms_only = evaluate_system(system, cache, ids, cpu)
    assert phantoms_only["slices_fg_real"] == 0 and phantoms_only.get("dsc_real") is None
    assert phantoms_only["vol_fp_slice_rate_pp_real"] is None
    cache.metas[ids[0]]["kind"] = "volume"
    mixed = evaluate_system(system, cache, ids, cpu)
    alone = evaluate_system(system, cache, ids[:1], cpu)
    assert mixed["dsc"] == pytest.approx(phantoms_only["dsc"])  # the all-cases figures do not change
    assert mixed["slices_fg_real"] == alone["slices_fg"] > 0
    for k in ("dsc", "precision", "recall", "box_dsc", "vol_dsc_pp"):
        assert mixed[f"{k}_real"] == pytest.approx(alone[k]), k


def test_evaluate_roi_zooms_override(trained, tmp_path, capsys):
    from training.evaluate import main as evaluate_main

    a = str(trained["lsnet"])
    low = ["--checkpoint", "last", "--mask-threshold", "0.05"]
    assert evaluate_main([a, "--out", str(tmp_path / "one")] + low) == 0
    assert evaluate_main([a, "--out", str(tmp_path / "two"), "--roi-zooms", "1,1"] + low) == 0
    assert evaluate_main([a, "--out", str(tmp_path / "tta"), "--roi-zooms", "0.8,1.25"] + low) == 0
    (one,), (two,), (tta,) = (_rows(tmp_path / d / "results.csv") for d in ("one", "two", "tta"))
    assert one["roi_zooms"] == "1" and two["roi_zooms"] == "1 1" and tta["roi_zooms"] == "0.8 1.25"
    assert float(two["box_dsc"]) == pytest.approx(float(one["box_dsc"]), abs=1e-6)  # (1, 1) = one RoI
    assert tta["box_dsc"] != one["box_dsc"]
    assert evaluate_main([a, "--out", str(tmp_path / "bad"), "--roi-zooms", "0,1"]) == 2
    assert "positive" in capsys.readouterr().err
    # a calibration sweep's threshold must be a probability (the same check as training.export's)
    assert evaluate_main([a, "--out", str(tmp_path / "bad_t"), "--checkpoint", "last", "--mask-threshold", "1.5"]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err


def test_markdown_summaries_over_folds_and_over_the_patients_only():
    from training.evaluate import to_markdown

    def row(fold, dsc, dsc_real):
        return {"label": f"g_f{fold}", "group": "g", "shift": "clean", "method": "lsnet", "fold": fold, "checkpoint": "last",
                "epoch": 39, "patients": 3, "slices_fg": 10, "slices_bg": 2, "dsc": dsc, "dsc_sd": 0.1, "dsc_real": dsc_real}

    md = to_markdown([row(0, 0.5, 0.6), row(1, 0.7, 0.8)])
    over_folds, over_patients = md.split("Mean +- SD over runs (folds):")[1].split("over the patients only")
    assert "| g | clean | 2 | 60.00 +- 14.14 |" in over_folds
    assert "| g | clean | 2 | 70.00 +- 14.14 |" in over_patients
