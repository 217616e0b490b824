"""Cross-validation figures of one run group as JSON, for a model card (``training.export --metrics``).

    python -m training.cv_summary runs/cv_results/results.csv --group cv_robust --command "..." -o metrics.json

Reads a ``training.evaluate`` results.csv and writes, per input shift, the mean and sample SD over the
group's folds of slice DSC, precision, recall, box-prompt DSC and false-positive slices (evaluate's
``box_fp_slice_rate``), L-Net box mIoU, the false-positive slice rate, and the volume figures
before/after the volume step, in percent, with the fold count;
the same over the patients only (``*_real``: no synthetic phantom).
Nothing is computed here that the CSV does not hold.

``--keys box_dsc,box_dsc_real --into CARD.json`` updates an existing card's ``cv_estimate`` instead: only
those keys are taken from the group (e.g. the box-prompt figures of a model whose user-drawn boxes go
to box-prompt S-Nets, ``training.export --box-snet``), every other figure stays the card's, and the
group and command of the new keys are recorded under ``cv_estimate.updates``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from .evaluate import group_of

KEYS = ("dsc", "precision", "recall", "box_dsc", "box_fp_slice_rate", "miou", "fp_slice_rate", "vol_dsc", "vol_dsc_pp",
        "vol_fp_slice_rate", "vol_fp_slice_rate_pp", "dsc_real", "precision_real", "recall_real", "box_dsc_real",
        "box_fp_slice_rate_real", "miou_real", "fp_slice_rate_real", "vol_dsc_pp_real", "vol_fp_slice_rate_pp_real")


def summarise(rows: list, group: str) -> dict:
    """``{shift: {key: [mean %, SD %, n]}}`` over the rows of ``group`` (SD 0 for one fold)."""
    out: dict = {}
    for r in rows:
        if group_of(r["label"]) != group:
            continue
        shift = r.get("shift") or "clean"
        out.setdefault(shift, {k: [] for k in KEYS})
        for k in KEYS:
            v = r.get(k, "")
            if v not in ("", None):
                out[shift][k].append(100.0 * float(v))
    result = {}
    for shift, values in out.items():
        cells = {}
        for k, v in values.items():
            if not v:
                continue
            mean = sum(v) / len(v)
            sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
            cells[k] = [round(mean, 2), round(sd, 2), len(v)]
        result[shift] = cells
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.cv_summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="results.csv of training.evaluate")
    ap.add_argument("--group", required=True, help="run group (evaluate label without the _fN suffix)")
    ap.add_argument("--command", default="", help="the commands that made the results (kept on the card)")
    ap.add_argument("--keys", help="comma-separated figures to take from the group (with --into), e.g. box_dsc,box_dsc_real")
    ap.add_argument("--into", type=Path, help="a model card (.json) whose cv_estimate the --keys update")
    ap.add_argument("-o", "--output", type=Path, required=True)
    a = ap.parse_args(argv)
    with open(a.results, newline="") as f:
        rows = list(csv.DictReader(f))
    summary = summarise(rows, a.group)
    if not summary:
        print(f"cv_summary: error: no rows of group {a.group!r} in {a.results}", file=sys.stderr)
        return 2
    if bool(a.keys) != bool(a.into):
        print("cv_summary: error: --keys and --into go together (which figures, into which card)", file=sys.stderr)
        return 2
    if a.into:
        try:
            keys = [k.strip() for k in a.keys.split(",") if k.strip()]
            estimate = updated_estimate(json.loads(a.into.read_text()), summary, keys, a.group, a.command)
        except (OSError, ValueError) as e:
            print(f"cv_summary: error: {a.into}: {e}", file=sys.stderr)
            return 2
    else:
        estimate = {"protocol": "patient-level 4-fold cross-validation (training/splits.py, seed 0), each fold's held-out "
                                "patients; [mean %, SD % over folds, folds]",
                    "command": a.command, "by_shift": summary}
    a.output.write_text(json.dumps({"cv_estimate": estimate}, indent=1) + "\n")
    print(f"cv_summary: wrote {a.output}")
    return 0


def updated_estimate(card: dict, summary: dict, keys: list, group: str, command: str) -> dict:
    """The card's ``cv_estimate`` with ``keys`` replaced, in every shift the card has, by ``summary``'s
    (:func:`summarise`); ``ValueError`` when the card has no estimate, a key is unknown or the group lacks
    a shift or key."""
    estimate = json.loads(json.dumps((card.get("metrics") or {}).get("cv_estimate") or {}))
    if not estimate.get("by_shift"):
        raise ValueError("the card has no metrics.cv_estimate to update")
    unknown = [k for k in keys if k not in KEYS]
    if not keys or unknown:
        raise ValueError(f"--keys must name figures among {', '.join(KEYS)}; not {', '.join(unknown) or 'none'}")
    for shift, cells in estimate["by_shift"].items():
        missing = [k for k in keys if k not in summary.get(shift, {})]
        if missing:
            raise ValueError(f"group {group!r} has no {', '.join(missing)} under shift {shift!r}")
        for k in keys:
            cells[k] = summary[shift][k]
    estimate.setdefault("updates", []).append({"keys": keys, "group": group, "command": command})
    return estimate


if __name__ == "__main__":
    sys.exit(main())
