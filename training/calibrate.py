"""A decision threshold chosen by cross-validation, and the honest estimate of what the choice gives.

    python -m training.calibrate runs/ev_*/results.csv runs/sw_mask*/results.csv --group cv_s2 \
        --key mask_threshold --metric dsc_real [--shift clean] [--also box_dsc_real vol_fp_slice_rate_pp_real]

Reads ``training.evaluate`` results (one call per candidate value of a decision threshold, e.g.
``--mask-threshold 0.4``) of one run group over its folds.  Picking the value with the best mean over
the folds and reporting that mean scores the choice on the data that made it (optimistic).  Here each
fold's figure is taken at the value that is best on the *other* folds (leave-one-fold-out selection,
a nested cross-validation of this one setting), so no fold's score has seen the fold; the value for a
model trained on all data is the one best over all folds.  Ties go to the value nearest ``--default``
(the paper's 0.5 for both thresholds).  Nothing is computed here that the CSVs do not hold.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from .evaluate import group_of
from .paper_tables import cell


def _num(v):
    return None if v in ("", None) else float(v)


def sweep_table(rows: list, group: str, key: str, shift: str = "clean") -> dict:
    """``{value: {fold: row}}`` of ``group``'s rows of ``shift``, by the value of column ``key``.
    A (value, fold) given twice must hold the same figures (timing aside): two results for one setting
    that differ mean two different runs under one label, and are refused (``ValueError``)."""
    table: dict = {}
    for r in rows:
        if group_of(r["label"]) != group or (r.get("shift") or "clean") != shift:
            continue
        value = _num(r.get(key))
        if value is None:
            raise ValueError(f"row {r['label']} has no {key}")
        fold = int(r["fold"])
        seen = table.setdefault(value, {}).get(fold)
        if seen is not None and _figures(seen) != _figures(r):
            raise ValueError(f"{group} fold {fold} has two different results at {key} = {value:g}")
        table[value][fold] = r
    return table


def _figures(row: dict) -> dict:
    """A row without what differs between two evaluations of the same setting (timing, run path)."""
    return {k: v for k, v in row.items() if k not in ("seconds", "run")}


def _mean_sd(values: list) -> tuple:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _best(table: dict, folds: list, metric: str, default: float):
    """The value with the highest mean ``metric`` over ``folds`` (ties: nearest ``default``)."""
    def score(value):
        return sum(float(table[value][f][metric]) for f in folds) / len(folds)
    return max(sorted(table), key=lambda v: (round(score(v), 10), -abs(v - default)))


def leave_one_fold_out(table: dict, metric: str, default: float) -> dict:
    """The nested choice.  Only values evaluated on every fold compete (``ValueError`` if fewer than two
    folds or no such value).  Returns ``{"folds": {fold: (chosen value, metric there)},
    "nested": (mean, SD), "per_value": {value: (mean, SD)}, "all_folds_choice": value}``."""
    folds = sorted({f for by_fold in table.values() for f in by_fold})
    complete = {v: by_fold for v, by_fold in table.items()
                if set(by_fold) == set(folds) and all(_num(r.get(metric)) is not None for r in by_fold.values())}
    if len(folds) < 2 or not complete:
        raise ValueError(f"need one {metric} per fold for at least one value over >= 2 folds "
                         f"(folds {folds}, complete values {sorted(complete)})")
    chosen = {}
    for f in folds:
        v = _best(complete, [g for g in folds if g != f], metric, default)
        chosen[f] = (v, float(complete[v][f][metric]))
    per_value = {v: _mean_sd([float(complete[v][f][metric]) for f in folds]) for v in sorted(complete)}
    return {"folds": chosen, "nested": _mean_sd([s for _, s in chosen.values()]), "per_value": per_value,
            "all_folds_choice": _best(complete, folds, metric, default)}


def to_markdown(table: dict, result: dict, key: str, metric: str, also: list) -> str:
    """Per candidate value: mean +- SD over folds of ``metric`` and ``also``; then the nested choice."""
    folds = sorted(result["folds"])
    cols = [metric] + list(also)

    def one(row, col):
        v = _num(row.get(col))
        return "-" if v is None else f"{100 * v:.2f}"

    lines = [f"| {key} | " + " | ".join(f"{c} % (folds)" for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for v in sorted(result["per_value"]):
        lines.append(f"| {v:g} | " + " | ".join(cell([table[v][f] for f in folds], c) for c in cols) + " |")
    lines += ["", f"| held-out fold | {key} chosen on the other folds | " + " | ".join(f"{c} %" for c in cols) + " |",
              "|" + "---|" * (len(cols) + 2)]
    for f in folds:
        v, _ = result["folds"][f]
        lines.append(f"| {f} | {v:g} | " + " | ".join(one(table[v][f], c) for c in cols) + " |")
    m, sd = result["nested"]
    lines += ["", f"Leave-one-fold-out estimate of {metric}: **{100 * m:.2f} +- {100 * sd:.2f} %** over {len(folds)} folds; "
              f"{key} chosen on all folds (for a model trained on all data): **{result['all_folds_choice']:g}**."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="+", help="results.csv files of training.evaluate")
    ap.add_argument("--group", required=True, help="run group (evaluate label without the _fN suffix)")
    ap.add_argument("--key", default="mask_threshold", help="the swept column (default: mask_threshold)")
    ap.add_argument("--metric", default="dsc_real", help="the figure to maximise (default: dsc_real)")
    ap.add_argument("--default", type=float, default=0.5, help="tie-break towards this value (default: 0.5)")
    ap.add_argument("--shift", default="clean", help="the input shift whose rows are used (default: clean)")
    ap.add_argument("--also", nargs="*", default=["box_dsc_real", "vol_fp_slice_rate_pp_real"],
                    help="other columns shown at each value (not used to choose)")
    ap.add_argument("--json", type=Path, help="write the choice and the estimate here as JSON")
    a = ap.parse_args(argv)
    rows = []
    try:
        for p in a.results:
            with open(p, newline="") as f:
                rows += list(csv.DictReader(f))
        table = sweep_table(rows, a.group, a.key, a.shift)
        result = leave_one_fold_out(table, a.metric, a.default)
    except (OSError, KeyError, ValueError) as e:
        print(f"calibrate: error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(table, result, a.key, a.metric, a.also), end="")
    if a.json:
        m, sd = result["nested"]
        a.json.write_text(json.dumps({
            "key": a.key, "metric": a.metric, "group": a.group, "shift": a.shift,
            "chosen_on_all_folds": result["all_folds_choice"],
            "leave_one_fold_out": {"mean_pct": round(100 * m, 2), "sd_pct": round(100 * sd, 2),
                                   "per_fold": {str(f): {"value": v, "metric_pct": round(100 * s, 2)}
                                                for f, (v, s) in result["folds"].items()}},
            "per_value": {f"{v:g}": [round(100 * mm, 2), round(100 * ss, 2)] for v, (mm, ss) in result["per_value"].items()},
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
