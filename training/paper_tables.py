"""The paper's Tables 1-4 from ``training.evaluate`` results, as Markdown (mean +- SD over folds).

    python -m training.evaluate RUNS... --out runs/tables_val
    python -m training.evaluate RUNS_FOR_TABLE_4... --split train --out runs/tables_train
    python -m training.paper_tables runs/tables_val/results.csv --train runs/tables_train/results.csv \\
        --table1 "U-Net=cv_unet" "Coarse-to-fine U-Net=cv_c2f" "L-SNet (U-Net)=cv_lsnet" \\
        --table2 "S-Net (BCE)=cv_unetbce" "+ Loss=cv_unet" "+ L-Net (crop)=cv_crop" "+ RR=cv_lsnet" \\
        --table3 "U-Net=cv_c2f" "L-Net=cv_crop" \\
        --table4 "0=cv_g0" "0.01=cv_g001" "0.1=cv_lsnet" "1=cv_g1" --out tables.md

Each ``ROW=GROUP`` names a table row and the run group it averages: the runs whose evaluate label is
``GROUP_f<k>`` (one per fold) or exactly ``GROUP``.  Columns follow the paper:

* Table 1 (methods): slice DSC, precision, recall;
* Table 2 (components: S-Net, loss, L-Net, RR): slice DSC;
* Table 3 (first stage of a two-stage model): mIoU of its boxes, DSC, first-stage parameters (M);
* Table 4 (gamma): mIoU on the training patients (needs ``--train``), mIoU on the validation
  patients, DSC.

Every cell is mean +- sample SD over the group's runs with the run count; a table whose groups are
missing is skipped with a note, never filled in.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .evaluate import group_of


def read_rows(path: Path) -> list:
    """The clean rows of an evaluate results.csv (the paper's tables are on unshifted data)."""
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("shift", "clean") in ("clean", "")]


def cell(rows: list, key: str, scale: float = 100.0) -> str:
    """``mean +- SD (n)`` of column ``key`` over ``rows`` (empty values skipped), or ``-``."""
    v = [float(r[key]) * scale for r in rows if r.get(key) not in (None, "")]
    if not v:
        return "-"
    sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return f"{np.mean(v):.2f} +- {sd:.2f} ({len(v)})"


def first_stage_params_m(run_dir: str) -> Optional[float]:
    """Parameters (millions) of the first stage of the run's system (L-Net, coarse net, ...)."""
    from .methods import build_system

    cfg_path = Path(run_dir) / "config.json"
    if not run_dir or not cfg_path.exists():
        return None
    system = build_system(json.loads(cfg_path.read_text()))
    if not hasattr(system, "first_stage_parameters"):
        return None
    return sum(p.numel() for p in system.first_stage_parameters()) / 1e6


def _parse(specs: Optional[list]) -> list:
    out = []
    for s in specs or []:
        name, sep, group = s.rpartition("=")
        if not sep or not name or not group:
            raise SystemExit(f"error: table rows are ROW=GROUP, got {s!r}")
        out.append((name, group))
    return out


def build_tables(val_rows: list, train_rows: list, spec: dict) -> str:
    by_group: dict = {}
    for r in val_rows:
        by_group.setdefault(group_of(r["label"]), []).append(r)
    train_by_group: dict = {}
    for r in train_rows:
        train_by_group.setdefault(group_of(r["label"]), []).append(r)
    out = ["Mean +- SD over folds (number of runs); slice metrics in %, on each run's held-out patients unless "
           "the column says training.", ""]
    titles = {
        "table1": ("Table 1: methods", ["DSC %", "Precision %", "Recall %"]),
        "table2": ("Table 2: components", ["DSC %"]),
        "table3": ("Table 3: first stage", ["mIoU %", "DSC %", "first-stage params (M)"]),
        "table4": ("Table 4: gamma", ["mIoU in training %", "mIoU in validation %", "DSC %"]),
    }
    for key, rows_spec in spec.items():
        if not rows_spec:
            continue
        title, cols = titles[key]
        missing = [g for _, g in rows_spec if g not in by_group]
        if missing:
            out += [f"### {title}", "", f"(skipped: no results for {', '.join(missing)})", ""]
            continue
        first = "gamma" if key == "table4" else "row"
        out += [f"### {title}", "", "| " + " | ".join([first] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for name, g in rows_spec:
            rows = by_group[g]
            if key == "table1":
                cells = [cell(rows, "dsc"), cell(rows, "precision"), cell(rows, "recall")]
            elif key == "table2":
                cells = [cell(rows, "dsc")]
            elif key == "table3":
                params = first_stage_params_m(rows[0].get("run", ""))
                cells = [cell(rows, "miou"), cell(rows, "dsc"), f"{params:.2f}" if params is not None else "-"]
            else:
                cells = [cell(train_by_group.get(g, []), "miou"), cell(rows, "miou"), cell(rows, "dsc")]
            out.append("| " + " | ".join([name] + cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.paper_tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="results.csv files of training.evaluate (validation split)")
    ap.add_argument("--train", nargs="*", default=[], help="results.csv of training.evaluate --split train (Table 4)")
    for k in ("table1", "table2", "table3", "table4"):
        ap.add_argument(f"--{k}", nargs="*", metavar="ROW=GROUP")
    ap.add_argument("--out", help="write the Markdown here (default: stdout only)")
    args = ap.parse_args(argv)
    val_rows = [r for p in args.results for r in read_rows(Path(p))]
    train_rows = [r for p in args.train for r in read_rows(Path(p))]
    spec = {k: _parse(getattr(args, k)) for k in ("table1", "table2", "table3", "table4")}
    md = build_tables(val_rows, train_rows, spec)
    if args.out:
        Path(args.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
