"""Loaders for the data layouts users have; every one yields :class:`Case` objects with a patient id.

A :class:`Case` is a light, picklable description (ids, source files, options); ``case.load()``
reads it into a :class:`CaseData` in CANONICAL orientation (arrays ``[k, j, i]``, anterior at the top
row, patient right on the image left; see docs/conventions.md) with a binary label.

Layouts (``cases_from_spec({"type": ..., ...})``):

``slices2d``
    Folders of 2-D image + mask files with the same names, like ``../shared/data/pancreas-ct-slices``
    (``images/PANCREAS_NNNN-1ZZZ.jpg`` + ``masks/...``).  Facts of that set, used as defaults: the gray
    value IS the HU value clipped to [0, 255] (``hu_offset`` = 0), rows are in DICOM pixel order (spine
    at the top) and are flipped to canonical (``flip_rows``), masks are JPEG so foreground is
    ``> mask_threshold`` (127).  The pixel spacing is not stored in the files (0.66-0.98 mm in that
    collection); we assume a nominal ``pixel_spacing_mm`` = 0.8 mm (configurable).  Slices are
    isolated (no neighbours): a 2.5-D model sees the centre slice repeated.  One case per file.
``tcia``
    The TCIA Pancreas-CT download: ``PANCREAS_NNNN/<study>/<series>/*.dcm`` per patient plus
    ``labels/labelNNNN.nii.gz`` (``root`` may hold both, or give ``labels`` separately).
``msd``
    Medical Segmentation Decathlon or nnU-Net raw: ``dataset.json`` + ``imagesTr`` + ``labelsTr``
    (MSD: ``training`` list; nnU-Net v2: ``<case>_0000<file_ending>`` channel files).
``list``
    A CSV (columns ``image``, ``label`` and optionally ``patient_id``) or JSON (a list of such objects or
    ``{"cases": [...]}``) of image/label pairs; relative paths are relative to the list file.  Images
    may be volumes (anything SimpleITK reads, or a DICOM folder) or 2-D image files.
``phantom``
    ``count`` synthetic CTs from :mod:`lsnet.samples.phantom` (seeds ``seed``, ``seed+1``, ...).

Multi-label maps: ``label_values`` (list of ints) or ``label_name`` (looked up in MSD/nnU-Net
``dataset.json``) chooses which label values form the foreground; default: every non-zero value.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from lsnet.errors import InputError

log = logging.getLogger(__name__)

SLICE_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DEFAULT_SLICE_SPACING_MM = 0.8
"""Nominal in-plane spacing assumed for 2-D slice files (they do not store it). The NIH slices come
from scans of 0.66-0.98 mm; 0.8 mm is the middle of that range."""
DEFAULT_PATIENT_REGEX = r"(PANCREAS_\d+)"
DEFAULT_SLICE_REGEX = r"-1(\d{3})$"
"""NIH slice names end in ``-1ZZZ`` with ZZZ the DICOM instance number (= source label z index + 1, in
the DICOM/raw slice order); ``slice_number`` stores ZZZ - 1."""


@dataclass
class CaseData:
    """One case read into memory, canonical orientation.

    Attributes:
        image: HU values ``(K, J, I)`` (int16 or float32).
        label: binary foreground ``(K, J, I)`` uint8 in {0, 1}.
        spacing: ``(sx, sy, sz)`` mm (ITK order); ``sz`` is NaN for isolated 2-D slices.
        slice_numbers: index of each slice in its source (canonical k for volumes, the file's slice
            number for 2-D files, or -1 when unknown).
        contiguous: True when slice k-1 and k+1 are the anatomical neighbours of slice k (2.5-D).
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple
    slice_numbers: list
    contiguous: bool


