"""Training configuration: a JSON file of nested sections, every value overridable from the command line.

Sections (defaults = the paper's settings, section 3.1, where it gives them):

``method``   "lsnet" (L-Net + RR + S-Net, alternating updates), "rstn" / "dsms_unet" / "rpn_fcn" (the seed
             systems of lsnet.seeds.common, end to end), "unet" / "fcn" (one-stage baselines of
             Table 1 on ResNet34), "c2f" (2-D coarse-to-fine: coarse U-Net -> box padded 15 px -> hard
             crop -> fine network).
``model``    :class:`lsnet.config.ModelConfig` fields (architecture, window, spacing, alpha, gamma...).
``lsnet``    ``topk`` (3: keypoint drawn among the top-3 peaks; 0, ours: no L-Net RoI, S-Net learns from the
             ``prompt_boxes`` alone - an S-Net-only experiment, L-Net is not run), ``prompt_negatives`` (0; ours:
             the share of pancreas-free slices that get a prompt box of the batch and an empty target), ``roi_mode`` ("rr" = differentiable RoI
             recalibration; "crop" = hard crop of the quantised box without gradient to L-Net, the
             Table 2 ablation).
``baseline`` ``backbone`` (resnet34), ``coarse_backbone`` (resnet18), ``structure`` ("unet"/"fcn"),
             ``pad`` (15 px), ``fine_box`` ("gt": the fine network trains on crops around the true box
             jittered by up to ``jitter`` px; "coarse": around the coarse prediction).
``loss``     ``kind``: "paper" (Focal + 0.2 Dice, Eqs. 5-6) or "bce" (Table 2 ablation).
``data``     ``datasets`` (list of :func:`training.datasets.cases_from_spec` specs; split into folds by
             patient), ``extra_train_datasets`` (specs always in the training split, never validated
             on, e.g. phantoms: ``--phantoms N``), ``from_cache`` (true: the split pool is every
             real (non-phantom) case in ``cache_dir/index.json``, the sources are never touched - for
             machines without the data; ``datasets`` may then be empty; use a dedicated cache folder), ``cache_dir``,
             ``folds`` (4), ``fold`` (0; -1 = train on everything, no validation), ``split_seed``,
             ``crop`` (320 = H = W), ``negative_fraction``, ``workers`` (DataLoader processes),
             ``cache_workers``, ``max_train_slices`` / ``max_val_slices`` (caps, for smoke tests).
``train``    ``epochs`` 60, ``lr`` 1e-4, ``lr_step`` 25, ``lr_decay`` 0.1 (Adam, x0.1 every 25 epochs),
             ``batch_size``, ``weight_decay``, ``amp`` ("auto" = bf16 autocast on CUDA, "off", "bf16"),
             ``device`` ("auto", "cpu", "cuda"), ``seed``, ``max_iters`` (per epoch; null = all),
             ``val_every``, ``log_every``, ``keep_checkpoints``, ``average_last`` (0; N > 0 also writes
             ``checkpoints/averaged.pt``, the mean weights of the last N epochs - ours, see training/train.py),
             ``init_from`` (null; a training checkpoint ``.pt`` or a run folder, whose ``checkpoints/last.pt``
             is used, or an exported ``.safetensors`` model - then only with ``data.fold -1``, as its card
             does not record the held-out patients of every member; ``init_member`` picks a member of an ensemble
             file: its weights start a new run of the same method/model - a fine-tuning stage, ours),
             ``freeze`` (dotted sub-modules of the system, e.g. ``["model.lnet"]``: no gradients, kept in
             eval mode so their BatchNorm statistics do not move), ``phases`` (null = the method's
             phases; a subset, e.g. ``["snet"]``, runs only those steps per iteration).
``augment``  :class:`training.augment.AugmentConfig` fields.

``--set a.b=value`` overrides one key; the value is parsed as JSON when it parses (numbers, true,
null, lists), else taken as a string.  Unknown keys are rejected so a typo cannot silently train the
wrong model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from lsnet.config import ModelConfig
from lsnet.errors import InputError

from .augment import AugmentConfig

METHODS = ("lsnet", "unet", "fcn", "c2f", "rstn", "dsms_unet", "rpn_fcn")

INIT_SOURCE_FILE = "init_source.json"
"""Written in a run folder started with ``train.init_from``: what its starting weights came from (the
source may change later, e.g. a bundled model replaced by the one the run makes); ``training.export``
copies it onto the model card."""

DEFAULTS: dict = {
    "method": "lsnet",
    "model": ModelConfig().to_dict(),
    "lsnet": {"topk": 3, "roi_mode": "rr", "prompt_boxes": 0.0, "prompt_jitter_mm": [-2.0, 10.0],
              "prompt_shift": 0.1, "prompt_negatives": 0.0},
    "baseline": {"backbone": "resnet34", "coarse_backbone": "resnet18", "structure": "unet", "pad": 15,
                 "fine_box": "gt", "jitter": 8},
    "loss": {"kind": "paper"},
    "data": {
        "datasets": [],
        "extra_train_datasets": [],
        "from_cache": False,
        "cache_dir": "runs/cache",
        "folds": 4,
        "fold": 0,
        "split_seed": 0,
        "crop": 320,
        "negative_fraction": 0.2,
        "workers": 2,
        "cache_workers": 0,
        "max_train_slices": None,
        "max_val_slices": None,
    },
    "train": {
        "epochs": 60,
        "lr": 1e-4,
        "lr_step": 25,
        "lr_decay": 0.1,
        "batch_size": 8,
        "weight_decay": 0.0,
        "amp": "auto",
        "device": "auto",
        "seed": 0,
        "max_iters": None,
        "val_every": 1,
        "log_every": 20,
        "keep_checkpoints": False,
        "average_last": 0,
        "init_from": None,
        "init_member": None,
        "freeze": [],
        "phases": None,
    },
    "augment": AugmentConfig().to_dict(),
}

# keys whose value may be any JSON (not checked against DEFAULTS)
_FREE = {("data", "datasets"), ("data", "extra_train_datasets"), ("model", "labels"), ("model", "options")}


def _merge(base: dict, over: dict, path: tuple = ()) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(k, str) and k.startswith("_"):  # "_comment" and other notes
            continue
        p = path + (k,)
        if k not in base:
            raise InputError(f"unknown configuration key {'.'.join(p)!r}; known at this level: {sorted(base)}")
        if isinstance(base[k], dict) and p not in _FREE:
            if not isinstance(v, dict):
                raise InputError(f"configuration key {'.'.join(p)!r} must be a mapping")
            out[k] = _merge(base[k], v, p)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``["a.b=1", "c=x"]``; every key must exist in the defaults."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node, ref = cfg, DEFAULTS
        for i, p in enumerate(parts[:-1]):
            if not isinstance(ref, dict) or p not in ref or not isinstance(node.get(p), dict):
                raise InputError(f"unknown configuration key {key!r}")
            node, ref = node[p], ref[p]
        last = parts[-1]
        if not isinstance(ref, dict) or last not in ref:
            raise InputError(f"unknown configuration key {key!r}")
        node[last] = parse_value(text)
    return cfg


def validate(cfg: dict) -> dict:
    if cfg["method"] not in METHODS:
        raise InputError(f"method must be one of {METHODS}, not {cfg['method']!r}")
    ModelConfig.from_dict(cfg["model"])  # raises on unknown keys
    AugmentConfig.from_dict(cfg["augment"])
    crop = int(cfg["data"]["crop"])
    if crop % 32:
        raise InputError(f"data.crop = {crop} must be a multiple of 32 (L-Net down-samples 5 times)")
    if cfg["lsnet"]["roi_mode"] not in ("rr", "crop"):
        raise InputError("lsnet.roi_mode must be 'rr' or 'crop'")
    for key in ("prompt_boxes", "prompt_negatives"):
        v = cfg["lsnet"][key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) <= 1.0:
            raise InputError(f"lsnet.{key} is a share of slices, from 0 to 1; not {v!r}")
    topk = cfg["lsnet"]["topk"]
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 0:
        raise InputError(f"lsnet.topk must be a whole number >= 0, not {topk!r}")
    if topk == 0 and (cfg["lsnet"]["roi_mode"] != "rr" or not float(cfg["lsnet"]["prompt_boxes"]) > 0):
        raise InputError("lsnet.topk 0 trains S-Net on prompt boxes alone: it needs lsnet.roi_mode 'rr' and "
                         "lsnet.prompt_boxes > 0 (e.g. 1.0)")
    freeze = cfg["train"]["freeze"]
    if not isinstance(freeze, list) or any(not isinstance(n, str) or not n for n in freeze):
        raise InputError(f"train.freeze must be a list of sub-module names such as [\"model.lnet\"], not {freeze!r}")
    if freeze and not cfg["train"]["init_from"]:
        raise InputError("train.freeze keeps sub-modules at their starting weights: give train.init_from (a run "
                         "or checkpoint to start from), or the frozen parts stay random")
    if cfg["loss"]["kind"] not in ("paper", "bce"):
        raise InputError("loss.kind must be 'paper' or 'bce'")
    if cfg["baseline"]["fine_box"] not in ("gt", "coarse"):
        raise InputError("baseline.fine_box must be 'gt' or 'coarse'")
    if cfg["train"]["amp"] not in ("auto", "off", "bf16"):
        raise InputError("train.amp must be 'auto', 'off' or 'bf16'")
    if not cfg["data"]["datasets"] and not cfg["data"]["from_cache"]:
        raise InputError("data.datasets is empty: list at least one dataset spec (see training/datasets.py) "
                         "or set data.from_cache=true to train on an existing cache")
    return cfg


PHANTOM_SEED = 100000
"""Seeds of extra-training phantoms start here (distinct from the small seeds tests use)."""


def add_phantoms(cfg: dict, n: int) -> dict:
    """Append ``n`` default-size phantoms to ``data.extra_train_datasets`` (``--phantoms N``)."""
    if n and n > 0:
        cfg = copy.deepcopy(cfg)
        cfg["data"]["extra_train_datasets"].append({"type": "phantom", "count": int(n), "seed": PHANTOM_SEED})
    return cfg


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults <- JSON file (may ``"extends"`` another file, relative to it) <- ``--set`` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        cfg = _merge(cfg, _read_with_extends(Path(path)))
    cfg = apply_overrides(cfg, overrides)
    return validate(cfg)


def _read_with_extends(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"configuration file {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"configuration file {path} is not valid JSON: {e}") from e
    parent = d.pop("extends", None)
    if parent:
        base = _read_with_extends((path.parent / parent).resolve())
        return _deep_update(base, d)
    return d


def _deep_update(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "datasets":
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def model_config(cfg: dict) -> ModelConfig:
    return ModelConfig.from_dict(cfg["model"])
