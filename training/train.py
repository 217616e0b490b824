"""Train L-SNet or a baseline of the paper's tables.

    python -m training.train --config training/configs/lsnet_paper.json --out runs/lsnet_f0 \
        [--set train.epochs=10 --set data.fold=1 ...] [--no-resume]

Multi-GPU / multi-node (DistributedDataParallel; one process per GPU; the NCCL backend on CUDA, gloo
on CPU)::

    torchrun --nproc_per_node=4 -m training.train --config ... --out runs/x
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 \
        -m training.train --config ... --out runs/x

``train.batch_size`` is per process.  Rank 0 builds the slice cache (the others wait), validates,
writes checkpoints, logs and plots.

Several runs (folds, ablations) can share one GPU and one cache folder: start one process per run,
each with its own ``--out`` (cache builds take a lock).  On a machine without the source data, train
from a packed cache (``python -m training.cache pack``) with ``--set data.from_cache=true``.
Extra training data that is never validated on: ``--phantoms N`` (synthetic CTs).

One L-SNet iteration (paper section 2.5): (1) Adam step on L_L-Net (Eq. 5; only L-Net has gradients);
(2) an RoI per slice from a keypoint drawn at random among the top-3 heatmap peaks with its regressed
box, RR, S-Net, Adam step on L_S-Net (Eq. 6) over S-Net and L-Net, L-Net's gradient decayed by gamma.
A single Adam holds all parameters: Adam normalises each parameter's step by its gradient history, so
with separate optimisers the gamma factor would cancel out; with one, L-Net's second moment is set by
its own loss and gamma really scales S-Net's supervision.  With gamma = 0 L-Net gets no update at all
in step (2) (its gradients are dropped, not zeroed, so Adam momentum does not move it either).

Outputs in ``--out``: ``config.json`` (resolved), ``history.csv`` (one row per epoch), ``iters.csv``
(training losses every ``log_every`` iterations), ``curves.png``, ``summary.json`` (last and best
epoch with validation slice DSC / precision / recall / L-Net box mIoU, written at the end),
``checkpoints/last.pt`` (every
epoch; the run resumes from it), ``checkpoints/best.pt`` (best validation slice DSC), ``split.json``,
``init_source.json`` (with ``train.init_from``: the source of the starting weights).
With ``train.average_last N`` (ours, not in the paper; 0 = off) also ``checkpoints/averaged.pt``: the
uniform mean of the weights after each of the last N epochs (stochastic weight averaging, Izmailov et
al. 2018, at the schedule's final learning rate), its BatchNorm statistics recomputed on one pass over
the training batches (:func:`recalibrate_batchnorm`); the running mean is kept in ``last.pt``, so a
resumed run averages the same epochs.
A fine-tuning stage (ours): ``train.init_from`` starts a new run from a finished one's weights (same
architecture and patient split, both checked), ``train.freeze`` keeps named sub-modules fixed (weights and
BatchNorm statistics) and ``train.phases`` runs a subset of the steps, e.g. S-Net alone on box prompts
(``training/configs/boxtune_cpu.json``).
Checkpoints are ordinary PyTorch files for resuming; ``training/export.py`` turns one into the
engine's safetensors + model card.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from lsnet.architectures import load_model
from lsnet.errors import DeviceError, InputError, LSNetError
from lsnet.method.ensemble import LSNetEnsemble, member_config

from .augment import AugmentConfig, augment_batch
from .cache import CacheParams, SliceCache
from .config import INIT_SOURCE_FILE, add_phantoms, load_config, model_config
from .datasets import cases_from_specs
from .methods import build_system, training_phases
from .metrics import MeanAccumulator, object_best_ious, slice_scores
from .plots import plot_curves
from .slices import EpochSampler, SliceDataset
from .splits import split_cases

log = logging.getLogger("training")

CHECKPOINT_FORMAT = "lsnet-train-checkpoint/1"


# ------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------
class Dist:
    """Process-group facts (a single process when not launched by torchrun)."""

    def __init__(self, device_kind: str):
        self.enabled = "WORLD_SIZE" in os.environ and "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("train.device is 'cuda' but PyTorch sees no CUDA GPU; use --set train.device=cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated file
        raise InputError(f"cannot read checkpoint {path} ({e}); delete it to start over or pass --no-resume") from e
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a training checkpoint of this project")
    return state


def _same_weights_layout(a: dict, b: dict) -> bool:
    """Whether a system built from config ``a`` has the parameters of one built from ``b`` (the
    training-only ``lsnet`` settings, such as prompt boxes, may differ)."""
    return a["method"] == b["method"] and a["model"] == b["model"] and a["baseline"] == b["baseline"]


def _same_architecture(a: dict, b: dict) -> bool:
    """Whether a run of config ``b`` may resume one of ``a``: same weights and same ``lsnet`` settings."""
    return _same_weights_layout(a, b) and a["lsnet"] == b["lsnet"]


def initial_weights(cfg: dict) -> tuple:
    """The ``system`` state dict that ``train.init_from`` names (a training checkpoint ``.pt``, a run
    folder whose ``checkpoints/last.pt`` is taken, or an exported ``.safetensors`` model), checked to fit
    ``cfg`` (architecture, and for a run its patient split), and the record of that source for
    :data:`INIT_SOURCE_FILE`; ``(None, None)`` when unset.

    The record of an exported model: its file name, sha256, card name, the member taken and the card's
    entry for it, the card's training section (an ensemble card's is its first member's recipe); of a
    run: the checkpoint, its epoch and its ``train`` settings (and that run's own record, if it was a stage too)."""
    src = cfg["train"].get("init_from")
    if not src:
        return None, None
    path = Path(src)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise InputError(f"train.init_from: {path} does not exist (give a run folder with checkpoints/last.pt, "
                         "a checkpoint file or an exported .safetensors model)")
    if path.suffix == ".safetensors":
        return _weights_file_state(path, cfg)
    if cfg["train"].get("init_member") is not None:
        raise InputError("train.init_member picks a member of an exported ensemble (.safetensors), not of a run")
    state = load_checkpoint(path)
    if not _same_weights_layout(state["config"], cfg):
        raise InputError(f"train.init_from: {path} was trained with another method/model configuration "
                         f"({state['config']['method']}, model {state['config']['model']}); the new run must "
                         "use the same 'method', 'model' and 'baseline' sections")
    split_keys = ("datasets", "extra_train_datasets", "from_cache", "folds", "fold", "split_seed")
    differ = [k for k in split_keys if state["config"]["data"].get(k) != cfg["data"].get(k)]
    if differ:
        raise InputError(f"train.init_from: {path} was trained on another patient split (data.{', data.'.join(differ)} "
                         "differ); starting from it would put patients the source trained on among this run's "
                         "held-out ones - use the source's data settings (e.g. the same --fold)")
    log.info("weights initialised from %s (epoch %d of that run)", path, int(state["epoch"]))
    record = {"run": str(src), "checkpoint": str(path), "epoch": int(state["epoch"]),
              "train": state["config"]["train"]}
    earlier = path.parent.parent / INIT_SOURCE_FILE  # the source was itself a stage: keep the chain
    if earlier.is_file():
        record["initialised_from"] = json.loads(earlier.read_text())
    return state["system"], record


def _weights_file_state(path: Path, cfg: dict) -> tuple:
    """The ``system`` state dict of an exported L-SNet (one member of an ensemble file: ``train.init_member``)
    and the record of the file (:func:`initial_weights`)."""
    if cfg["method"] != "lsnet":
        raise InputError(f"train.init_from: exported models start L-SNet runs only, not method {cfg['method']!r}")
    if int(cfg["data"]["fold"]) != -1:
        raise InputError(f"train.init_from: {path} is an exported model, whose card does not record the held-out "
                         "patients of every member, so a run started from it cannot be validated on a held-out "
                         "fold; use --set data.fold=-1 "
                         "(all data), or start from a run folder of the same fold")
    model, card = load_model(path)
    member = cfg["train"].get("init_member")
    if isinstance(model, LSNetEnsemble):
        n = model.config.ensemble
        if member is None or not 0 <= int(member) < n:
            raise InputError(f"train.init_from: {path} is an ensemble of {n} models; pick one with "
                             f"--set train.init_member=I (0..{n - 1})")
        nets = {"lnet": model.lnet.nets[int(member)], "snet": model.snet.nets[int(member)]}
        mc = member_config(model.config)
    elif member is not None:
        raise InputError(f"train.init_member: {path} holds one model, not an ensemble")
    else:
        nets, mc = {"lnet": model.lnet, "snet": model.snet}, model.config
    want = model_config(cfg)
    arch = [k for k, v in want.to_dict().items()
            if k not in ("heatmap_threshold", "mask_threshold", "roi_zooms", "box_snet_width") and mc.to_dict().get(k) != v]
    if arch:
        raise InputError(f"train.init_from: {path} has another model configuration ({', '.join(arch)} differ from "
                         "the 'model' section); use the configuration it was trained with")
    log.info("weights initialised from %s%s", path, "" if member is None else f" (member {member})")
    members = card.get("ensemble_members") or []
    record = {"weights": path.name, "sha256": card.get("sha256"), "name": card.get("name"),
              "exported": card.get("exported"), "member": None if member is None else int(member),
              "member_entry": members[int(member)] if member is not None and int(member) < len(members) else None,
              "training": card.get("training")}
    return {f"model.{part}.{k}": v for part, net in nets.items() for k, v in net.state_dict().items()}, record


def frozen_modules(system: nn.Module, names: list) -> list:
    """The sub-modules ``train.freeze`` names, their parameters set to ``requires_grad=False``."""
    out = []
    for name in names:
        try:
            mod = system.get_submodule(name)
        except AttributeError as e:
            children = sorted(n for n, _ in system.named_modules() if n and n.count(".") < 2)
            raise InputError(f"train.freeze: the system has no sub-module {name!r}; some it has: {children}") from e
        for p in mod.parameters():
            p.requires_grad_(False)
        out.append(mod)
    return out


def train_mode(system: nn.Module, frozen=()) -> None:
    """``system.train()`` with the ``frozen`` sub-modules (an iterable of modules) left in eval mode (fixed
    BatchNorm statistics)."""
    system.train()
    for mod in frozen:
        mod.eval()


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
class CachedCase:
    """A case known only from the cache index (``data.from_cache``): ids, no sources."""

    def __init__(self, case_id: str, patient_id: str):
        self.case_id, self.patient_id = case_id, patient_id


def prepare_data(cfg: dict, out: Path, dd: Dist) -> tuple:
    """Cases -> patient-level split -> cache (built by rank 0 under a lock) -> train/val datasets.

    ``data.extra_train_datasets`` cases join every training split and are never validated on.  With
    ``data.from_cache`` the split pool is every cached case that is not an extra one, read from the
    cache index alone (the sources need not exist on this machine).
    """
    mc = model_config(cfg)
    dcfg = cfg["data"]
    cache = SliceCache(Path(dcfg["cache_dir"]), CacheParams.from_model_config(mc))
    extra = cases_from_specs(dcfg["extra_train_datasets"]) if dcfg["extra_train_datasets"] else []
    extra_ids = {c.case_id for c in extra}
    if dcfg["from_cache"]:
        if dd.main and extra:
            cache.build(extra, progress=False)  # phantoms need no sources; real extras must be cached
        dd.barrier()
        ids = [cid for cid in cache.case_ids(include_phantoms=False) if cid not in extra_ids]
        cache.open(ids + [c.case_id for c in extra])
        pool = [CachedCase(cid, cache.patient_of(cid)) for cid in ids]
    else:
        pool = cases_from_specs(dcfg["datasets"])
        if extra_ids & {c.case_id for c in pool}:
            raise InputError("a case appears both in data.datasets and data.extra_train_datasets")
        if dd.main:
            cache.build(pool + extra, workers=int(dcfg["cache_workers"]), progress=sys.stderr.isatty())
        dd.barrier()
        if not dd.main:
            cache.open([c.case_id for c in pool + extra])
    if int(dcfg["fold"]) >= 0:
        train_cases, val_cases = split_cases(pool, int(dcfg["fold"]), int(dcfg["folds"]), int(dcfg["split_seed"]))
    else:
        train_cases, val_cases = list(pool), []
    train_cases = list(train_cases) + list(extra)
    if dd.main:
        (out / "split.json").write_text(json.dumps({
            "fold": dcfg["fold"], "folds": dcfg["folds"], "seed": dcfg["split_seed"],
            "train_patients": sorted({c.patient_id for c in train_cases}),
            "val_patients": sorted({c.patient_id for c in val_cases}),
            "train_cases": len(train_cases), "val_cases": len(val_cases), "extra_train_cases": len(extra)}, indent=1))
    crop_px = int(dcfg["crop"]) * int(mc.roi_source_factor)  # data.crop is in L-Net pixels
    crop = (crop_px, crop_px)
    seed = int(cfg["train"]["seed"])
    train_ds = SliceDataset(cache, [c.case_id for c in train_cases], crop, mc.in_channels, train=True, seed=seed)
    val_ds = SliceDataset(cache, [c.case_id for c in val_cases], crop, mc.in_channels, train=False) if val_cases else None
    return train_ds, val_ds


def make_loaders(cfg: dict, train_ds, val_ds, dd: Dist, device: torch.device) -> tuple:
    dcfg, tcfg = cfg["data"], cfg["train"]
    bs = int(tcfg["batch_size"])
    if not train_ds.has_fg().any():
        raise InputError("the training split has no slice with foreground; check the datasets and label values")
    sampler = EpochSampler(train_ds.has_fg(), float(dcfg["negative_fraction"]), True, int(tcfg["seed"]),
                           dd.rank, dd.world, dcfg["max_train_slices"], tag_epoch=True)
    nw = int(dcfg["workers"])
    kw = dict(num_workers=nw, pin_memory=device.type == "cuda", persistent_workers=nw > 0)
    train_loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, drop_last=len(sampler) >= bs, **kw)
    val_loader = None
    if val_ds is not None and len(val_ds):
        vs = EpochSampler(val_ds.has_fg(), float(dcfg["negative_fraction"]), True, 12345, 0, 1, dcfg["max_val_slices"])  # fixed subset
        val_loader = DataLoader(val_ds, batch_size=bs, sampler=vs, **kw)
    return train_loader, sampler, val_loader


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(system, loader, device, autocast, cfg: dict) -> dict:
    """Slice DSC/precision/recall on foreground slices, false-positive slice rate on background slices,
    mIoU of the first stage's boxes (two-stage systems) and the training losses on the val slices."""
    from lsnet.method.components import components

    was_training = system.training
    system.eval()
    acc = MeanAccumulator()
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        m = batch["mask"].to(device, non_blocking=True)
        with autocast():
            out = system.predict(x)
        pred = out["prob"].float() > 0.5
        s = slice_scores(pred, m > 0.5)
        acc.add("val_dsc", s["dsc"])
        acc.add("val_precision", s["precision"])
        acc.add("val_recall", s["recall"])
        acc.add("val_fp_slice_rate", s["pred_any"][~s["gt_any"]].float())
        if "boxes" in out:
            comp = components(m > 0.5)
            acc.add("val_miou", object_best_ious(comp.boxes, comp.batch, out["boxes"], out["box_batch"]))
        with autocast():
            for mode in training_phases(cfg):
                loss = system(mode, x, m)["loss"]
                if loss is not None:
                    acc.add(f"val_loss_{mode}", float(loss.float()))
    system.train(was_training)
    return {k: v for k, v in acc.result().items()}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def run(cfg: dict, out: Path, resume: bool = True) -> dict:
    """Train according to ``cfg`` into ``out``; returns the last history row."""
    tcfg = cfg["train"]
    device_kind = "cuda" if (tcfg["device"].startswith("cuda") or (tcfg["device"] == "auto" and torch.cuda.is_available())) else "cpu"
    dd = Dist(device_kind)
    try:
        return _run(cfg, out, resume, dd)
    finally:
        dd.close()