@dataclass(frozen=True)
class Case:
    """A case to load: ``kind`` in {"slice2d", "volume", "phantom"}, ``sources`` the files it reads
    (their size/mtime/content decide whether a cached copy is still valid), ``options`` how to read."""

    case_id: str
    patient_id: str
    kind: str
    sources: tuple
    options: dict = field(default_factory=dict, hash=False, compare=False)

    def load(self) -> CaseData:
        if self.kind == "slice2d":
            return _load_slice2d(self)
        if self.kind == "volume":
            return _load_volume_case(self)
        if self.kind == "phantom":
            return _load_phantom(self)
        raise ValueError(f"unknown case kind {self.kind!r}")

    def describe(self) -> dict:
        """JSON-able identity of the case (used as part of the cache key)."""
        return {"case_id": self.case_id, "patient_id": self.patient_id, "kind": self.kind,
                "sources": list(self.sources), "options": _jsonable(self.options)}


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in sorted(d.items())}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, Path):
        return str(d)
    if isinstance(d, (np.integer,)):
        return int(d)
    if isinstance(d, (np.floating,)):
        return float(d)
    return d


# ------------------------------------------------------------------------------------------------
# label value selection
# ------------------------------------------------------------------------------------------------
def select_labels(label: np.ndarray, label_values: Optional[Sequence[int]]) -> np.ndarray:
    """Binary uint8 foreground: ``label`` in ``label_values`` (all non-zero values when None)."""
    if label_values is None:
        return (label > 0).astype(np.uint8)
    return np.isin(label, np.asarray(list(label_values), dtype=label.dtype if label.dtype.kind in "iu" else np.int64)).astype(np.uint8)


def _label_values_from_name(dataset_json: dict, name: str) -> list:
    """Look ``name`` up (case-insensitive) in the ``labels`` of an MSD (``{"1": "pancreas"}``) or nnU-Net v2
    (``{"pancreas": 1}`` or ``{"pancreas": [1, 2]}``) dataset.json."""
    labels = dataset_json.get("labels", {})
    want = name.strip().lower()
    found = []
    for k, v in labels.items():
        if isinstance(v, str) and v.strip().lower() == want and str(k).lstrip("-").isdigit():
            found.append(int(k))  # MSD
        elif str(k).strip().lower() == want:
            found.extend(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))  # nnU-Net v2
    if not found:
        raise InputError(f"label name {name!r} not in dataset.json labels {labels}; pass label_values instead")
    return sorted(set(found))


