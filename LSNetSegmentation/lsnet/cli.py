"""``lsnet`` command line: ``segment``, ``info``, ``demo``.

Exit codes: 0 success, 2 user error (bad input, weights, device, existing outputs), 3 cancelled
(Ctrl-C), 1 internal error (a bug: the message says how to get the traceback with ``--debug``).
``--progress-json`` prints one JSON object per line on stdout (for the Slicer module's child process):
``{"event": "progress", "done": k, "total": n}``, ``{"event": "boxes", "slice": k, "boxes": [...]}``,
then ``{"event": "done", "outputs": {...}, "summary": {...}}`` or ``{"event": "error", "message": ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from . import __version__
from .errors import CancelledError, LSNetError

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_CANCELLED = 0, 1, 2, 3


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", dest="outdir", help="output folder (created if missing)")
    p.add_argument("--weights", help="model .safetensors (default: the bundled pancreas model)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=8, help="slices per batch (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--nifti", action="store_true", help="also write segmentation.nii.gz (labelmap)")
    p.add_argument("--no-heatmap", action="store_true", help="do not write heatmap.nrrd")
    p.add_argument("--progress-json", action="store_true", help="machine-readable progress on stdout (JSON lines)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lsnet", description="L-SNet segmentation of small abdominal organs (pancreas) in CT.")
    ap.add_argument("--version", action="version", version=f"lsnet {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = ap.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment a CT (NIfTI, NRRD, MHA or a DICOM series folder)")
    seg.add_argument("input", help="image file or DICOM folder")
    _add_run_options(seg)
    info = sub.add_parser("info", help="print the model card of a weights file")
    info.add_argument("weights", nargs="?", help="model .safetensors (default: the bundled model)")
    info.add_argument("--json", action="store_true", help="print the raw card as JSON")
    demo = sub.add_parser("demo", help="segment a generated abdominal CT phantom and write an overview PNG")
    _add_run_options(demo)
    demo.add_argument("--seed", type=int, default=3, help="phantom seed (default 3)")
    return ap


class _Reporter:
    """Progress to a tqdm bar on stderr, or JSON lines on stdout."""

    def __init__(self, json_lines: bool, quiet: bool):
        self.json = json_lines
        self.bar = None
        self.quiet = quiet or json_lines

    def emit(self, obj) -> None:
        if self.json:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def progress(self, done: int, total: int, info: dict) -> None:
        self.emit({"event": "progress", "done": done, "total": total, "rois": info.get("rois", 0)})
        if not self.quiet:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="slice", desc="lsnet", file=sys.stderr, leave=False)
            self.bar.update(done - self.bar.n)

    def boxes(self, k: int, boxes) -> None:
        self.emit({"event": "boxes", "slice": k, "boxes": [b.to_dict() for b in boxes]})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_line(result, seconds: float) -> str:
    n_slices = result.mask.shape[0]
    vox = result.num_voxels
    sp = result.volume.spacing
    ml = vox * sp[0] * sp[1] * sp[2] / 1000.0
    return f"{n_slices} slices, {len(result.boxes)} RoIs, {vox} voxels ({ml:.1f} ml), {seconds:.1f} s on {result.device}"


def _output_kwargs(args) -> dict:
    return {"overwrite": args.overwrite, "nifti": args.nifti, "heatmap": not args.no_heatmap}


def _run(args, volume_or_path, outdir: Path, reporter: _Reporter, extra_files=None):
    from .inference import Segmenter
    from .outputs import check_outputs_free, write_outputs

    kwargs = _output_kwargs(args)
    check_outputs_free(outdir, **kwargs)  # fail before the (long) computation, not after it
    t0 = time.perf_counter()
    seg = Segmenter(weights=args.weights, device=args.device, batch_size=args.batch_size)
    common = dict(progress=reporter.progress, heatmap=kwargs["heatmap"], on_boxes=reporter.boxes if reporter.json else None)
    if isinstance(volume_or_path, (str, Path)):
        result = seg.segment_file(volume_or_path, **common)
    else:
        result = seg.segment_volume(volume_or_path, **common)
    reporter.close()
    t1 = time.perf_counter()
    written = write_outputs(result, outdir, **kwargs)
    result.timings["write"] = time.perf_counter() - t1
    return result, written, time.perf_counter() - t0


def cmd_segment(args, reporter: _Reporter) -> int:
    if not args.outdir:
        raise LSNetError("Give an output folder with -o/--output.")
    outdir = Path(args.outdir)
    result, written, secs = _run(args, args.input, outdir, reporter)
    line = summary_line(result, secs)
    reporter.emit({"event": "done", "outputs": {k: str(v) for k, v in written.items()}, "summary": _summary_dict(result, secs)})
    if not args.progress_json:
        print(f"lsnet: {line} -> {outdir}")
    return EXIT_OK


def _summary_dict(result, secs: float) -> dict:
    return {
        "slices": int(result.mask.shape[0]),
        "rois": len(result.boxes),
        "voxels": result.num_voxels,
        "seconds": round(secs, 3),
        "device": result.device,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }


def cmd_info(args) -> int:
    from .weights import default_weights_path, read_model_card

    path = Path(args.weights) if args.weights else default_weights_path()
    card = read_model_card(path)
    if args.json:
        print(json.dumps(card, indent=2))
        return EXIT_OK
    cfg = card.get("config", {})
    print(f"{card.get('name')}  ({path})")
    if card.get("description"):
        print(f"  {card['description']}")
    print(f"  architecture : {cfg.get('architecture')}  L-Net {cfg.get('lnet_backbone')} / S-Net {cfg.get('snet_backbone')} "
          f"{cfg.get('snet_structure')}, width {cfg.get('width')}, {cfg.get('in_channels')} input channel(s)")
    print(f"  preprocessing: window {cfg.get('window')} HU, in-plane spacing {cfg.get('spacing')} mm, RoI {cfg.get('roi_size')} px")
    labels = ", ".join(f"{l.get('value')}={l.get('name')}" for l in cfg.get("labels", []))
    print(f"  labels       : {labels}")
    if card.get("training_data"):
        print(f"  trained on   : {card['training_data'] if isinstance(card['training_data'], str) else json.dumps(card['training_data'])}")
    for k, v in (card.get("metrics") or {}).items():
        print(f"  metric       : {k} = {v}")
    if card.get("sha256"):
        print(f"  sha256       : {card['sha256']}")
    return EXIT_OK


def cmd_demo(args, reporter: _Reporter) -> int:
    import numpy as np

    from .overlay import render_overlay
    from .phantom import make_phantom_volume

    outdir = Path(args.outdir or "lsnet-demo")
    image, label = make_phantom_volume(shape=(40, 256, 256), spacing=(1.4, 1.4, 2.5), seed=args.seed)
    ct_path = outdir / "demo_ct.nrrd"
    if ct_path.exists() and not args.overwrite:
        raise LSNetError(f"{ct_path} exists; pass --overwrite or choose another folder with -o.")
    result, written, secs = _run(args, image, outdir, reporter)
    outdir.mkdir(parents=True, exist_ok=True)
    import SimpleITK as sitk

    sitk.WriteImage(image.to_sitk(), str(ct_path))
    png = render_overlay(result, outdir / "overview.png")
    inter = np.count_nonzero((result.mask > 0) & (label.array > 0))
    dsc = 2 * inter / max(1, np.count_nonzero(result.mask) + np.count_nonzero(label.array))
    reporter.emit({"event": "done", "outputs": {k: str(v) for k, v in written.items()}, "summary": _summary_dict(result, secs)})
    if not args.progress_json:
        print(f"lsnet demo: phantom CT {ct_path}")
        print(f"lsnet demo: {summary_line(result, secs)}; DSC against the phantom's label {dsc:.3f}")
        print(f"lsnet demo: outputs in {outdir}/ (overview: {png.name})")
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="lsnet: %(levelname)s: %(message)s")
    reporter = _Reporter(getattr(args, "progress_json", False), getattr(args, "quiet", False))
    try:
        if args.command == "info":
            return cmd_info(args)
        if args.command == "segment":
            return cmd_segment(args, reporter)
        if args.command == "demo":
            return cmd_demo(args, reporter)
    except CancelledError as e:
        reporter.close()
        reporter.emit({"event": "error", "message": str(e)})
        print(f"lsnet: {e}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        reporter.close()
        reporter.emit({"event": "error", "message": "interrupted"})
        print("lsnet: interrupted; no output was written.", file=sys.stderr)
        return EXIT_CANCELLED
    except LSNetError as e:
        reporter.close()
        reporter.emit({"event": "error", "message": str(e)})
        print(f"lsnet: error: {e}", file=sys.stderr)
        return EXIT_USER
    except Exception as e:  # a bug: one clear line, the traceback only on request
        reporter.close()
        reporter.emit({"event": "error", "message": f"internal error: {e}"})
        if args.debug:
            raise
        print(f"lsnet: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
