"""Whole-volume evaluation through the engine's own inference path (what ``lsnet segment`` runs).

    python -m training.evaluate_volumes --weights W.safetensors [W2.safetensors ...] \\
        --case CT_PATH[=LABEL_PATH] [--case ...] --out results/ [--device auto] [--label-value 1]

``training/evaluate.py`` scores slices on the model's resampled canvas, the paper's way.  This script
answers the user's question instead: on a whole CT, at its own resolution, how good is the mask that
``lsnet segment`` writes, and on how many slices without pancreas does it put something?  Every case is
segmented twice by :class:`lsnet.pipeline.inference.Segmenter` (with and without the volume step
of ``lsnet/postprocess.py``; the network runs once, the step is applied to a copy).

Per case and weights file: slices with a mask; with a label also volume DSC, HD95 (mm, physical
spacing) and the false-positive slice rate (share of the label's empty slices that get a mask).  A case
without a label (e.g. an unlabelled CT) still gives the slice counts.  Writes ``volumes.md`` and
``volumes.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from lsnet.errors import LSNetError

from .evaluate import _fmt, write_results
from .metrics import volume_scores

log = logging.getLogger("training.evaluate_volumes")

COLUMNS = ["weights", "case", "step", "slices", "slices_with_mask", "label_slices", "fp_slice_rate", "vol_dsc",
           "hd95_mm"]


def score_mask(mask: np.ndarray, label: Optional[np.ndarray], spacing_kji) -> dict:
    """Metrics of one binary ``(K, J, I)`` mask (input array order; ``label`` in the same order or None)."""
    row = {"slices": int(mask.shape[0]), "slices_with_mask": int(mask.any(axis=(1, 2)).sum())}
    if label is not None:
        s = volume_scores(mask, label, spacing_kji)
        row.update({k: s[k] for k in ("label_slices", "vol_dsc", "hd95_mm")})
        row["fp_slice_rate"] = s["fp_slices"] / s["bg_slices"] if s["bg_slices"] else None
    return row


def evaluate_case(segmenter, ct_path: str, label_path: Optional[str], label_value: Optional[int]) -> list:
    """Rows (``step`` = ``none`` and ``large_components``) for one case.  ``segmenter`` must run without
    the volume step (``drop_small_components=False``): it is applied here to a copy of the same output."""
    from lsnet.io.volume import read_label, read_volume
    from lsnet.pipeline.postprocess import keep_large_components

    volume = read_volume(ct_path)
    label = None
    if label_path:
        label = read_label(label_path, reference=volume, label_value=label_value).array > 0
    if segmenter.drop_small_components:
        raise ValueError("evaluate_case needs a segmenter made with drop_small_components=False")
    result = segmenter.segment_volume(volume, heatmap=False)
    raw = result.mask > 0
    stepped = raw.astype(np.uint8)
    keep_large_components(stepped)
    sx, sy, sz = volume.spacing
    rows = []
    for step, mask in (("none", raw), ("large_components", stepped > 0)):
        row = {"case": Path(ct_path).name, "step": step}
        row.update(score_mask(mask, label, (sz, sy, sx)))
        rows.append(row)
    return rows


def to_markdown(rows: list) -> str:
    head = ["weights", "case", "volume step", "slices with mask / slices", "label slices", "FP-slice %", "vol DSC %",
            "HD95 mm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["weights"], r["case"], r["step"], f"{r['slices_with_mask']} / {r['slices']}", _fmt(r.get("label_slices")),
            _fmt(r.get("fp_slice_rate")), _fmt(r.get("vol_dsc")), _fmt(r.get("hd95_mm"), pct=False)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate_volumes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", nargs="+", required=True, help=".safetensors files (any architecture's card)")
    ap.add_argument("--case", action="append", required=True, help="CT_PATH or CT_PATH=LABEL_PATH (repeatable)")
    ap.add_argument("--out", required=True, help="folder for volumes.md and volumes.csv")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--label-value", type=int, help="label value of the organ in multi-label maps (default: any > 0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from lsnet.pipeline.seed_inference import make_segmenter

    try:
        rows = []
        for w in args.weights:
            seg = make_segmenter(weights=w, device=args.device, batch_size=args.batch_size, drop_small_components=False)
            for case in args.case:
                ct, _, lab = case.partition("=")
                for r in evaluate_case(seg, ct, lab or None, args.label_value):
                    r["weights"] = Path(w).name
                    rows.append(r)
                    log.info("%s", r)
        print(write_results(Path(args.out), "volumes", to_markdown(rows), rows, COLUMNS))
    except LSNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