# ------------------------------------------------------------------------------------------------
# 2-D slice files
# ------------------------------------------------------------------------------------------------
def read_slice_file(path: Path, flip_rows: bool, hu_offset: float = 0.0) -> np.ndarray:
    """A 2-D image file as float32 ``(J, I)``: first channel + ``hu_offset``, rows flipped if asked."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image file {path}: {e}") from e
    if a.ndim == 3:
        a = a[..., 0]
    if a.ndim != 2:
        raise InputError(f"{path} is not a 2-D image (shape {a.shape})")
    a = a.astype(np.float32) + np.float32(hu_offset)
    return a[::-1].copy() if flip_rows else a


def _load_slice2d(case: Case) -> CaseData:
    o = case.options
    img_path, mask_path = Path(case.sources[0]), Path(case.sources[1])
    img = read_slice_file(img_path, o.get("flip_rows", True), o.get("hu_offset", 0.0))
    m = read_slice_file(mask_path, o.get("flip_rows", True))
    if m.shape != img.shape:
        raise InputError(f"mask {mask_path} has shape {m.shape}, image {img_path} has {img.shape}")
    thr = o.get("mask_threshold", 127)
    lv = o.get("label_values")
    lab = (m > thr).astype(np.uint8) if lv is None else select_labels(m.astype(np.int64), lv)
    s = float(o.get("pixel_spacing_mm", DEFAULT_SLICE_SPACING_MM))
    return CaseData(img[None], lab[None], (s, s, math.nan), [int(o.get("slice_number", -1))], False)


def _patient_from_name(stem: str, regex: str) -> str:
    m = re.search(regex, stem)
    if m:
        return m.group(1)
    parts = re.split(r"[-_](?=[^-_]*$)", stem)
    return parts[0] if len(parts) == 2 and parts[0] else stem


def slices2d_cases(
    root,
    images: str = "images",
    masks: str = "masks",
    pixel_spacing_mm: float = DEFAULT_SLICE_SPACING_MM,
    flip_rows: bool = True,
    mask_threshold: float = 127,
    hu_offset: float = 0.0,
    patient_regex: str = DEFAULT_PATIENT_REGEX,
    label_values: Optional[Sequence[int]] = None,
    slice_regex: Optional[str] = DEFAULT_SLICE_REGEX,
) -> list:
    """Cases of a 2-D slice set (see the module docstring for the defaults and why)."""
    root = Path(root)
    idir, mdir = root / images, root / masks
    if not idir.is_dir() or not mdir.is_dir():
        raise InputError(f"2-D slice set {root} needs folders {images}/ and {masks}/ with the same file names")
    cases = []
    for p in sorted(idir.iterdir()):
        if p.suffix.lower() not in SLICE_IMAGE_SUFFIXES:
            continue
        mp = mdir / p.name
        if not mp.exists():
            cands = [q for q in mdir.glob(p.stem + ".*") if q.suffix.lower() in SLICE_IMAGE_SUFFIXES]
            if not cands:
                log.warning("no mask for %s; skipped", p)
                continue
            mp = cands[0]
        num = re.search(slice_regex, p.stem) if slice_regex else None
        cases.append(Case(
            case_id=p.stem,
            patient_id=_patient_from_name(p.stem, patient_regex),
            kind="slice2d",
            sources=(str(p.resolve()), str(mp.resolve())),
            options={"pixel_spacing_mm": float(pixel_spacing_mm), "flip_rows": bool(flip_rows),
                     "mask_threshold": float(mask_threshold), "hu_offset": float(hu_offset),
                     "slice_number": int(num.group(1)) - 1 if num else -1,
                     "label_values": None if label_values is None else [int(v) for v in label_values]},
        ))
    if not cases:
        raise InputError(f"no image/mask pairs found in {idir} and {mdir}")
    return cases


# ------------------------------------------------------------------------------------------------
# volumes (DICOM series, NIfTI, NRRD, ...)
# ------------------------------------------------------------------------------------------------
def read_canonical_case(image_path, label_path, label_values=None):
    """Read an image (file or DICOM folder) and its label map, both in canonical orientation.

    Uses the engine's readers (:func:`lsnet.io.volume.read_volume`, :func:`lsnet.io.volume.read_label`, which
    resamples the label onto the image grid with nearest neighbour when the grids differ) and
    :func:`lsnet.io.geometry.to_canonical`.  Returns ``(image (K, J, I), binary label (K, J, I) uint8,
    canonical spacing (sx, sy, sz))``.
    """
    from lsnet.io.geometry import to_canonical
    from lsnet.io.volume import read_label, read_volume

    vol = read_volume(image_path)
    single = label_values is not None and len(label_values) == 1
    lab = read_label(label_path, reference=vol, label_value=int(label_values[0]) if single else None)
    can, reo = to_canonical(vol)
    lab_c = reo.to_canonical_array(lab.array)
    fg = lab_c.astype(np.uint8) if single else select_labels(np.asarray(lab_c), label_values)
    arr = np.ascontiguousarray(can.array)
    if arr.dtype not in (np.int16, np.float32):
        arr = arr.astype(np.float32)
    return arr, np.ascontiguousarray(fg), tuple(float(v) for v in can.spacing)


def _load_volume_case(case: Case) -> CaseData:
    img_path, lab_path = Path(case.sources[0]), Path(case.sources[1])
    if img_path.suffix.lower() in SLICE_IMAGE_SUFFIXES:
        return _load_slice2d(case)
    arr, fg, spacing = read_canonical_case(img_path, lab_path, case.options.get("label_values"))
    return CaseData(arr, fg, spacing, list(range(arr.shape[0])), True)


def _volume_case(case_id, patient_id, image: Path, label: Path, label_values) -> Case:
    # the first two sources are always (image, label) as given; DICOM file lists follow
    srcs = (str(image.resolve()), str(label.resolve()))
    if image.is_dir():
        srcs = srcs + tuple(sorted(str(f.resolve()) for f in image.rglob("*") if f.is_file()))
    return Case(case_id=case_id, patient_id=patient_id, kind="volume", sources=srcs,
                options={"label_values": None if label_values is None else [int(v) for v in label_values]})


def tcia_cases(root, labels: Optional[str] = None, label_values: Optional[Sequence[int]] = None) -> list:
    """TCIA Pancreas-CT layout: ``PANCREAS_NNNN/**/*.dcm`` + ``labels/labelNNNN.nii.gz``."""
    root = Path(root)
    ldir = Path(labels) if labels else root / "labels"
    pats = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"PANCREAS_\d+", p.name)) if root.is_dir() else []
    if not pats:
        raise InputError(f"no PANCREAS_NNNN patient folders in {root} (TCIA Pancreas-CT layout expected)")
    cases = []
    for p in pats:
        num = p.name.split("_")[1]
        lab = None
        for cand in (ldir / f"label{num}.nii.gz", ldir / f"label{num}.nii", ldir / f"label{int(num):04d}.nii.gz"):
            if cand.exists():
                lab = cand
                break
        if lab is None:
            log.warning("no label for %s in %s; skipped", p.name, ldir)
            continue
        dcm_dirs = sorted({f.parent for f in p.rglob("*.dcm")})
        if not dcm_dirs:
            log.warning("no DICOM files under %s; skipped", p)
            continue
        series = max(dcm_dirs, key=lambda d: sum(1 for _ in d.glob("*.dcm")))
        cases.append(_volume_case(p.name, p.name, series, lab, label_values))
    if not cases:
        raise InputError(f"no patient in {root} has both a DICOM series and a label in {ldir}")
    return cases


def msd_cases(root, label_values: Optional[Sequence[int]] = None, label_name: Optional[str] = None) -> list:
    """Medical Segmentation Decathlon or nnU-Net (v1/v2) raw dataset folder."""
    root = Path(root)
    dj_path = root / "dataset.json"
    dj = json.loads(dj_path.read_text()) if dj_path.exists() else {}
    if label_name is not None:
        label_values = _label_values_from_name(dj, label_name)
    pairs = []
    if dj.get("training"):
        for e in dj["training"]:
            img = (root / e["image"]).resolve()
            lab = (root / e["label"]).resolve()
            if not img.exists():  # nnU-Net v1 lists "x.nii.gz" but stores "x_0000.nii.gz"
                alt = img.parent / (img.name.replace(".nii.gz", "_0000.nii.gz"))
                img = alt if alt.exists() else img
            pairs.append((img, lab))
    else:
        ending = dj.get("file_ending", ".nii.gz")
        ldir = root / "labelsTr"
        for lab in sorted(ldir.glob("*" + ending)):
            case = lab.name[: -len(ending)]
            img = root / "imagesTr" / f"{case}_0000{ending}"
            if not img.exists():
                img = root / "imagesTr" / lab.name
            pairs.append((img, lab))
    cases = []
    for img, lab in pairs:
        if not img.exists() or not lab.exists():
            log.warning("missing %s or %s; skipped", img, lab)
            continue
        cid = re.sub(r"(_0000)?\.(nii\.gz|nii|nrrd|mha|mhd)$", "", img.name)
        cases.append(_volume_case(cid, cid, img, lab, label_values))
    if not cases:
        raise InputError(f"no image/label pairs found in {root} (expected dataset.json, imagesTr/, labelsTr/)")
    return cases


def list_cases(path, label_values: Optional[Sequence[int]] = None, **slice_options) -> list:
    """Cases from a CSV or JSON list of ``image``/``label`` (optional ``patient_id``) entries."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"case list {path} does not exist")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        rows = data["cases"] if isinstance(data, dict) else data
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    cases = []
    for n, r in enumerate(rows):
        if "image" not in r or "label" not in r:
            raise InputError(f"{path}: entry {n} needs 'image' and 'label' (has {sorted(r)})")
        img = Path(r["image"]) if os.path.isabs(r["image"]) else path.parent / r["image"]
        lab = Path(r["label"]) if os.path.isabs(r["label"]) else path.parent / r["label"]
        if not img.exists() or not lab.exists():
            raise InputError(f"{path}: entry {n}: {img if not img.exists() else lab} does not exist")
        stem = re.sub(r"\.(nii\.gz|nii|nrrd|mha|mhd|jpg|jpeg|png|bmp|tif|tiff)$", "", img.name, flags=re.I)
        pid = str(r.get("patient_id") or stem)
        c = _volume_case(f"{pid}/{stem}" if r.get("patient_id") else stem, pid, img, lab, label_values)
        if img.suffix.lower() in SLICE_IMAGE_SUFFIXES:
            opts = {"pixel_spacing_mm": DEFAULT_SLICE_SPACING_MM, "flip_rows": False, "mask_threshold": 127,
                    "hu_offset": 0.0, "slice_number": -1, "label_values": c.options["label_values"]}
            opts.update(slice_options)
            c = Case(c.case_id, c.patient_id, "slice2d", c.sources[:2], opts)
        cases.append(c)
    if not cases:
        raise InputError(f"case list {path} is empty")
    return cases


