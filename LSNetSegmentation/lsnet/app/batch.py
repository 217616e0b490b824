"""Batch mode: many cases, one after the other, with a summary table; continues after failures; resumable.

Cases come from

* a **folder**: every image file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) and
  every DICOM series found in it or its sub-folders is one case (the output root is skipped when it lies
  inside the folder, and so are hidden files);
* a **CSV** file with a header row and the columns ``input`` and optionally ``output``; relative paths are
  relative to the CSV's folder.  ``output`` defaults to ``<output root>/<case name>``.

Each case is written to its own folder (``<output root>/<case name>/``) by the caller's ``process``
function (the CLI's single-case pipeline, so batch and single runs give identical files).

Resume: after every case the state file ``<output root>/lsnet-batch-state.json`` records its status,
numbers, output files and an input signature (size and mtime).  A later run skips a case whose state is
``done``, whose output files all still exist and whose input is unchanged (``resume=False`` / the CLI's
``--overwrite`` re-runs everything).  ``summary.csv`` holds the table of the last run.  Both files are
written to a temporary name and renamed, so an interrupted run never leaves them half written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from lsnet.errors import CancelledError, InputError, LSNetError
from lsnet.io.volume import _dicom_series_in

logger = logging.getLogger(__name__)

STATE_NAME = "lsnet-batch-state.json"
SUMMARY_NAME = "summary.csv"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
COLUMNS = ("case", "status", "slices", "rois", "voxels", "seconds", "message")


@dataclass
class Case:
    """One input of a batch: ``name`` (unique, also the output sub-folder), ``input`` (file, or a file of
    the DICOM series), ``outdir``; ``kind`` is ``image`` or ``dicom``."""

    name: str
    input: Path
    outdir: Path
    kind: str = "image"
    dicom_dir: Optional[Path] = None
    num_files: int = 1


@dataclass
class CaseRow:
    """One row of the summary table."""

    case: str
    status: str  # done, skipped, failed, error, cancelled, not run
    slices: Optional[int] = None
    rois: Optional[int] = None
    voxels: Optional[int] = None
    seconds: Optional[float] = None
    message: str = ""
    outputs: dict = field(default_factory=dict)

    def cells(self) -> list:
        def fmt(v):
            if v is None:
                return ""
            return f"{v:.1f}" if isinstance(v, float) else str(v)

        return [fmt(getattr(self, c)) for c in COLUMNS]


# --------------------------------------------------------------------------------------------------
# discovering cases
# --------------------------------------------------------------------------------------------------
def image_suffix(path: Path) -> str:
    """The image suffix of ``path`` (``.nii.gz`` counts as one), or ``""``."""
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def _stem(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _inside(path: Path, root: Optional[Path]) -> bool:
    if root is None:
        return False
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _dicom_series(directory: Path) -> list:
    """``[(series uid, files)]`` directly in ``directory``, largest first (GDCM warnings silenced)."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        found = [(uid, files) for _d, uid, files in _dicom_series_in(directory)]
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
    return sorted(found, key=lambda s: -len(s[1]))


def _unique(name: str, taken: set) -> str:
    base, n = name, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def discover_cases(folder, outroot, skip: Optional[Path] = None) -> list:
    """Cases of a folder (see the module docstring), sorted by path; ``skip`` (e.g. the output root) and
    hidden entries are ignored."""
    folder, outroot = Path(folder), Path(outroot)
    cases: list = []
    taken: set = set()
    seen: set = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        rootp = Path(root)
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _inside(rootp / d, skip))
        rel_dir = rootp.relative_to(folder)
        non_image = False
        for f in sorted(files):
            p = rootp / f
            if f.startswith("."):
                continue
            if image_suffix(p):
                name = _unique((rel_dir / _stem(p)).as_posix(), taken)
                cases.append(Case(name, p, outroot / name, "image"))
            else:
                non_image = True
        if non_image:
            series = _dicom_series(rootp)
            for n, (uid, sfiles) in enumerate(series, start=1):
                base = rel_dir.as_posix() if str(rel_dir) != "." else folder.name
                if len(series) > 1:
                    base = f"{base}/series{n}"
                name = _unique(base, taken)
                cases.append(Case(name, Path(sfiles[0]), outroot / name, "dicom", rootp, len(sfiles)))
    return cases


def read_csv_cases(csv_path, outroot) -> list:
    """Cases of a CSV (columns ``input`` and optional ``output``); raises :class:`InputError` when the
    CSV is unusable (no ``input`` column, no rows)."""
    csv_path, outroot = Path(csv_path), Path(outroot)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"Cannot read the case list {csv_path}: {e}.") from e
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "input" not in fields:
        raise InputError(
            f"{csv_path} needs a header row with an 'input' column (and optionally 'output'); found columns {fields}."
        )
    cases: list = []
    taken: set = set()
    for row in reader:
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not row.get("input"):
            continue
        inp = Path(row["input"]).expanduser()
        if not inp.is_absolute():
            inp = csv_path.parent / inp
        base = _stem(inp) if image_suffix(inp) else inp.name or "case"
        name = _unique(base, taken)
        if row.get("output"):
            out = Path(row["output"]).expanduser()
            out = out if out.is_absolute() else csv_path.parent / out
        else:
            out = outroot / name
        cases.append(Case(name, inp, out, "dicom" if inp.is_dir() or not image_suffix(inp) else "image"))
    if not cases:
        raise InputError(f"{csv_path} lists no cases (no row with a value in the 'input' column).")
    return cases


