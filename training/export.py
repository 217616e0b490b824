"""Export a training checkpoint to the engine's weights format (safetensors + JSON model card).

    python -m training.export runs/lsnet_f0 [runs/lsnet_seed1 ...] -o LSNetSegmentation/Resources/Models/lsnet_pancreas.safetensors \
        [--which best|last|averaged] [--name NAME] [--description TEXT] [--dtype float16|float32] [--metrics results.json]

``runs/lsnet_f0`` is a ``training.train --out`` folder (or a checkpoint ``.pt`` inside it).  The card
records the architecture config, the training configuration (data sets, split, schedule), the
validation metrics of the exported epoch and, with ``--metrics``, any extra measured metrics (e.g. the
per-patient evaluation of ``training.evaluate``).  Checkpoints are read with ``weights_only=True``:
only tensors and plain containers, never code.  Several L-SNet runs of one recipe (e.g. seeds) export
as one file holding their ensemble (``lsnet.method.ensemble``, ours); the card lists the members.
``--box-snet RUN...`` adds a box-prompt S-Net per member (``config.box_snet_width``, ours): the S-Nets
of runs trained on box prompts, which then serve user-drawn boxes; the card lists them under
``box_prompt_snet``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lsnet.architectures import load_model
from lsnet.errors import LSNetError, WeightsError
from lsnet.io.weights import save_model
from lsnet.method.ensemble import LSNetEnsemble, member_config
from lsnet.method.model import LSNet

from .config import INIT_SOURCE_FILE
from .methods import build_system, set_decision_thresholds, training_phases

EXPORTABLE = {"lsnet", "rstn", "dsms_unet", "rpn_fcn"}


def find_checkpoint(path: Path, which: str) -> Path:
    if path.is_file():
        return path
    ckpt = path / "checkpoints" / f"{which}.pt"
    if not ckpt.is_file():
        raise WeightsError(f"no checkpoint {ckpt}; train first (python -m training.train ... --out {path})")
    return ckpt


@dataclass
class Exportable:
    """One network to export (or one member of an exported ensemble) and what its card says of it."""

    model: nn.Module
    """The engine network (``LSNet`` or a seed system's model)."""
    method: str
    training: dict
    training_data: dict
    metrics: dict
    source: dict
    """Where it came from: ``{"run", "checkpoint", "seed", "held_out_fold", "epochs_done"}`` or ``{"weights", "sha256", ...}``."""
    members: list | None = None
    """An exported ensemble's ``ensemble_members`` (kept when it is exported again, e.g. with new metrics)."""
    box_snet: dict | None = None
    """An exported model's ``box_prompt_snet`` card entry (kept when it is exported again)."""


def from_run(run: Path, which: str) -> Exportable:
    """A run folder's (or checkpoint's) network, from ``checkpoints/<which>.pt``."""
    ckpt = find_checkpoint(Path(run), which)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = state["config"]
    if cfg["method"] not in EXPORTABLE:
        raise WeightsError(
            f"method {cfg['method']!r} is a training baseline without an engine architecture; only {sorted(EXPORTABLE)} "
            "checkpoints can be exported for lsnet / the Slicer module"
        )
    if cfg["method"] == "lsnet" and "lnet" not in training_phases(cfg) and not cfg["train"].get("init_from"):
        raise WeightsError(f"{ckpt} trained S-Net alone from a random start (train.phases {cfg['train']['phases']}, no "
                           "train.init_from): its L-Net was never trained, so it cannot find an organ; it is an "
                           "experiment to evaluate (training.evaluate), not a model to export")
    system = build_system(cfg)
    system.load_state_dict(state["system"])
    epochs = len(state.get("history", []))
    training = {"method": cfg["method"], "train": cfg["train"], "lsnet": cfg.get("lsnet"), "augment": cfg.get("augment"),
                "crop": cfg["data"]["crop"], "checkpoint": ckpt.name, "epochs_done": epochs}
    source = {"run": str(run), "checkpoint": ckpt.name, "seed": cfg["train"].get("seed"), "held_out_fold": cfg["data"]["fold"],
              "epochs_done": epochs}
    record = ckpt.parent.parent / INIT_SOURCE_FILE  # a stage started from other weights (train.init_from)
    if cfg["train"].get("init_from"):
        if not record.is_file():
            raise WeightsError(f"{ckpt} comes from a run started from {cfg['train']['init_from']} but {record} is "
                               "missing, so the card could not say what its weights were trained from")
        training["initialised_from"] = source["initialised_from"] = json.loads(record.read_text())
    return Exportable(
        model=system.model, method=cfg["method"], training=training,
        training_data={"datasets": cfg["data"]["datasets"],
                       "split": {"folds": cfg["data"]["folds"], "held_out_fold": cfg["data"]["fold"], "seed": cfg["data"]["split_seed"]}},
        metrics=validation_metrics(state), source=source,
    )


def from_weights(path: Path) -> Exportable:
    """An exported model (``.safetensors`` + card), e.g. an earlier bundled model joining an ensemble."""
    model, card = load_model(path, device="cpu")
    training = card.get("training") or {}
    return Exportable(
        model=model, method=model.config.architecture, training=training, training_data=card.get("training_data") or {},
        metrics={k: v for k, v in (card.get("metrics") or {}).items() if k != "cv_estimate"},
        source={"weights": Path(path).name, "sha256": card.get("sha256"), "name": card.get("name"),
                "seed": (training.get("train") or {}).get("seed"), "epochs_done": training.get("epochs_done")},
        members=card.get("ensemble_members"), box_snet=card.get("box_prompt_snet"),
    )


BOX_SNET_SAME_KEYS = ("spacing", "roi_source_factor", "roi_size", "alpha", "window", "in_channels", "snet_structure",
                      "snet_backbone", "num_classes")
"""Model settings a box-prompt S-Net must share with the model it joins: the canvas and RoI it was
trained on and the network family (its width may differ)."""


def box_snet_from_run(run: Path, which: str) -> tuple:
    """The S-Net of an L-SNet run trained for box prompts (e.g. training/configs/snet_boxes_cpu.json) and
    its card record ``(snet, model config, record)``."""
    ckpt = find_checkpoint(Path(run), which)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = state["config"]
    if cfg["method"] != "lsnet" or cfg["lsnet"]["roi_mode"] != "rr" or not float(cfg["lsnet"]["prompt_boxes"]) > 0:
        raise WeightsError(f"{ckpt}: a box-prompt S-Net comes from an L-SNet run trained on prompt boxes "
                           "(lsnet.prompt_boxes > 0, roi_mode rr), e.g. training/configs/snet_boxes_cpu.json")
    system = build_system(cfg)
    system.load_state_dict(state["system"])
    split = {"folds": cfg["data"]["folds"], "held_out_fold": cfg["data"]["fold"], "seed": cfg["data"]["split_seed"]}
    record = {"run": str(run), "checkpoint": ckpt.name, "seed": cfg["train"].get("seed"), "held_out_fold": cfg["data"]["fold"],
              "epochs_done": len(state.get("history", [])), "model": cfg["model"], "train": cfg["train"],
              "lsnet": cfg["lsnet"], "augment": cfg.get("augment"), "datasets": cfg["data"]["datasets"], "split": split}
    return system.model.snet, system.model.config, record


def with_box_snets(model: nn.Module, training_data: dict, runs: list, which: str) -> tuple:
    """``model`` (an ``LSNet`` or ``LSNetEnsemble``) with one box-prompt S-Net per member taken from
    ``runs`` (``config.box_snet_width``, ours; in member order), and the card's ``box_prompt_snet``
    entry.  The runs must share the model's canvas and RoI (:data:`BOX_SNET_SAME_KEYS`), one S-Net
    width, and the patient split of ``training_data`` (the card's), so that the card's held-out
    patients stay held out for every network in the file."""
    if not isinstance(model, (LSNet, LSNetEnsemble)):
        raise WeightsError("box-prompt S-Nets join L-SNet models only")
    loaded = [box_snet_from_run(Path(r), which) for r in runs]
    members = ([(model.lnet.nets[i], model.snet.nets[i]) for i in range(model.config.ensemble)]
               if isinstance(model, LSNetEnsemble) else [(model.lnet, model.snet)])
    if len(loaded) != len(members):
        raise WeightsError(f"the model has {len(members)} member(s) but {len(loaded)} box-prompt S-Net run(s) were "
                           "given: give one per member, in member order")
    own = model.config.to_dict()
    for run, (_, mc, record) in zip(runs, loaded):
        differ = [k for k in BOX_SNET_SAME_KEYS if mc.to_dict()[k] != own[k]]
        if differ:
            raise WeightsError(f"{run}: its S-Net was trained on another canvas or RoI ({', '.join(differ)} differ from "
                               "the model's); train it with the model's 'model' section (its width may differ)")
        if record["split"] != training_data.get("split") or record["datasets"] != training_data.get("datasets"):
            raise WeightsError(f"{run}: trained on another patient split or data than the model ({record['split']} vs "
                               f"{training_data.get('split')}); the card's held-out patients would not be held out "
                               "for it")
    widths = sorted({mc.snet_channels for _, mc, _ in loaded})
    if len(widths) > 1:
        raise WeightsError(f"the box-prompt S-Nets have different widths ({widths}); one width per file")
    config = replace(model.config, box_snet_width=widths[0])
    joined = []
    for (lnet, snet), (box, _, _) in zip(members, loaded):
        m = LSNet(member_config(config))
        m.lnet, m.snet, m.box_snet = lnet, snet, box
        joined.append(m)
    out = joined[0] if len(joined) == 1 else LSNetEnsemble(config, joined)
    entry = {"note": "user-drawn boxes (segment_box, the module's correction) go to these S-Nets, averaged over the "
                     "members; the automatic path uses L-Net and S-Net (ours, docs/method.md)",
             "width": widths[0], "members": [record for _, _, record in loaded]}
    return out, entry


def validation_metrics(state: dict) -> dict:
    """The validation metrics of a checkpoint's epoch (``val_*`` of its last history row) and the epoch."""
    row = state["history"][-1] if state.get("history") else {}
    metrics = {k: v for k, v in row.items() if k.startswith("val_") and v is not None}
    metrics["epoch"] = state.get("epoch")
    return metrics


def export(run, out: Path, which: str = "best", name: str | None = None, description: str = "",
           dtype: str = "float16", extra_metrics: dict | None = None, thresholds: dict | None = None,
           box_snet_runs: list | None = None) -> Path:
    """Write ``out`` (.safetensors + card) from one run folder / checkpoint, or from several L-SNet runs
    (or exported ``.safetensors`` models) of one recipe as their ensemble (``lsnet.method.ensemble``;
    ours): one file holding every member, the members listed on the card.  ``thresholds``
    (``{"mask_threshold": 0.4}``, ``heatmap_threshold``; None = keep) sets the model's decision
    thresholds, e.g. values chosen by ``training.calibrate``; the tensors are not touched.
    ``box_snet_runs`` (one run per member) adds the box-prompt S-Nets (:func:`with_box_snets`)."""
    sources = [Path(r) for r in (run if isinstance(run, (list, tuple)) else [run])]
    items = [from_weights(r) if r.suffix == ".safetensors" else from_run(r, which) for r in sources]
    first = items[0]
    model, metrics = first.model, dict(first.metrics)
    if len(items) > 1:
        if any(it.method != "lsnet" for it in items):
            raise WeightsError("only L-SNet models can be exported as an ensemble")
        try:
            model = LSNetEnsemble.from_models([it.model for it in items])
        except ValueError as e:
            raise WeightsError(f"cannot join {', '.join(map(str, sources))}: {e}") from e
        metrics = {}  # one member's validation is not the ensemble's
    box_entry = first.box_snet if len(items) == 1 else None
    if box_snet_runs:
        model, box_entry = with_box_snets(model, first.training_data, list(box_snet_runs), which)
    if extra_metrics:
        metrics.update(extra_metrics)
    set_decision_thresholds(model, thresholds, WeightsError, f"{first.method} models")
    card = {
        "name": name or Path(out).stem,
        "description": description,
        "labels_note": "label 1 = pancreas (SNOMED CT 15776009)",
        "training_data": first.training_data,
        "training": first.training,
        "metrics": metrics,
        "preprocessing": "canonical axial slices, HU window -> [0, 1], in-plane resampling to config.spacing / config.roi_source_factor mm, L-Net on that canvas average-pooled by roi_source_factor (lsnet/pipeline/preprocess.py, lsnet/pipeline/inference.py)",
        "exported": time.strftime("%Y-%m-%d"),
    }
    if len(items) > 1:
        card["ensemble_members"] = [dict(it.source, metrics=it.metrics) for it in items]
    elif first.members:  # an exported ensemble again (e.g. a new cv_estimate): its members stay listed
        card["ensemble_members"] = first.members
    if box_entry:
        card["box_prompt_snet"] = box_entry
    model.eval()
    return save_model(model, out, card, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, nargs="+", help="training output folder or checkpoint .pt; several L-SNet runs "
                    "(or exported .safetensors) of one recipe, e.g. seeds = one weights file holding their ensemble")
    ap.add_argument("-o", "--output", type=Path, required=True, help="target .safetensors (card written next to it)")
    ap.add_argument("--which", choices=["best", "last", "averaged"], default="best")
    ap.add_argument("--name")
    ap.add_argument("--description", default="")
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    ap.add_argument("--metrics", type=Path, help="JSON of extra measured metrics to put on the card")
    ap.add_argument("--mask-threshold", type=float, help="S-Net probability -> mask (default: keep the model's)")
    ap.add_argument("--heatmap-threshold", type=float, help="L-Net heatmap threshold (default: keep the model's)")
    ap.add_argument("--box-snet", nargs="+", type=Path, metavar="RUN",
                    help="runs trained on box prompts (e.g. training/configs/snet_boxes_cpu.json), one per member in "
                    "member order: their S-Nets serve user-drawn boxes (config.box_snet_width; ours)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.output.with_suffix(".safetensors").exists() and not a.overwrite:
            raise LSNetError(f"{a.output} exists; pass --overwrite to replace it")
        extra = json.loads(a.metrics.read_text()) if a.metrics else None
        path = export(a.run, a.output, a.which, a.name, a.description, a.dtype, extra,
                      {"mask_threshold": a.mask_threshold, "heatmap_threshold": a.heatmap_threshold}, a.box_snet)
    except LSNetError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"export: wrote {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