# ------------------------------------------------------------------------------------------------
# phantoms
# ------------------------------------------------------------------------------------------------
def _load_phantom(case: Case) -> CaseData:
    from lsnet.samples.phantom import make_phantom

    o = case.options
    p = make_phantom(tuple(o["shape"]), tuple(o["spacing"]), int(o["seed"]), o.get("target_scale"))
    return CaseData(p.array, p.label, p.spacing, list(range(p.array.shape[0])), True)


def phantom_cases(count: int, seed: int = 0, shape=(48, 160, 160), spacing=(2.0, 2.0, 2.5),
                  target_scale: Optional[float] = None) -> list:
    """``count`` synthetic CTs (one patient each, ids ``phantom_<seed>``)."""
    return [Case(case_id=f"phantom_{s}", patient_id=f"phantom_{s}", kind="phantom", sources=(),
                 options={"seed": int(s), "shape": [int(v) for v in shape], "spacing": [float(v) for v in spacing],
                          "target_scale": target_scale})
            for s in range(int(seed), int(seed) + int(count))]


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------
_BUILDERS = {"slices2d": slices2d_cases, "tcia": tcia_cases, "msd": msd_cases, "nnunet": msd_cases,
             "list": list_cases, "phantom": phantom_cases}


def cases_from_spec(spec: dict) -> list:
    """Cases of one dataset spec ``{"type": <layout>, <arguments of that layout's function>}``.

    Keys ``root``/``path`` may use ``{shared}`` for the shared data folder (``<project>/../shared/data``).
    """
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in _BUILDERS:
        raise InputError(f"dataset type {kind!r} unknown; use one of {sorted(_BUILDERS)}")
    spec.pop("name", None)
    for key in ("root", "path", "labels"):
        if isinstance(spec.get(key), str):
            spec[key] = spec[key].replace("{shared}", str(shared_data_dir()))
    try:
        return _BUILDERS[kind](**spec)
    except TypeError as e:
        raise InputError(f"bad options for dataset type {kind!r}: {e}") from e


def cases_from_specs(specs: Iterable[dict]) -> list:
    """All cases of several specs; case ids must stay unique."""
    out, seen = [], set()
    for s in specs:
        for c in cases_from_spec(s):
            if c.case_id in seen:
                raise InputError(f"case id {c.case_id!r} appears in two datasets; give them distinct ids")
            seen.add(c.case_id)
            out.append(c)
    return out


def shared_data_dir() -> Path:
    """``$LSNET_SHARED_DATA`` or ``<project root>/../shared/data`` (the read-only real data; may be absent)."""
    env = os.environ.get("LSNET_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "data"