def is_batch_input(path, outroot=None, force: bool = False) -> bool:
    """True for a CSV, and for a folder with several cases -- unless they are all DICOM series of one
    directory (one scan folder with a localizer etc.: read as one case, the largest series, with a warning).
    ``force`` makes any folder a batch."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".csv":
        return True
    if not p.is_dir():
        return False
    cases = discover_cases(p, outroot or p, skip=Path(outroot) if outroot else None)
    if force:
        return True
    if len(cases) <= 1:
        return False
    return not (all(c.kind == "dicom" for c in cases) and len({c.dicom_dir for c in cases}) == 1)


# --------------------------------------------------------------------------------------------------
# state (resume)
# --------------------------------------------------------------------------------------------------
def _signature(case: Case, options: Optional[dict] = None) -> dict:
    """What must not change for a done case to be skipped: the input file (size, mtime) and the options."""
    sig = {"input": str(case.input), "files": case.num_files, "options": dict(options or {})}
    try:
        st = case.input.stat()
        sig.update(input=str(case.input.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
    except OSError:
        sig["missing"] = True
    return sig


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".lsnet-tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class BatchState:
    """The resume state file of an output root."""

    def __init__(self, outroot, options: Optional[dict] = None):
        self.options = dict(options or {})
        self.path = Path(outroot) / STATE_NAME
        self.cases: dict = {}
        if self.path.is_file():
            try:
                self.cases = dict(json.loads(self.path.read_text(encoding="utf-8")).get("cases", {}))
            except (OSError, ValueError, AttributeError):
                logger.warning("batch state file %s is unreadable; starting afresh (all cases run)", self.path)
                self.cases = {}

    def is_done(self, case: Case) -> bool:
        rec = self.cases.get(case.name)
        if not rec or rec.get("status") != "done" or rec.get("signature") != _signature(case, self.options):
            return False
        return all(Path(p).is_file() for p in (rec.get("outputs") or {}).values())

    def previous_row(self, case: Case) -> CaseRow:
        rec = self.cases[case.name]
        return CaseRow(case.name, "skipped", rec.get("slices"), rec.get("rois"), rec.get("voxels"), rec.get("seconds"),
                       "done in a previous run", rec.get("outputs") or {})

    def record(self, case: Case, row: CaseRow) -> None:
        rec = asdict(row)
        rec["signature"] = _signature(case, self.options)
        rec["outdir"] = str(case.outdir)
        self.cases[case.name] = rec
        _atomic_write_text(self.path, json.dumps({"version": 1, "cases": self.cases}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------
ProcessFn = Callable[[Case], dict]
"""Runs one case; returns ``{"slices", "rois", "voxels", "outputs": {key: path}}``; raises on failure."""


def run_batch(
    cases: Iterable[Case],
    process: ProcessFn,
    outroot,
    *,
    resume: bool = True,
    options: Optional[dict] = None,
    on_row: Optional[Callable[[CaseRow, int, int], None]] = None,
) -> list:
    """Process ``cases`` one by one; returns the summary rows (one per case, in order).

    ``options`` (JSON-able, e.g. which outputs were asked for) are part of each case's resume signature:
    a case done with other options is run again.  A case failing with an :class:`LSNetError` is ``failed``, with any other exception ``error`` (a bug;
    its message is kept), and the batch goes on.  Ctrl-C / :class:`CancelledError` stops the batch: the
    current case is ``cancelled``, the rest ``not run``; the state is saved and the exception re-raised
    after the summary has been written.
    """
    cases = list(cases)
    outroot = Path(outroot)
    state = BatchState(outroot, options)
    rows: list = []
    stop: Optional[BaseException] = None
    for n, case in enumerate(cases, start=1):
        if stop is not None:
            rows.append(CaseRow(case.name, "not run", message="batch was cancelled"))
            continue
        if resume and state.is_done(case):
            row = state.previous_row(case)
        else:
            t0 = time.perf_counter()
            try:
                out = process(case)
                row = CaseRow(case.name, "done", out.get("slices"), out.get("rois"), out.get("voxels"),
                              time.perf_counter() - t0, out.get("message", ""),
                              {k: str(v) for k, v in (out.get("outputs") or {}).items()})
            except (CancelledError, KeyboardInterrupt) as e:
                row = CaseRow(case.name, "cancelled", seconds=time.perf_counter() - t0,
                              message=str(e) or "interrupted; nothing was written for this case")
                stop = e
            except LSNetError as e:
                row = CaseRow(case.name, "failed", seconds=time.perf_counter() - t0, message=str(e))
            except Exception as e:  # a bug in one case must not stop the others
                logger.debug("case %s failed with an internal error", case.name, exc_info=True)
                row = CaseRow(case.name, "error", seconds=time.perf_counter() - t0,
                              message=f"internal error: {type(e).__name__}: {e}")
            state.record(case, row)
        rows.append(row)
        if on_row is not None:
            on_row(row, n, len(cases))
    write_summary_csv(rows, outroot / SUMMARY_NAME)
    if stop is not None:
        raise stop
    return rows


def write_summary_csv(rows: list, path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(r.cells())
    _atomic_write_text(path, buf.getvalue())


def format_table(rows: list, max_message: int = 90) -> str:
    """The summary as a fixed-width text table (what the CLI prints)."""
    header = [c.upper() if c != "rois" else "RoIs" for c in COLUMNS]
    body = []
    for r in rows:
        cells = r.cells()
        msg = cells[-1].replace("\n", " ")
        cells[-1] = msg if len(msg) <= max_message else msg[: max_message - 3] + "..."
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    right = {2, 3, 4, 5}

    def line(cells):
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def counts(rows: list) -> dict:
    out: dict = {}
    for r in rows:
        out[r.status] = out.get(r.status, 0) + 1
    return out
