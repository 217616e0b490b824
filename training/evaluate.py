"""Evaluate trained runs (L-SNet or any baseline) the way the paper's tables report them.

    python -m training.evaluate runs/lsnet_f0 runs/lsnet_f1 runs/unet_f0 ... --out results/ [--checkpoint best|last|averaged]
        [--data datasets.json] [--device auto] [--shifts clean,res3mm,...] [NAME=RUN ...] [RUN_A+RUN_B ...]

For every run folder (made by ``training.train``) the checkpoint is loaded and evaluated on that run's
own validation patients (the fold in its ``config.json``; ``--data`` evaluates on other datasets
instead).  Slices come from the same slice cache as training, i.e. on the model's resampled canvas
(``ModelConfig.spacing`` mm; the whole field of view, no crop), so every method sees identical pixels.

Metrics (definitions in ``training/metrics.py``):

* ``dsc``, ``precision``, ``recall``: per slice with foreground, averaged over slices (Table 1);
* ``fp_slice_rate``: share of slices without foreground where something was predicted (how quiet the
  model stays on slices without pancreas; not in the paper);
* ``miou``: best IoU of the first stage's boxes with each ground-truth object, averaged over objects
  (Tables 3-4; two-stage methods only);
* ``vol_dsc``, ``hd95_mm``: per volume (cases with contiguous slices), averaged over volumes; HD95 on
  the canvas grid with its physical spacing;
* the same volumes after the engine's volume step (``lsnet/postprocess.py``, small 3-D components dropped):
  ``vol_dsc_pp``, ``hd95_pp_mm``, and ``vol_fp_slice_rate`` / ``vol_fp_slice_rate_pp`` (false-positive
  slice rate over the volumes' slices without foreground, before / after the step);
* every slice figure and the volume figures after the step again over the patients only, without the
  synthetic phantoms that a config may add to the data (columns ``*_real``): the numbers about real CT.

``RUN_A+RUN_B`` (L-SNet runs of the same fold, e.g. two seeds) evaluates their ensemble
(``lsnet.method.ensemble``: mean heatmaps, box distances and mask probabilities; ours, not the paper).

``--split train`` evaluates each run on its own training patients instead (e.g. Table 4's "mIoU in
training").

Writes ``results.md`` (a Markdown table per run and a summary per method over folds: mean +- standard
deviation across runs) and ``results.csv``; prints the Markdown.  Numbers come only from these runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lsnet.errors import InputError, LSNetError
from lsnet.method.ensemble import LSNetEnsemble

from .augment import coarser_pixels, unit_correlated_noise
from .cache import IMAGE_SCALE, CacheParams, SliceCache
from .config import model_config
from .datasets import cases_from_specs
from .methods import build_system, set_decision_thresholds
from .metrics import MeanAccumulator, object_best_ious, slice_scores, volume_scores
from .splits import split_cases
from .train import CachedCase, load_checkpoint, resolve_device

log = logging.getLogger("training.evaluate")

COLUMNS = ["label", "method", "fold", "split", "shift", "checkpoint", "epoch", "patients", "slices_fg", "slices_bg", "dsc",
           "dsc_sd", "precision", "recall", "miou", "box_dsc", "box_fp_slice_rate", "fp_slice_rate", "volumes", "vol_dsc", "hd95_mm", "vol_dsc_pp", "hd95_pp_mm",
           "vol_fp_slice_rate", "vol_fp_slice_rate_pp", "slices_fg_real", "slices_bg_real", "dsc_real", "precision_real",
           "recall_real", "miou_real", "box_dsc_real", "box_fp_slice_rate_real", "fp_slice_rate_real", "vol_dsc_pp_real", "vol_fp_slice_rate_pp_real",
           "heatmap_threshold", "mask_threshold", "min_fraction", "roi_zooms", "seconds", "run"]


def load_weights_as_run(weights: Path, config_path: str, fold: int) -> tuple:
    """An exported model (``.safetensors`` + card) as a run: ``(config, system, name)`` whose data and
    split come from ``config_path`` with ``data.fold = fold`` and whose network is the card's (one
    model, an ensemble, with or without box-prompt S-Nets), so the model a user ships is evaluated on
    the same held-out patients as the training runs."""
    from lsnet.architectures import load_model

    from .config import load_config

    model, card = load_model(weights, device="cpu")
    cfg = load_config(config_path, [f"data.fold={int(fold)}"])
    cfg["model"] = model.config.to_dict()
    cfg["method"] = model.config.architecture
    system = build_system(cfg)
    system.model = model  # the loaded network as it is (an ensemble has another layout than one system)
    return cfg, system, f"weights {card.get('sha256', '')[:8]}"


def load_run(run_dir: Path, which: str = "best") -> tuple:
    """``(config, checkpoint state)`` of a run folder; falls back to ``last.pt`` when there is no best."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise InputError(f"{run_dir} is not a training run folder (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    ck = run_dir / "checkpoints" / f"{which}.pt"
    if not ck.exists() and which == "averaged":
        raise InputError(f"{run_dir} has no {ck.name}: train with --set train.average_last=N (N > 0)")
    if not ck.exists():
        ck = run_dir / "checkpoints" / "last.pt"
    if not ck.exists():
        raise InputError(f"{run_dir} has no checkpoint (checkpoints/{which}.pt or last.pt)")
    state = load_checkpoint(ck)
    return cfg, state, ck.stem


def evaluated_system(run: "Path | tuple | list", which: str) -> tuple:
    """``(config, system with its weights loaded, checkpoint name, epoch)`` of a run folder, of an
    exported model ``(weights, config.json, fold)`` or of a list of run folders (their ensemble)."""
    if isinstance(run, list):
        return ensemble_of_runs(run, which)
    if isinstance(run, tuple):
        cfg, system, name = load_weights_as_run(*run)
        return cfg, system, name, -1
    cfg, state, ck_name = load_run(run, which)
    return cfg, loaded_system(cfg, state), ck_name, int(state["epoch"])


def loaded_system(cfg: dict, state: dict):
    """The system of ``cfg`` with the weights of the checkpoint ``state``."""
    system = build_system(cfg)
    system.load_state_dict(state["system"])
    return system


ENSEMBLE_SAME_KEYS = ("datasets", "folds", "fold", "split_seed")
"""``data`` settings every member of an evaluated ensemble must share: the same held-out patients."""


def ensemble_of_runs(run_dirs: list, which: str) -> tuple:
    """L-SNet runs of one fold (e.g. several seeds) as one system whose model is their
    :class:`~lsnet.method.ensemble.LSNetEnsemble`; refused when the runs hold out other patients,
    are not L-SNet with RR, or have other model configurations."""
    if len(run_dirs) < 2:
        raise InputError("an ensemble needs at least two run folders (RUN_A+RUN_B)")
    loaded = [load_run(Path(d), which) for d in run_dirs]
    cfg0 = loaded[0][0]
    systems = []
    for d, (cfg, state, _) in zip(run_dirs, loaded):
        if cfg["method"] != "lsnet" or cfg.get("lsnet", {}).get("roi_mode", "rr") != "rr":
            raise InputError(f"{d}: only L-SNet runs (RoI recalibration) can be evaluated as an ensemble")
        diff = [k for k in ENSEMBLE_SAME_KEYS if cfg["data"].get(k) != cfg0["data"].get(k)]
        if diff:
            raise InputError(f"{d} and {run_dirs[0]} differ in data.{', data.'.join(diff)}: an ensemble is "
                             "evaluated on the patients all of its members held out")
        systems.append(loaded_system(cfg, state))
    try:
        ensemble = LSNetEnsemble.from_models([s.model for s in systems])
    except ValueError as e:
        raise InputError(f"{' + '.join(map(str, run_dirs))}: {e}") from e
    system = systems[0]
    system.model = ensemble
    cfg = dict(cfg0, model=ensemble.config.to_dict())
    names = sorted({ck for _, _, ck in loaded})
    return cfg, system, f"{'/'.join(names)} x{len(systems)}", min(int(s["epoch"]) for _, s, _ in loaded)


SHIFTS = {
    "clean": "the held-out slices as they are",
    "res2mm": "acquired at 2 mm in-plane pixels (down- and up-sampled; no change on a canvas of >= 2 mm)",
    "res3mm": "acquired at 3 mm in-plane pixels",
    "thick5mm": "5 mm slices: mean of the slices within +-2 mm (volumes only; isolated 2-D slices unchanged)",
    "noise": "correlated low-dose noise, SD 25 HU",
    "lowdose3mm": "3 mm in-plane pixels + noise SD 25 HU (the shift test of docs/results.md)",
    "window": "another calibration: HU x 1.1 - 20",
}
"""Named input shifts of the held-out data (ours): robustness is measured on these, not hoped for."""


def apply_shift(x: torch.Tensor, shift: str, pixel_mm: float, seed: int, hu_per_unit: float = 255.0) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` windowed canvas slices in [0, 1] (``pixel_mm`` mm pixels) under ``shift``
    (:data:`SHIFTS`; ``thick5mm`` is done on the volume before this call).  Deterministic for a ``seed``."""
    def noisy(a: torch.Tensor, sd_hu: float) -> torch.Tensor:
        white = torch.randn(a.shape, generator=torch.Generator(device="cpu").manual_seed(seed)).to(a.device, a.dtype)
        n = unit_correlated_noise(white, max(0.35, 0.7 / pixel_mm))
        return (a + (sd_hu / hu_per_unit) * n).clamp(0.0, 1.0)

    if shift in ("clean", "thick5mm"):
        return x
    if shift == "res2mm":
        return coarser_pixels(x, pixel_mm, 2.0)
    if shift == "res3mm":
        return coarser_pixels(x, pixel_mm, 3.0)
    if shift == "noise":
        return noisy(x, 25.0)
    if shift == "lowdose3mm":
        return noisy(coarser_pixels(x, pixel_mm, 3.0), 25.0)
    if shift == "window":
        return (x * 1.1 - 20.0 / hu_per_unit).clamp(0.0, 1.0)
    raise InputError(f"unknown shift {shift!r}; known: {', '.join(SHIFTS)}")


def prompt_boxes_of(masks: torch.Tensor, grow_px: float) -> tuple:
    """The box-prompt test's user boxes: the tight box of each slice's foreground grown by ``grow_px``
    per side -> ``(boxes (N, 4), batch (N,))`` for the slices of ``masks`` ``(B, H, W)`` with foreground."""
    from lsnet.seeds.common import box_of_mask

    boxes, has = box_of_mask(masks)
    idx = torch.nonzero(has).flatten()
    b = boxes[idx].float()
    return torch.cat([b[:, :2] - grow_px, b[:, 2:] + grow_px], 1), idx


BOX_PROMPT_GROW_MM = 4.0
"""Box-prompt DSC: S-Net inside the ground-truth box grown by 4 mm a side (a user's loose box)."""

BOX_NEIGHBOUR_SLICES = 5
"""Box-prompt false positives: in a contiguous volume, each pancreas-free slice up to this many slices
beyond the first or last slice with pancreas gets the box-prompt test's box of the nearest slice with
pancreas (a user's box dragged over a slice range a little longer than the organ); ``box_fp_slice_rate``
is the share of those slices on which S-Net returns any mask."""


def neighbour_slices(has_fg: np.ndarray, reach: int = BOX_NEIGHBOUR_SLICES) -> tuple:
    """``(slices, nearest)``: the pancreas-free slices within ``reach`` slices of the first/last slice
    with foreground of a volume (``has_fg (K,)`` bool), and for each the nearest slice with foreground."""
    fg = np.flatnonzero(has_fg)
    if not len(fg):
        return [], []
    lo, hi = int(fg[0]), int(fg[-1])
    near = [k for k in range(max(0, lo - reach), min(len(has_fg), hi + reach + 1)) if not has_fg[k]]
    return near, [int(fg[np.argmin(np.abs(fg - k))]) for k in near]


@torch.no_grad()
def evaluate_system(system, cache: SliceCache, case_ids, device, batch_size: int = 8, amp: bool = False,
                    shift: str = "clean", min_fraction: Optional[float] = None) -> dict:
    """Metrics of ``system`` on the cached cases ``case_ids`` (whole canvases) under ``shift``;
    ``min_fraction`` overrides the volume step's ``postprocess.MIN_FRACTION`` (calibration sweep)."""
    from lsnet.method.components import components
    from lsnet.pipeline.inference import box_prompt_predict
    from lsnet.pipeline.postprocess import MIN_FRACTION, keep_large_components

    system.eval()
    in_ch = system.mc.in_channels if hasattr(system, "mc") else system.config.in_channels
    model = getattr(system, "model", None)
    box_prompt = model is not None and hasattr(model, "snet") and getattr(system, "roi_mode", "rr") == "rr"
    sp = float(cache.params.spacing)
    mask_threshold = float(getattr(getattr(model, "config", None), "mask_threshold", 0.5))  # the engine's rule
    everything, real_only = MeanAccumulator(), MeanAccumulator()
    slice_dsc = []
    per_volume = {"": [], "_pp": []}  # (real?, volume_scores) of every volume, before / after the volume step
    n_fg = n_bg = n_fg_real = n_bg_real = 0
    for ci, cid in enumerate(case_ids):
        img, lab = cache.arrays(cid)
        meta = cache.metas[cid]
        real = meta.get("kind") != "phantom"  # the *_real columns: patients only, no synthetic phantom
        accs = (everything, real_only) if real else (everything,)

        def add(name: str, values) -> None:
            for a in accs:
                a.add(name, values)
        K = img.shape[0]
        contiguous = meta["contiguous"] and K > 1
        pred_vol = np.zeros(lab.shape, dtype=np.uint8) if contiguous else None
        thick = 0
        if shift == "thick5mm" and contiguous:
            thick = max(0, int(round(2.0 / (meta["spacing"][2] or 1.0))))

        def plane(k: int) -> np.ndarray:  # slice k, or the mean over +-thick slices (the thick5mm shift)
            if not thick:
                return np.asarray(img[k], np.float32)
            lo, hi = max(0, k - thick), min(K, k + thick + 1)
            return np.asarray(img[lo:hi], np.float32).mean(0)

        def inputs(ks: list, seed: int) -> torch.Tensor:  # (len(ks), C, H, W) network input of slices ks
            if in_ch == 1:
                x = np.stack([plane(k) for k in ks])[:, None]
            else:
                nb = [meta["slices"][k]["nb"] for k in ks]
                x = np.stack([np.stack([plane(a), plane(k), plane(b)]) for k, (a, b) in zip(ks, nb)])
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device) * (1.0 / IMAGE_SCALE)
            return apply_shift(xt, shift, sp, seed=seed)

        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else torch.autocast(device.type, enabled=False)
        for k0 in range(0, K, batch_size):
            ks = list(range(k0, min(K, k0 + batch_size)))
            xt = inputs(ks, ci * 100003 + k0)
            mt = torch.from_numpy(np.array(lab[k0 : ks[-1] + 1])).to(device) > 0
            with ctx:
                out = system.predict(xt)
            pred = out["prob"].float() > mask_threshold
            s = slice_scores(pred, mt)
            add("dsc", s["dsc"])
            slice_dsc.extend(v for v in s["dsc"].tolist() if not math.isnan(v))
            add("precision", s["precision"])
            add("recall", s["recall"])
            add("fp_slice_rate", s["pred_any"][~s["gt_any"]].float())
            fg, bg = int(s["gt_any"].sum()), int((~s["gt_any"]).sum())
            n_fg, n_bg = n_fg + fg, n_bg + bg
            if real:
                n_fg_real, n_bg_real = n_fg_real + fg, n_bg_real + bg
            if "boxes" in out:
                comp = components(mt)
                add("miou", object_best_ious(comp.boxes, comp.batch, out["boxes"], out["box_batch"]))
            if box_prompt and bool(s["gt_any"].any()):
                boxes, bidx = prompt_boxes_of(mt, BOX_PROMPT_GROW_MM / sp)
                with ctx:
                    pb = box_prompt_predict(model, xt, boxes, bidx) > mask_threshold
                add("box_dsc", slice_scores(pb, mt)["dsc"])
            if pred_vol is not None:
                pred_vol[k0 : ks[-1] + 1] = pred.cpu().numpy()
        if box_prompt and contiguous:  # boxes on the pancreas-free slices next to the organ
            near, nearest = neighbour_slices(np.asarray(lab).reshape(K, -1).any(1))
            for j0 in range(0, len(near), batch_size):
                ks, src = near[j0 : j0 + batch_size], nearest[j0 : j0 + batch_size]
                xt = inputs(ks, ci * 100003 + 50021 + j0)
                boxes, _ = prompt_boxes_of(torch.from_numpy(np.array(lab[src])).to(device) > 0, BOX_PROMPT_GROW_MM / sp)
                with ctx:
                    pb = box_prompt_predict(model, xt, boxes, torch.arange(len(ks), device=device)) > mask_threshold
                add("box_fp_slice_rate", pb.flatten(1).any(1).float())
        if pred_vol is not None:
            sz = meta["spacing"][2] or 1.0
            gt = np.asarray(lab) > 0
            stepped = pred_vol.copy()
            keep_large_components(stepped, MIN_FRACTION if min_fraction is None else float(min_fraction))
            per_volume[""].append((real, volume_scores(pred_vol, gt, (sz, sp, sp))))
            per_volume["_pp"].append((real, volume_scores(stepped, gt, (sz, sp, sp))))
    r = everything.result()
    r.update({f"{k}_real": v for k, v in real_only.result().items()})
    r["dsc_sd"] = float(np.std(slice_dsc, ddof=1)) if len(slice_dsc) > 1 else None
    r["slices_fg"], r["slices_bg"] = n_fg, n_bg
    r["slices_fg_real"], r["slices_bg_real"] = n_fg_real, n_bg_real
    r["volumes"] = len(per_volume[""])
    r["shift"] = shift
    for suffix, tagged in per_volume.items():  # means over volumes; FP-slice rate over all their slices
        for tail, scores in (("", [v for _, v in tagged]), ("_real", [v for real, v in tagged if real])):
            for key, name in (("vol_dsc", f"vol_dsc{suffix}"), ("hd95_mm", f"hd95{suffix}_mm")):
                values = [s[key] for s in scores]
                r[name + tail] = float(np.nanmean(values)) if values and not np.all(np.isnan(values)) else None
            bg = sum(s["bg_slices"] for s in scores)
            r[f"vol_fp_slice_rate{suffix}{tail}"] = sum(s["fp_slices"] for s in scores) / bg if bg else None
    return r


def evaluate_run(run_dir: Path, which: str, device: torch.device, data_specs: Optional[list], batch_size: int,
                 cache_dir: Optional[str], amp: bool, split: str = "val", shifts: tuple = ("clean",),
                 thresholds: Optional[dict] = None, min_fraction: Optional[float] = None,
                 roi_zooms: Optional[tuple] = None) -> list:
    """One row of metrics per shift (:data:`SHIFTS`) for the run's checkpoint; ``thresholds`` overrides
    the model's decision thresholds (``heatmap_threshold``, ``mask_threshold``) and ``min_fraction``
    the volume step's component fraction, for a calibration sweep; ``roi_zooms`` the S-Net test-time
    zooms (``ModelConfig.roi_zooms``).
    ``run_dir`` may also be ``(weights.safetensors, config.json, fold)`` (:func:`load_weights_as_run`)
    or a list of run folders of one fold, evaluated as their ensemble (:func:`ensemble_of_runs`)."""
    cfg, system, ck_name, epoch = evaluated_system(run_dir, which)
    system.to(device)
    mc = model_config(cfg)
    model = getattr(system, "model", None)
    set_decision_thresholds(model, thresholds, InputError, f"{run_dir}: {cfg['method']}")
    if roi_zooms is not None:
        if model is None or not hasattr(model.config, "roi_zooms"):
            raise InputError(f"{run_dir}: {cfg['method']} has no S-Net RoIs to zoom")
        model.config.roi_zooms = tuple(float(z) for z in roi_zooms)
    cache = SliceCache(Path(cache_dir or cfg["data"]["cache_dir"]), CacheParams.from_model_config(mc))
    if data_specs is not None:
        eval_cases = cases_from_specs(data_specs)
        cache.build(eval_cases, progress=sys.stderr.isatty())
    else:
        fold = int(cfg["data"]["fold"])
        if fold < 0:
            raise InputError(f"{run_dir} was trained on all data (data.fold = -1): pass --data to evaluate it")
        if cfg["data"].get("from_cache"):
            extra = {c.case_id for c in cases_from_specs(cfg["data"].get("extra_train_datasets") or [])}
            ids = [cid for cid in cache.case_ids(include_phantoms=False) if cid not in extra]
            cache.open(ids)
            pool = [CachedCase(cid, cache.patient_of(cid)) for cid in ids]
        else:
            pool = cases_from_specs(cfg["data"]["datasets"])
            cache.build(pool, progress=sys.stderr.isatty())
        train_cases, eval_cases = split_cases(pool, fold, int(cfg["data"]["folds"]), int(cfg["data"]["split_seed"]))
        if split == "train":
            eval_cases = train_cases
        cache.open([c.case_id for c in eval_cases])
    rows = []
    for shift in shifts:
        t0 = time.perf_counter()
        r = evaluate_system(system, cache, [c.case_id for c in eval_cases], device, batch_size, amp, shift, min_fraction)
        r.update({
            "method": cfg["method"], "fold": cfg["data"]["fold"], "checkpoint": ck_name, "epoch": epoch,
            "patients": len({c.patient_id for c in eval_cases}), "seconds": round(time.perf_counter() - t0, 1),
            "split": split if data_specs is None else "data",
            "heatmap_threshold": getattr(getattr(model, "config", None), "heatmap_threshold", None),
            "mask_threshold": getattr(getattr(model, "config", None), "mask_threshold", None),
            "min_fraction": min_fraction,
            "roi_zooms": " ".join(f"{z:g}" for z in getattr(getattr(model, "config", None), "roi_zooms", ())) or None,
        })
        rows.append(r)
    return rows


def write_results(out: Path, stem: str, markdown: str, rows: list, columns: list) -> str:
    """Write ``out/stem.md`` and ``out/stem.csv`` (``columns``; None -> empty cell); returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return markdown


def group_of(label: str) -> str:
    """Run group of an evaluate label: ``cv_lsnet_f2`` -> ``cv_lsnet`` (fold suffix removed)."""
    head, _, tail = label.rpartition("_f")
    return head if head and tail.isdigit() else label


def _fmt(v, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if pct else f"{v:.2f}"
    return str(v)


def to_markdown(rows: list) -> str:
    head = ["run", "shift", "method", "fold", "ckpt (epoch)", "patients", "fg / bg slices", "DSC %", "Precision %",
            "Recall %", "mIoU %", "box-prompt DSC %", "box-prompt FP-slice %", "FP-slice %", "volumes", "vol DSC %", "HD95 mm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["label"], r.get("shift", "clean"), r["method"], str(r["fold"]), f"{r['checkpoint']} ({r['epoch']})", str(r["patients"]),
            f"{r['slices_fg']} / {r['slices_bg']}", f"{_fmt(r.get('dsc'))} +- {_fmt(r.get('dsc_sd'))}", _fmt(r.get("precision")), _fmt(r.get("recall")),
            _fmt(r.get("miou")), _fmt(r.get("box_dsc")), _fmt(r.get("box_fp_slice_rate")), _fmt(r.get("fp_slice_rate")),
            str(r.get("volumes", 0)), _fmt(r.get("vol_dsc")),
            _fmt(r.get("hd95_mm"), pct=False)]) + " |")
    # summary over folds per label prefix (run label without a trailing "_fN")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["group"], r.get("shift", "clean")), []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        for title, suffix in (("Mean +- SD over runs (folds):", ""),
                              ("The same over the patients only (no synthetic phantom among the held-out cases):", "_real")):
            lines += ["", title, "",
                      "| method | shift | runs | DSC % | Precision % | Recall % | mIoU % | box-prompt DSC % | box-prompt FP-slice % | "
                      "FP-slice % | volume FP-slice % after the volume step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for (name, shift), g in groups.items():
                cells = []
                for k in ("dsc", "precision", "recall", "miou", "box_dsc", "box_fp_slice_rate", "fp_slice_rate", "vol_fp_slice_rate_pp"):
                    v = [x[k + suffix] for x in g if x.get(k + suffix) is not None]
                    cells.append(f"{100 * np.mean(v):.2f} +- {100 * np.std(v, ddof=1) if len(v) > 1 else 0:.2f}" if v else "-")
                lines.append(f"| {name} | {shift} | {len(g)} | " + " | ".join(cells) + " |")
    vol_rows = [r for r in rows if r.get("volumes")]
    if vol_rows:
        lines += ["", "Volumes, before -> after the volume step (lsnet/pipeline/postprocess.py: small 3-D components dropped):", "",
                  "| run | shift | volumes | vol DSC % | HD95 mm | FP-slice % (volume slices without foreground) |",
                  "|---|---|---|---|---|---|"]
        for r in vol_rows:
            lines.append(f"| {r['label']} | {r.get('shift', 'clean')} | {r['volumes']} | {_fmt(r.get('vol_dsc'))} -> {_fmt(r.get('vol_dsc_pp'))} | "
                         f"{_fmt(r.get('hd95_mm'), pct=False)} -> {_fmt(r.get('hd95_pp_mm'), pct=False)} | "
                         f"{_fmt(r.get('vol_fp_slice_rate'))} -> {_fmt(r.get('vol_fp_slice_rate_pp'))} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders written by training.train (LABEL=DIR to name one; "
                    "DIR_A+DIR_B+... = the ensemble of several L-SNet runs of one fold, e.g. two seeds)")
    ap.add_argument("--out", required=True, help="folder for results.md and results.csv")
    ap.add_argument("--checkpoint", default="best", choices=["best", "last", "averaged"])
    ap.add_argument("--data", help="JSON list of dataset specs to evaluate on instead of each run's validation fold")
    ap.add_argument("--cache-dir", help="slice cache to use (default: the run's data.cache_dir)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--shifts", default="clean", help="comma-separated input shifts to evaluate under: "
                    + ", ".join(f"{k} ({v})" for k, v in SHIFTS.items()) + "; 'all' = every one")
    ap.add_argument("--weights-config", help="with a .safetensors among the runs: the training config whose data "
                    "and split to evaluate it on (e.g. training/configs/bundled_cpu.json)")
    ap.add_argument("--weights-fold", type=int, default=0, help="with a .safetensors: the held-out fold (default 0)")
    ap.add_argument("--heatmap-threshold", type=float, help="override the L-Net heatmap threshold (calibration sweep)")
    ap.add_argument("--mask-threshold", type=float, help="override the S-Net mask threshold (calibration sweep)")
    ap.add_argument("--min-fraction", type=float, help="override the volume step's component fraction "
                    "(lsnet/pipeline/postprocess.py MIN_FRACTION; 1 = largest component only; calibration sweep)")
    ap.add_argument("--roi-zooms", help="comma-separated S-Net test-time zoom factors, e.g. 0.9,1,1.1 "
                    "(ModelConfig.roi_zooms; overrides the model's)")
    ap.add_argument("--split", default="val", choices=["val", "train"],
                    help="evaluate on each run's validation patients (default) or on its training patients")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        device = resolve_device(args.device, 0)
        specs = json.loads(Path(args.data).read_text()) if args.data else None
        shifts = tuple(SHIFTS) if args.shifts == "all" else tuple(s.strip() for s in args.shifts.split(",") if s.strip())
        bad = [s for s in shifts if s not in SHIFTS]
        if bad:
            raise InputError(f"unknown shift(s) {', '.join(bad)}; known: {', '.join(SHIFTS)}")
        zooms = None
        if args.roi_zooms:
            try:
                zooms = tuple(float(z) for z in args.roi_zooms.split(",") if z.strip())
            except ValueError:
                raise InputError(f"--roi-zooms wants numbers like 0.9,1,1.1, not {args.roi_zooms!r}") from None
            if not zooms or min(zooms) <= 0:
                raise InputError(f"--roi-zooms wants positive factors, not {args.roi_zooms!r}")
        rows = []
        for item in args.runs:
            label, _, d = item.rpartition("=") if "=" in item else ("", "", item)
            run_dir = Path(d)
            label = label or run_dir.name
            if "+" in d:  # RUN_A+RUN_B+...: the ensemble of these runs of one fold
                run_dir = [Path(p) for p in d.split("+")]
                if "=" not in item:  # cv_s0_f2+cv_s1_f2 -> cv_s0_x2_f2 (grouped over folds as cv_s0_x2)
                    first = run_dir[0].name
                    group = group_of(first)
                    label = f"{group}_x{len(run_dir)}{first[len(group):]}"
            elif run_dir.suffix == ".safetensors":
                if not args.weights_config:
                    raise InputError(f"{run_dir}: pass --weights-config (the data and split to evaluate the weights on)")
                run_dir = (run_dir, args.weights_config, args.weights_fold)
            thresholds = {"heatmap_threshold": args.heatmap_threshold, "mask_threshold": args.mask_threshold}
            for r in evaluate_run(run_dir, args.checkpoint, device, specs, args.batch_size, args.cache_dir, args.amp,
                                  args.split, shifts, thresholds, args.min_fraction, zooms):
                r["label"] = label
                r["run"] = str(d)
                r["group"] = group_of(label)
                rows.append(r)
                log.info("%s [%s]: %s", label, r["shift"],
                         {k: r.get(k) for k in ("dsc", "precision", "recall", "miou", "box_dsc", "fp_slice_rate")})
        print(write_results(Path(args.out), "results", to_markdown(rows), rows, COLUMNS))
    except LSNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
