"""``lsnet`` command line: ``segment``, ``info``, ``demo``, ``web``.

``lsnet segment`` takes an image file, a DICOM series folder, or -- batch mode (``lsnet.app.batch``) -- a
folder holding several cases or a ``.csv`` case list (``--batch`` forces batch mode for a folder).
``--dicom-seg`` also writes ``segmentation.dcm`` (``lsnet.io.dicom_seg``) for DICOM input; a non-CT
DICOM series is refused unless ``--allow-non-ct`` (``lsnet.io.dicom_info`` has the input policies).

Exit codes: 0 success, 2 user error (bad input, weights, device, existing outputs; in batch mode: any
case failed), 3 cancelled (Ctrl-C), 1 internal error (a bug: the message says how to get the traceback
with ``--debug``).
``--progress-json`` prints one JSON object per line on stdout (for the Slicer module's child process):
``{"event": "progress", "done": k, "total": n}``, ``{"event": "boxes", "slice": k, "boxes": [...]}``,
in batch mode ``{"event": "case", "index": i, "total": n, "case": name, "status": ..., "message": ...}``,
then ``{"event": "done", "outputs": {...}, "summary": {...}}`` or ``{"event": "error", "message": ...}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from lsnet._version import __version__
from lsnet.errors import CancelledError, LSNetError

# Before torch (imported lazily below) starts OpenMP: idle threads sleep instead of spinning, which
# keeps a 2-core machine that is doing other work from stalling (benchmarks: 10x on a loaded CPU).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_CANCELLED = 0, 1, 2, 3


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", dest="outdir", help="output folder (created if missing)")
    p.add_argument("--weights", help="model .safetensors (default: the bundled pancreas model)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=8, help="slices per batch (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--nifti", action="store_true", help="also write segmentation.nii.gz (labelmap)")
    p.add_argument("--no-heatmap", action="store_true", help="do not write heatmap.nrrd")
    p.add_argument("--dicom-seg", action="store_true", help="also write segmentation.dcm (DICOM SEG referencing the source series; DICOM input only)")
    p.add_argument("--all-components", action="store_true",
                   help="keep every connected component of the mask (default: a volume keeps its largest 3-D component and those of at least 25 %% of its size, see docs/method.md)")
    p.add_argument("--allow-non-ct", action="store_true", help="segment a non-CT DICOM series (e.g. MR) anyway; the result is meaningless outside CT")
    p.add_argument("--progress-json", action="store_true", help="machine-readable progress on stdout (JSON lines)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lsnet", description="L-SNet segmentation of small abdominal organs (pancreas) in CT.")
    ap.add_argument("--version", action="version", version=f"lsnet {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = ap.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment a CT (NIfTI, NRRD, MHA or a DICOM series folder)")
    seg.add_argument("input", help="image file, DICOM folder, a folder of cases or a .csv case list (batch mode)")
    _add_run_options(seg)
    seg.add_argument("--batch", action="store_true", help="treat the folder as a batch: every image file / DICOM series is a case")
    info = sub.add_parser("info", help="print the model card of a weights file")
    info.add_argument("weights", nargs="?", help="model .safetensors (default: the bundled model)")
    info.add_argument("--json", action="store_true", help="print the raw card as JSON")
    demo = sub.add_parser("demo", help="segment the shipped sample CT (NIH PANCREAS_0001, reduced) and write an overview PNG")
    _add_run_options(demo)
    web = sub.add_parser("web", help="serve the Slicer module's workflow as a web app (trame-slicer; pip install 'lsnet-segmentation[web]')")
    web.add_argument("--data-root", default=".", help="the only folder whose files the page may open (default: the current folder)")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; anything else has no authentication)")
    web.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    web.add_argument("--upload-limit-mb", type=int, default=1024, help="largest accepted upload in MB (default 1024)")
    web.add_argument("--device", default="cpu", help="engine device: cpu (default), cuda or auto")
    web.add_argument("--max-sessions", type=int, default=4,
                     help="browser sessions at a time, each with its own scene in its own process (default 4)")
    web.add_argument("--idle-timeout-min", type=float, default=30.0,
                     help="end a session whose page has been closed this many minutes (default 30)")
    web.add_argument("--single-session", action="store_true",
                     help="serve one scene from this process (every browser that connects shares it; the "
                          "per-user gateway starts one of these per session)")
    web.add_argument("--exit-with-parent", type=int, default=None, help=argparse.SUPPRESS)
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
    on = result.slices_with_mask
    removed = result.postprocess.get("removed_slices", 0)
    pp = f" (small components dropped: {removed} slices cleared)" if removed else ""
    return (f"{n_slices} slices, {on} with segmentation{pp}, {len(result.boxes)} RoIs, {vox} voxels ({ml:.1f} ml), "
            f"{seconds:.1f} s on {result.device}")


def _output_kwargs(args) -> dict:
    return {"overwrite": args.overwrite, "nifti": args.nifti, "heatmap": not args.no_heatmap}


def _check_outputs_free(outdir: Path, args) -> None:
    """Fail before the (long) computation, not after it, when an output file exists (no --overwrite)."""
    from lsnet.errors import OutputError
    from lsnet.io.dicom_seg import dicom_seg_path
    from lsnet.io.outputs import check_outputs_free

    kwargs = _output_kwargs(args)
    check_outputs_free(outdir, **kwargs)
    seg_path = dicom_seg_path(outdir)
    if getattr(args, "dicom_seg", False) and not args.overwrite and (seg_path.exists() or seg_path.is_symlink()):
        raise OutputError(f"Output file already exists: {seg_path}. Choose another output folder, or pass --overwrite to replace it.")


def _make_segmenter(args):
    from lsnet.pipeline.seed_inference import make_segmenter

    return make_segmenter(weights=args.weights, device=args.device, batch_size=args.batch_size,
                          drop_small_components=not getattr(args, "all_components", False))


def _read_input(args, path):
    """Read an input file/folder with the reliability checks (modality, gantry tilt, HU range)."""
    from lsnet.errors import InputError
    from lsnet.io.dicom_info import (
        check_field_of_view,
        check_hu_range,
        check_series,
        is_dicom_input,
    )
    from lsnet.io.volume import read_volume

    dicom = is_dicom_input(path)
    if getattr(args, "dicom_seg", False) and not dicom:
        raise InputError(f"--dicom-seg needs a DICOM series as input; {path} is not DICOM. Run without --dicom-seg.")
    info = check_series(path, allow_non_ct=getattr(args, "allow_non_ct", False)) if dicom else None
    if info is not None and info.multiframe and getattr(args, "dicom_seg", False):
        from lsnet.errors import OutputError

        raise OutputError("--dicom-seg is not supported for a multi-frame (enhanced) DICOM source; run without --dicom-seg.")
    volume = read_volume(path)
    check_field_of_view(volume, str(path))
    if not dicom:
        check_hu_range(volume, str(path))
    return volume, info


def _run(args, volume_or_path, outdir: Path, reporter: _Reporter, extra_files=None, segmenter=None):
    from lsnet.io.outputs import write_outputs

    kwargs = _output_kwargs(args)
    _check_outputs_free(outdir, args)  # fail before the (long) computation, not after it
    t0 = time.perf_counter()
    seg = segmenter if segmenter is not None else _make_segmenter(args)  # weights/device errors first
    info = None
    t_read = time.perf_counter()
    if isinstance(volume_or_path, (str, Path)):
        volume, info = _read_input(args, volume_or_path)
    else:
        volume = volume_or_path
    t_read = time.perf_counter() - t_read
    common = dict(progress=reporter.progress, heatmap=kwargs["heatmap"], on_boxes=reporter.boxes if reporter.json else None)
    result = seg.segment_volume(volume, **common)
    result.timings["read"] = t_read
    reporter.close()
    t1 = time.perf_counter()
    if info is not None and getattr(args, "dicom_seg", False):
        from lsnet.io.dicom_seg import write_outputs_with_seg

        written = write_outputs_with_seg(result, info.files, outdir, **kwargs)
    else:
        written = write_outputs(result, outdir, **kwargs)
    result.timings["write"] = time.perf_counter() - t1
    return result, written, time.perf_counter() - t0


def cmd_segment(args, reporter: _Reporter) -> int:
    if not args.outdir:
        raise LSNetError("Give an output folder with -o/--output.")
    outdir = Path(args.outdir)
    from lsnet.app.batch import is_batch_input

    if is_batch_input(args.input, outdir, force=args.batch):
        return cmd_batch(args, outdir)
    result, written, secs = _run(args, args.input, outdir, reporter)
    line = summary_line(result, secs)
    reporter.emit({"event": "done", "outputs": {k: str(v) for k, v in written.items()}, "summary": _summary_dict(result, secs)})
    if not args.progress_json:
        print(f"lsnet: {line} -> {outdir}")
    return EXIT_OK


def cmd_batch(args, outroot: Path) -> int:
    """Batch mode (``lsnet.app.batch``): every case through :func:`_run`; summary table on stdout."""
    from lsnet.app import batch
    from lsnet.io.dicom_info import is_dicom_input

    src = Path(args.input)
    if src.is_file():
        cases = batch.read_csv_cases(src, outroot)
    else:
        cases = batch.discover_cases(src, outroot, skip=outroot)
    if not cases:
        raise LSNetError(f"No cases found in {src}: it holds no image files ({', '.join(batch.IMAGE_SUFFIXES)}) and no DICOM series.")
    segmenter = _make_segmenter(args)  # once: a weights/device problem stops the batch before any case
    json_lines = args.progress_json

    def process(case) -> dict:
        reporter = _Reporter(json_lines, args.quiet)
        case_args = copy.copy(args)
        case_args.dicom_seg = args.dicom_seg and is_dicom_input(case.input)  # only DICOM cases get a SEG
        try:
            result, written, _secs = _run(case_args, case.input, case.outdir, reporter,
                                          segmenter=segmenter)
        finally:
            reporter.close()
        return {"slices": int(result.mask.shape[0]), "rois": len(result.boxes), "voxels": result.num_voxels,
                "outputs": written}

    def on_row(row, n, total):
        if json_lines:
            _Reporter(True, True).emit({"event": "case", "index": n, "total": total, "case": row.case, "status": row.status,
                                        "message": row.message})
        elif not args.quiet:
            print(f"lsnet: [{n}/{total}] {row.case}: {row.status}" + (f" - {row.message}" if row.message else ""), file=sys.stderr)

    options = {"nifti": args.nifti, "heatmap": not args.no_heatmap, "dicom_seg": args.dicom_seg, "weights": str(args.weights)}
    try:
        rows = batch.run_batch(cases, process, outroot, resume=not args.overwrite, options=options, on_row=on_row)
    except (KeyboardInterrupt, CancelledError) as e:
        done = sum(1 for c in cases if batch.BatchState(outroot, options).is_done(c))
        raise CancelledError(
            f"Batch interrupted; the unfinished case left no files, {done} finished case(s) are kept. Run the same "
            f"command again to resume (summary: {outroot / batch.SUMMARY_NAME})."
        ) from e
    tally = batch.counts(rows)
    bad = tally.get("failed", 0) + tally.get("error", 0)
    if json_lines:
        _Reporter(True, True).emit({"event": "done", "outputs": {"summary": str(outroot / batch.SUMMARY_NAME)},
                                    "summary": {"cases": len(rows), **tally}})
    else:
        print(batch.format_table(rows))
        print(f"lsnet: {len(rows)} case(s): " + ", ".join(f"{v} {k}" for k, v in tally.items())
              + f"; summary in {outroot / batch.SUMMARY_NAME}")
    if tally.get("error"):
        return EXIT_INTERNAL
    return EXIT_USER if bad else EXIT_OK


def _summary_dict(result, secs: float) -> dict:
    return {
        "slices": int(result.mask.shape[0]),
        "rois": len(result.boxes),
        "voxels": result.num_voxels,
        "slices_with_mask": result.slices_with_mask,
        "seconds": round(secs, 3),
        "device": result.device,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "postprocess": dict(result.postprocess),
    }


def cmd_info(args) -> int:
    from lsnet.io.weights import default_weights_path, read_model_card

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
    if int(cfg.get("ensemble", 1) or 1) > 1:
        print(f"  ensemble     : {cfg['ensemble']} members averaged (heatmaps, box distances, mask probabilities)")
    if int(cfg.get("snet_width", 0) or 0):
        print(f"  S-Net width  : {cfg['snet_width']}")
    if int(cfg.get("box_snet_width", 0) or 0):
        print(f"  box prompts  : a box-prompt S-Net of width {cfg['box_snet_width']} per member segments user-drawn boxes")
    f = int(cfg.get("roi_source_factor", 1) or 1)
    source = f" sampled from a {float(cfg.get('spacing', 0)) / f:g} mm canvas" if f > 1 else ""
    print(f"  preprocessing: window {cfg.get('window')} HU, in-plane spacing {cfg.get('spacing')} mm, RoI {cfg.get('roi_size')} px{source}")
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

    from lsnet.app.overlay import render_overlay
    from lsnet.samples.sample_ct import CITATION, TRAINING_NOTE, load_sample_ct, sample_ct_paths

    outdir = Path(args.outdir or "lsnet-demo")
    ct_path, _ = sample_ct_paths()
    image, label = load_sample_ct()
    result, written, secs = _run(args, image, outdir, reporter)
    png = render_overlay(result, outdir / "overview.png", reference=label.array)
    inter = np.count_nonzero((result.mask > 0) & (label.array > 0))
    dsc = 2 * inter / max(1, np.count_nonzero(result.mask) + np.count_nonzero(label.array))
    reporter.emit({"event": "done", "outputs": {k: str(v) for k, v in written.items()}, "summary": _summary_dict(result, secs),
                   "dsc": round(float(dsc), 4)})
    if not args.progress_json:
        print(f"lsnet demo: sample CT {ct_path} ({CITATION})")
        print(f"lsnet demo: {summary_line(result, secs)}")
        print(f"lsnet demo: volume DSC against the manual label {dsc:.3f}; note: {TRAINING_NOTE}")
        print(f"lsnet demo: outputs in {outdir}/ (overview: {png.name}: orange outline = L-SNet, green = manual label)")
    return EXIT_OK


def cmd_web(args) -> int:
    """``lsnet web``: the web app lives outside the engine (``LSNetSegmentationWeb``, needs slicer-core).

    By default this process is the per-user gateway (``LSNetSegmentationWeb.gateway``: one app process per
    browser session); ``--single-session`` serves one scene from this process (``LSNetSegmentationWeb.app``).
    """
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken package
            return True

    missing = [name for name in ("trame_slicer", "aiohttp") if absent(name)]
    if missing:
        print(f"lsnet: error: lsnet web needs trame-slicer (missing: {', '.join(missing)}); install it with "
              "pip install 'lsnet-segmentation[web]'", file=sys.stderr)
        return EXIT_USER
    if args.single_session:
        from LSNetSegmentationWeb.app import serve  # imports slicer / trame: only here, never in the engine

        return serve(args.data_root, host=args.host, port=args.port, upload_limit_mb=args.upload_limit_mb,
                     device=args.device, exit_with_parent=args.exit_with_parent)
    from LSNetSegmentationWeb.gateway import serve_sessions  # aiohttp only; each session process imports slicer

    return serve_sessions(args.data_root, host=args.host, port=args.port, upload_limit_mb=args.upload_limit_mb,
                          device=args.device, max_sessions=args.max_sessions, idle_timeout_s=60 * args.idle_timeout_min)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings of the engine go to *this* stderr even when the caller (a test, a notebook, Slicer) has
    # configured the root logger: a handler on the "lsnet" logger for the duration of the command.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lsnet: %(levelname)s: %(message)s"))
    engine_log = logging.getLogger("lsnet")
    saved = (engine_log.level, engine_log.propagate)
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.INFO if args.debug else logging.WARNING)
    engine_log.propagate = False
    try:
        return _main(args)
    finally:
        engine_log.removeHandler(handler)
        engine_log.setLevel(saved[0])
        engine_log.propagate = saved[1]


def _main(args) -> int:
    reporter = _Reporter(getattr(args, "progress_json", False), getattr(args, "quiet", False))
    try:
        if args.command == "info":
            return cmd_info(args)
        if args.command == "segment":
            return cmd_segment(args, reporter)
        if args.command == "demo":
            return cmd_demo(args, reporter)
        if args.command == "web":
            return cmd_web(args)
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