def _run(cfg: dict, out: Path, resume: bool, dd: Dist) -> dict:
    tcfg = cfg["train"]
    device = resolve_device(tcfg["device"], dd.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoints" / "last.pt"
    state = None
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if not _same_architecture(state["config"], cfg):
            raise InputError(f"{out} holds a run with a different method/model configuration; choose another --out or pass --no-resume")
    seed_everything(int(tcfg["seed"]) + dd.rank)
    if dd.main:
        (out / "config.json").write_text(json.dumps(cfg, indent=1))

    train_ds, val_ds = prepare_data(cfg, out, dd)
    train_loader, sampler, val_loader = make_loaders(cfg, train_ds, val_ds, dd, device)

    system = build_system(cfg).to(device)
    if state is None:
        init, source = initial_weights(cfg)
        if init is not None:
            system.load_state_dict(init)
            if dd.main:
                (out / INIT_SOURCE_FILE).write_text(json.dumps(source, indent=1))
    frozen = frozen_modules(system, cfg["train"]["freeze"])
    params = [p for p in system.parameters() if p.requires_grad]
    if not params:
        raise InputError("train.freeze leaves no parameter to train")
    opt = torch.optim.Adam(params, lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(tcfg["lr_step"]), gamma=float(tcfg["lr_decay"]))
    gen = torch.Generator(device=device)
    gen.manual_seed(int(tcfg["seed"]) * 1000 + dd.rank)
    history: list = []
    start_epoch = 0
    epochs = int(tcfg["epochs"])
    average_from = max(0, epochs - int(tcfg["average_last"])) if int(tcfg["average_last"]) > 0 else None
    averaged: Optional[WeightAverage] = None
    if state is not None:
        system.load_state_dict(state["system"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        if state.get("average") is not None:
            averaged = WeightAverage.from_state(state["average"])
        try:
            gen.set_state(state["aug_rng"][min(dd.rank, len(state["aug_rng"]) - 1)].to(gen.get_state().device))
        except (KeyError, RuntimeError, IndexError):
            pass
        if dd.main:
            log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    ddp = system
    if dd.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            system, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    amp = tcfg["amp"] == "bf16" or (tcfg["amp"] == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext
    aug = AugmentConfig.from_dict(cfg["augment"])
    pixel_mm = float(CacheParams.from_model_config(model_config(cfg)).spacing)  # of the training crops
    phases = training_phases(cfg)
    gamma = float(cfg["model"]["gamma"])
    max_iters = tcfg["max_iters"]
    log_every = max(1, int(tcfg["log_every"]))
    iters_csv = out / "iters.csv"

    last_row: dict = history[-1] if history else {}
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        train_mode(system, frozen)
        acc = MeanAccumulator()
        n_iter = 0
        for batch in train_loader:
            if max_iters is not None and n_iter >= int(max_iters):
                break
            x = batch["image"].to(device, non_blocking=True)
            m = batch["mask"].to(device, non_blocking=True)
            x, m = augment_batch(x, m, aug, gen, pixel_mm)
            row = train_iteration(ddp, system, opt, phases, x, m, gamma, autocast)
            for k, v in row.items():
                acc.add(k, v)
            n_iter += 1
            if dd.main and n_iter % log_every == 0:
                _append_csv(iters_csv, {"epoch": epoch, "iter": n_iter, "lr": opt.param_groups[0]["lr"], **row})
                log.info("epoch %d iter %d %s", epoch, n_iter, " ".join(f"{k}={v:.4f}" for k, v in row.items()))
        sched.step()
        train_time = time.perf_counter() - t0
        result = acc.result()
        if dd.enabled:  # average the epoch's training losses over ranks
            keys = sorted(result)
            t = torch.tensor([result[k] if result[k] is not None else 0.0 for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            result = {k: float(v) / dd.world for k, v in zip(keys, t.tolist())}
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "iters": n_iter, "train_s": round(train_time, 2),
               **{f"train_{k}": v for k, v in result.items()}}
        if average_from is not None and epoch >= average_from:
            averaged = (averaged or WeightAverage()).add(system)
        do_val = val_loader is not None and ((epoch + 1) % int(tcfg["val_every"]) == 0 or epoch == epochs - 1)
        if dd.main and do_val:
            row.update(validate(system, val_loader, device, autocast, cfg))
        if dd.main:
            history.append(row)
            best = max((h.get("val_dsc") or -1.0) for h in history)
            state_out = {
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "config": cfg, "system": system.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                "aug_rng": [gen.get_state()], "average": averaged.state() if averaged is not None else None,
            }
            save_checkpoint(ckpt_path, state_out)
            if row.get("val_dsc") is not None and row["val_dsc"] >= best:
                save_checkpoint(out / "checkpoints" / "best.pt", state_out)
            if tcfg["keep_checkpoints"]:
                save_checkpoint(out / "checkpoints" / f"epoch_{epoch:03d}.pt", state_out)
            _write_history(out / "history.csv", history)
            loss_keys = sorted({k for h in history for k in h if k.startswith("train_loss") or k.startswith("val_loss")})
            metric_keys = [k for k in ("val_dsc", "val_precision", "val_recall", "val_miou", "val_fp_slice_rate")
                           if any(h.get(k) is not None for h in history)]
            plot_curves(history, out / "curves.png", loss_keys, metric_keys, f"{cfg['method']} fold {cfg['data']['fold']}")
            log.info("epoch %d done in %.1fs: %s", epoch, time.perf_counter() - t0,
                     " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float)))
        dd.barrier()
        last_row = row
    if dd.main:
        summary_extra = None
        avg_path = out / "checkpoints" / "averaged.pt"
        if average_from is not None and not avg_path.exists():
            if averaged is not None and averaged.n == epochs - average_from:
                summary_extra = _save_averaged(averaged, system, train_loader, phases, aug, gen, pixel_mm, gamma,
                                               device, autocast, val_loader, cfg, history, avg_path, frozen)
            else:  # e.g. average_last set on resuming a run that did not average its earlier epochs
                log.warning("no %s: %d of the last %d epochs were averaged (train.average_last set after they ran?)",
                            avg_path.name, averaged.n if averaged is not None else 0, epochs - average_from)
        write_summary(out, cfg, history, device, summary_extra)
    return last_row


class WeightAverage:
    """Running uniform mean of a module's floating-point ``state_dict`` entries (float32 copies).

    ``add(module)`` folds in the module's current weights; ``load_into(module)`` writes the mean into it
    (BatchNorm running statistics included - recompute them with :func:`recalibrate_batchnorm`)."""

    def __init__(self, mean: Optional[dict] = None, n: int = 0):
        self.mean = mean or {}
        self.n = n

    def add(self, module: nn.Module) -> "WeightAverage":
        sd = {k: v.detach().float() for k, v in module.state_dict().items() if v.is_floating_point()}
        if not self.mean:
            self.mean = {k: v.clone().cpu() for k, v in sd.items()}
        else:
            for k, v in sd.items():
                self.mean[k].mul_(self.n / (self.n + 1)).add_(v.cpu(), alpha=1.0 / (self.n + 1))
        self.n += 1
        return self

    def load_into(self, module: nn.Module) -> None:
        sd = module.state_dict()
        for k, v in self.mean.items():
            sd[k].copy_(v.to(sd[k].dtype))

    def state(self) -> dict:
        return {"n": self.n, "mean": self.mean}

    @classmethod
    def from_state(cls, state: dict) -> "WeightAverage":
        return cls(dict(state["mean"]), int(state["n"]))


@torch.no_grad()
def recalibrate_batchnorm(system: nn.Module, loader, phases: list, aug: AugmentConfig, gen: torch.Generator,
                          pixel_mm: float, gamma: float, device: torch.device, autocast=nullcontext,
                          max_batches: Optional[int] = None, frozen=()) -> int:
    """Recompute every BatchNorm layer's running mean/variance as the plain average over one pass of the
    training batches (augmented as in training), running each training phase's forward in train mode
    without gradients.  Needed after weight averaging: the averaged weights' activations differ from any
    single epoch's.  The layers of ``frozen`` sub-modules keep their statistics.  Returns the number of
    batches seen."""
    fixed = {id(m) for mod in frozen for m in mod.modules()}
    bns = [m for m in system.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in fixed]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    train_mode(system, frozen)
    n = 0
    for batch in loader:
        if max_batches is not None and n >= max_batches:
            break
        x, m = augment_batch(batch["image"].to(device), batch["mask"].to(device), aug, gen, pixel_mm)
        with autocast():
            for mode in phases:
                system(mode, x, m, gamma=gamma) if mode == "snet" else system(mode, x, m)
        n += 1
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    return n


def _save_averaged(averaged: WeightAverage, system: nn.Module, train_loader, phases, aug, gen, pixel_mm, gamma,
                   device, autocast, val_loader, cfg: dict, history: list, path: Path, frozen=()) -> dict:
    """Build, BatchNorm-recalibrate, validate and save ``checkpoints/averaged.pt``; returns its summary."""
    last_state = {k: v.clone() for k, v in system.state_dict().items()}
    averaged.load_into(system)
    max_iters = cfg["train"]["max_iters"]
    batches = recalibrate_batchnorm(system, train_loader, phases, aug, gen, pixel_mm, gamma, device, autocast,
                                    None if max_iters is None else int(max_iters), frozen)
    row = {"epochs_averaged": averaged.n, "bn_batches": batches}
    if val_loader is not None:
        row.update(validate(system, val_loader, device, autocast, cfg))
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "epoch": int(history[-1]["epoch"]), "config": cfg,
                           "system": system.state_dict(), "history": history, "averaged": row})
    log.info("averaged the last %d epochs into %s: %s", averaged.n, path,
             " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float)))
    system.load_state_dict(last_state)
    return row


def write_summary(out: Path, cfg: dict, history: list, device: torch.device, averaged: Optional[dict] = None) -> dict:
    """``summary.json``: the last and the best (validation slice DSC) epoch rows, device, config digest,
    and the averaged checkpoint's row (``train.average_last``) when one was made in this call."""
    best = None
    for h in history:
        if h.get("val_dsc") is not None and (best is None or h["val_dsc"] >= best["val_dsc"]):
            best = h
    summary = {
        "method": cfg["method"], "fold": cfg["data"]["fold"], "epochs_done": len(history),
        "epochs_planned": int(cfg["train"]["epochs"]), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_seconds": round(sum(float(h.get("train_s", 0)) for h in history), 1),
        "last": history[-1] if history else None, "best": best,
        **({"averaged": averaged} if averaged is not None else {}),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def train_iteration(ddp, system, opt, phases, x, m, gamma: float, autocast=nullcontext) -> dict:
    """One iteration: for each phase (``["lnet", "snet"]`` for L-SNet) zero the gradients, forward in
    that mode, backward, Adam step.  In the ``snet`` phase with ``gamma == 0`` L-Net's gradients are
    dropped so that it does not move at all.  A phase with nothing to learn from in this batch (S-Net
    on prompt boxes alone, ``lsnet.topk 0``, and no slice with pancreas) returns ``loss None`` and makes
    no step.  Returns the phase losses as floats."""
    row = {}
    for mode in phases:
        opt.zero_grad(set_to_none=True)
        with autocast():
            res = ddp(mode, x, m, gamma=gamma) if mode == "snet" else ddp(mode, x, m)
        if res["loss"] is None:
            continue
        loss = res["loss"].float()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {mode} loss; lower train.lr or check the data")
        loss.backward()
        if mode == "snet" and gamma == 0.0:
            for p in system.first_stage_parameters():
                p.grad = None
        opt.step()
        row[f"loss_{mode}"] = float(loss.detach())
        for k in ("cls", "reg"):
            if k in res:
                row[f"{mode}_{k}"] = float(res[k])
    return row


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _write_history(path: Path, history: list) -> None:
    keys: list = []
    for h in history:
        for k in h:
            if k not in keys:
                keys.append(k)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for h in history:
            w.writerow({k: ("" if h.get(k) is None else h.get(k)) for k in keys})
    os.replace(tmp, path)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="JSON configuration (training/configs/*.json)")
    ap.add_argument("--out", required=True, help="run folder (checkpoints, logs, curves)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one configuration value, e.g. --set train.epochs=5 (repeatable)")
    ap.add_argument("--fold", type=int, help="shortcut for --set data.fold=N")
    ap.add_argument("--device", help="shortcut for --set train.device=... (auto, cpu, cuda, cuda:N)")
    ap.add_argument("--phantoms", type=int, default=0, help="add N synthetic phantoms as extra training data")
    ap.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        overrides = list(args.overrides) + ([f"data.fold={args.fold}"] if args.fold is not None else [])
        overrides += [f"train.device={args.device}"] if args.device else []
        cfg = add_phantoms(load_config(args.config, overrides), args.phantoms)
        run(cfg, Path(args.out), resume=not args.no_resume)
    except LSNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
