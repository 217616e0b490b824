"""Preprocess every case once into a memory-mapped slice cache on disk.

For each case: canonical axial slices are windowed and resampled in-plane to the model's pixel size
with the engine's own preprocessing (:func:`lsnet.pipeline.preprocess.window`, :func:`lsnet.pipeline.preprocess.slice_grid`,
:func:`lsnet.pipeline.preprocess.to_canvas`; exactly what inference does), and stored as

    <cache>/<case dir>/image.npy   uint8 (K, Hc, Wc)  round(255 * windowed [0, 1]), zero-padded canvas
    <cache>/<case dir>/label.npy   uint8 (K, Hc, Wc)  binary foreground on the same canvas
    <cache>/<case dir>/meta.json   fingerprint of the sources, parameters, per-slice index

uint8 images: with the default [0, 255] HU window the stored value is the (resampled) HU clipped to
[0, 255] rounded to 1 HU - what the 2-D NIH JPEG slices hold anyway - and the cache is 4x smaller than
float32, small enough to carry to a GPU machine.  Readers divide by 255 (:data:`IMAGE_SCALE`).

plus ``<cache>/index.json`` collecting every case's per-slice records: patient id, ``slice_number``,
``fg`` (has foreground), ``bbox`` = tight foreground box ``(x0, y0, x1, y1)`` in canvas edge coordinates
(null when empty), and ``nb`` = the cache rows of the neighbours ``(k-1, k+1)`` (clamped at the ends;
the slice itself for isolated 2-D slices) used for 2-D-and-a-half input.  Boxes and regression targets
are recomputed from the (augmented) mask at training time, so the cache stores masks, not targets.

Resumable: each case is written to a temporary folder and renamed when complete; a rerun skips the
cases whose entry is valid.  Invalidation: an entry is rebuilt when the preprocessing parameters or the
case's options change, or when a source file changed: a different size, or a different modification
time AND a different SHA-1 of its content (touching a file without changing it keeps the entry).
Verification on load (:meth:`SliceCache.open`): array headers (shape, dtype) must match the metadata;
``verify="full"`` also re-hashes the cached arrays.

A cache is usable without its sources: :meth:`SliceCache.open` needs only the folder (training with
``data.from_cache``).  :meth:`SliceCache.pack` writes a compressed copy (``arrays.npz`` per case, a few
MB for the shared NIH data) for moving it to another machine; opening a packed cache unpacks each case
to ``.npy`` once, in place, so it is memory-mapped from then on.  Builds take a lock file, so several
training processes can share one cache folder.

Command line::

    python -m training.cache build --config training/configs/lsnet_paper.json [--set ...] [--phantoms N]
    python -m training.cache pack runs/cache .cache/nih_packed
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from lsnet.errors import InputError

from .datasets import Case

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
IMAGE_SCALE = 255.0
"""Stored image value = round(IMAGE_SCALE * windowed intensity in [0, 1])."""
CHUNK = 16  # slices resampled at once (bounds temporary memory)


# ------------------------------------------------------------------------------------------------
# fingerprints
# ------------------------------------------------------------------------------------------------
def file_sha1(path, block: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def source_fingerprint(path) -> dict:
    """``{"path", "size", "mtime_ns", "sha1"}`` of one source file (a folder: hash of its file list)."""
    p = Path(path)
    if p.is_dir():
        names = sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
        return {"path": str(p), "size": len(names), "mtime_ns": 0,
                "sha1": hashlib.sha1("\n".join(names).encode()).hexdigest()}
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": file_sha1(p)}


def source_changed(old: dict) -> bool:
    """True when the file behind fingerprint ``old`` no longer matches it (see the module docstring)."""
    p = Path(old["path"])
    if not p.exists():
        return True
    if p.is_dir():
        return source_fingerprint(p)["sha1"] != old["sha1"]
    st = p.stat()
    if st.st_size != old["size"]:
        return True
    if st.st_mtime_ns == old["mtime_ns"]:
        return False
    return file_sha1(p) != old["sha1"]


def _array_sha1(path) -> str:
    return file_sha1(path)


# ------------------------------------------------------------------------------------------------
# preprocessing of one case
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheParams:
    """Preprocessing parameters (from :class:`lsnet.config.ModelConfig`): HU window, in-plane pixel size
    (mm), canvas multiple."""

    window: tuple
    spacing: float
    pad_multiple: int = 32

    def to_dict(self) -> dict:
        return {"window": [float(v) for v in self.window], "spacing": float(self.spacing),
                "pad_multiple": int(self.pad_multiple), "format": CACHE_FORMAT}

    @classmethod
    def from_model_config(cls, mc) -> "CacheParams":
        """The canvas the network input is cut from: L-Net's, or with ``mc.roi_source_factor = f`` the
        ``f`` times finer RoI-source canvas (as ``lsnet.pipeline.inference.Segmenter._grid``)."""
        return cls(tuple(float(v) for v in mc.window), float(mc.roi_source_spacing), int(mc.pad_multiple) * int(mc.roi_source_factor))


def tight_box(mask: np.ndarray) -> Optional[list]:
    """Tight box ``[x0, y0, x1, y1]`` (edge coordinates: pixel p spans [p, p+1)) of a 2-D mask, or None."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _case_dir_name(case_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", case_id)[:80]
    return f"{safe}-{hashlib.sha1(case_id.encode()).hexdigest()[:8]}"


def preprocess_case(case: Case, params: CacheParams, out_dir: Path) -> dict:
    """Write ``image.npy``/``label.npy`` of one case into ``out_dir`` and return its metadata."""
    import torch

    from lsnet.pipeline.preprocess import slice_grid, to_canvas, window

    data = case.load()
    K, J, I = data.image.shape
    sx, sy = float(data.spacing[0]), float(data.spacing[1])
    grid = slice_grid((J, I), (sx, sy), params.spacing, params.pad_multiple)
    Hc, Wc = grid.canvas_hw
    out_dir.mkdir(parents=True, exist_ok=True)
    img_mm = np.lib.format.open_memmap(out_dir / "image.npy", mode="w+", dtype=np.uint8, shape=(K, Hc, Wc))
    lab_mm = np.lib.format.open_memmap(out_dir / "label.npy", mode="w+", dtype=np.uint8, shape=(K, Hc, Wc))
    slices = []
    with torch.no_grad():
        for k0 in range(0, K, CHUNK):
            k1 = min(K, k0 + CHUNK)
            hu = torch.from_numpy(np.ascontiguousarray(data.image[k0:k1]).astype(np.float32))[:, None]
            img = to_canvas(window(hu, params.window), grid)[:, 0]
            lab = to_canvas(torch.from_numpy(np.ascontiguousarray(data.label[k0:k1]).astype(np.float32))[:, None], grid)[:, 0]
            img_mm[k0:k1] = img.clamp_(0, 1).mul_(IMAGE_SCALE).round_().numpy().astype(np.uint8)
            lab_np = (lab >= 0.5).numpy().astype(np.uint8)
            lab_mm[k0:k1] = lab_np
            for k in range(k0, k1):
                box = tight_box(lab_np[k - k0])
                if data.contiguous:
                    nb = [max(k - 1, 0), min(k + 1, K - 1)]
                else:
                    nb = [k, k]
                slices.append({"k": k, "slice_number": int(data.slice_numbers[k]), "fg": box is not None,
                               "bbox": box, "nb": nb})
    img_mm.flush()
    lab_mm.flush()
    del img_mm, lab_mm
    sz = data.spacing[2] if len(data.spacing) > 2 else math.nan
    return {
        "case": case.describe(),
        "params": params.to_dict(),
        "sources": [source_fingerprint(s) for s in case.sources],
        "shape": [K, Hc, Wc],
        "original_hw": [J, I],
        "resized_hw": list(grid.resized_hw),
        "spacing": [sx, sy, None if (sz is None or (isinstance(sz, float) and math.isnan(sz))) else float(sz)],
        "contiguous": bool(data.contiguous),
        "slices": slices,
        "image_sha1": _array_sha1(out_dir / "image.npy"),
        "label_sha1": _array_sha1(out_dir / "label.npy"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _build_one(args) -> tuple:
    case, params, root = args
    final = root / _case_dir_name(case.case_id)
    tmp = root / (final.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    meta = preprocess_case(case, params, tmp)
    (tmp / "meta.json").write_text(json.dumps(meta))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return case.case_id, meta


# ------------------------------------------------------------------------------------------------
# the cache
# ------------------------------------------------------------------------------------------------
class _BuildLock:
    """Exclusive lock on ``<cache>/.lock`` while building (several training processes may share a cache)."""

    def __init__(self, root: Path):
        self.path = root / ".lock"
        self.f = None

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no locking, one builder at a time please
            pass
        return self

    def __exit__(self, *exc):
        try:
            import fcntl

            fcntl.flock(self.f, fcntl.LOCK_UN)
        except ImportError:  # pragma: no cover
            pass
        self.f.close()


class CacheError(InputError):
    """The slice cache is missing, incomplete or corrupt (rebuild it with ``SliceCache.build``)."""


class SliceCache:
    """A folder of preprocessed cases; see the module docstring."""

    def __init__(self, root, params: CacheParams):
        self.root = Path(root)
        self.params = params
        self.metas: dict = {}
        self._arrays: dict = {}

    # --- building ------------------------------------------------------------------------------
    def entry_valid(self, case: Case) -> bool:
        """True when the cached entry of ``case`` exists and is up to date (parameters, options, sources)."""
        d = self.root / _case_dir_name(case.case_id)
        mpath = d / "meta.json"
        arrays = ((d / "image.npy").exists() and (d / "label.npy").exists()) or (d / "arrays.npz").exists()
        if not mpath.exists() or not arrays:
            return False
        try:
            meta = json.loads(mpath.read_text())
        except (OSError, ValueError):
            return False
        if meta.get("params") != self.params.to_dict() or meta.get("case") != case.describe():
            return False
        return not any(source_changed(fp) for fp in meta.get("sources", []))

    def build(self, cases: Sequence[Case], workers: int = 0, progress: bool = True) -> "SliceCache":
        """Preprocess every case whose entry is missing or stale, then write ``index.json`` and open.

        ``workers`` > 0 preprocesses in that many processes.  Safe to interrupt and rerun.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with _BuildLock(self.root):
            self._build_locked(cases, workers, progress)
        return self.open([c.case_id for c in cases])

    def _build_locked(self, cases: Sequence[Case], workers: int, progress: bool) -> None:
        for t in self.root.glob("*.tmp*"):  # leftovers of an interrupted build (we hold the lock)
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
        todo = [c for c in cases if not self.entry_valid(c)]
        if todo:
            log.info("caching %d of %d cases in %s", len(todo), len(cases), self.root)
        jobs = [(c, self.params, self.root) for c in todo]
        it: Iterable
        if workers and workers > 0 and len(jobs) > 1:
            ex = ProcessPoolExecutor(max_workers=workers)
            it = ex.map(_build_one, jobs)
        else:
            ex = None
            it = map(_build_one, jobs)
        if progress and todo:
            try:
                from tqdm import tqdm

                it = tqdm(it, total=len(jobs), desc="cache", unit="case")
            except ImportError:  # pragma: no cover
                pass
        try:
            for _ in it:
                pass
        finally:
            if ex is not None:
                ex.shutdown()
        self._write_index(cases)

    def _write_index(self, cases: Sequence[Case]) -> None:
        """Add/refresh ``cases`` in ``index.json`` (entries of other cases built earlier are kept)."""
        index = {"params": self.params.to_dict(), "cases": {}}
        ipath = self.root / "index.json"
        if ipath.exists():
            try:
                old = json.loads(ipath.read_text())
                if old.get("params") == index["params"]:
                    index["cases"] = {k: v for k, v in old["cases"].items() if (self.root / v["dir"]).is_dir()}
            except (OSError, ValueError, KeyError):
                pass
        for c in cases:
            meta = json.loads((self.root / _case_dir_name(c.case_id) / "meta.json").read_text())
            index["cases"][c.case_id] = {
                "dir": _case_dir_name(c.case_id), "patient_id": c.patient_id, "kind": c.kind, "shape": meta["shape"],
                "resized_hw": meta["resized_hw"], "spacing": meta["spacing"], "contiguous": meta["contiguous"],
                "slices": meta["slices"],
            }
        tmp = self.root / f"index.json.{os.getpid()}.part"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self.root / "index.json")

    # --- reading -------------------------------------------------------------------------------
    def open(self, case_ids: Optional[Sequence[str]] = None, verify: str = "quick") -> "SliceCache":
        """Load the index (all cases, or ``case_ids``) and check every entry (``verify`` = "quick" or "full")."""
        ipath = self.root / "index.json"
        if not ipath.exists():
            raise CacheError(f"no slice cache in {self.root} (index.json missing); build it first")
        index = json.loads(ipath.read_text())
        if index.get("params") != self.params.to_dict():
            raise CacheError(f"slice cache {self.root} was built with {index.get('params')}, "
                             f"not {self.params.to_dict()}; rebuild it")
        ids = list(index["cases"]) if case_ids is None else list(case_ids)
        self.metas = {}
        for cid in ids:
            if cid not in index["cases"]:
                raise CacheError(f"case {cid!r} is not in the slice cache {self.root}; rebuild it")
            e = index["cases"][cid]
            d = self.root / e["dir"]
            self._unpack_if_packed(d)
            for name, dtype in (("image.npy", np.uint8), ("label.npy", np.uint8)):
                try:
                    a = np.load(d / name, mmap_mode="r")
                except (OSError, ValueError) as err:
                    raise CacheError(f"cache entry {d} is unreadable ({err}); rebuild the cache") from err
                if list(a.shape) != list(e["shape"]) or a.dtype != dtype:
                    raise CacheError(f"cache entry {d / name} has shape {a.shape} {a.dtype}, index says "
                                     f"{e['shape']} {np.dtype(dtype)}; rebuild the cache")
            if verify == "full":
                meta = json.loads((d / "meta.json").read_text())
                for name, key in (("image.npy", "image_sha1"), ("label.npy", "label_sha1")):
                    if _array_sha1(d / name) != meta[key]:
                        raise CacheError(f"cache entry {d / name} does not match its checksum; rebuild the cache")
            self.metas[cid] = e
        self._arrays = {}
        return self

    def arrays(self, case_id: str) -> tuple:
        """``(image uint8 (K, Hc, Wc), label uint8 (K, Hc, Wc))`` memory maps of one case (image / 255 =
        windowed intensity)."""
        if case_id not in self._arrays:
            d = self.root / self.metas[case_id]["dir"]
            self._arrays[case_id] = (np.load(d / "image.npy", mmap_mode="r"), np.load(d / "label.npy", mmap_mode="r"))
        return self._arrays[case_id]

    def slice_records(self, case_ids: Optional[Sequence[str]] = None) -> list:
        """Flat list of ``(case_id, patient_id, slice record)`` for ``case_ids`` (default: all open)."""
        out = []
        for cid in (self.metas if case_ids is None else case_ids):
            e = self.metas[cid]
            for s in e["slices"]:
                out.append((cid, e["patient_id"], s))
        return out

    def case_ids(self, include_phantoms: bool = True) -> list:
        """Cases of ``index.json`` (no source access); ``include_phantoms=False`` leaves out synthetic ones."""
        ipath = self.root / "index.json"
        if not ipath.exists():
            raise CacheError(f"no slice cache in {self.root} (index.json missing); build it first")
        cases = json.loads(ipath.read_text())["cases"]
        return [k for k, v in cases.items() if include_phantoms or v.get("kind") != "phantom"]

    def patient_of(self, case_id: str) -> str:
        return self.metas[case_id]["patient_id"]

    def pack(self, dest, case_ids: Optional[Sequence[str]] = None) -> Path:
        """Compressed, self-contained copy of the cache (or of ``case_ids``) in folder ``dest``."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        index = json.loads((self.root / "index.json").read_text())
        keep = list(index["cases"]) if case_ids is None else list(case_ids)
        out = {"params": index["params"], "cases": {k: index["cases"][k] for k in keep}}
        for cid in keep:
            src = self.root / index["cases"][cid]["dir"]
            dst = dest / index["cases"][cid]["dir"]
            dst.mkdir(exist_ok=True)
            self._unpack_if_packed(src)
            np.savez_compressed(dst / "arrays.npz", image=np.load(src / "image.npy"), label=np.load(src / "label.npy"))
            meta = json.loads((src / "meta.json").read_text())
            (dst / "meta.json").write_text(json.dumps(meta))
            for stale in ("image.npy", "label.npy"):
                if (dst / stale).exists():
                    (dst / stale).unlink()
        (dest / "index.json").write_text(json.dumps(out))
        return dest

    @staticmethod
    def _unpack_if_packed(d: Path) -> None:
        """``arrays.npz`` (packed) -> ``image.npy`` + ``label.npy`` (memory-mappable), written atomically."""
        npz = d / "arrays.npz"
        if (d / "image.npy").exists() and (d / "label.npy").exists() or not npz.exists():
            return
        with np.load(npz) as z:
            meta = json.loads((d / "meta.json").read_text())
            for name in ("image", "label"):
                arr = z[name]
                tmp = d / f"{name}.{os.getpid()}.part.npy"
                np.save(tmp, arr)
                os.replace(tmp, d / f"{name}.npy")
                key = f"{name}_sha1"
                if meta.get(key) and _array_sha1(d / f"{name}.npy") != meta[key]:
                    raise CacheError(f"packed cache entry {d} does not match its checksum; pack it again")

    def __getstate__(self):  # memory maps are reopened lazily in worker processes
        st = dict(self.__dict__)
        st["_arrays"] = {}
        return st


def main(argv: Optional[list] = None) -> int:
    import argparse
    import sys

    from lsnet.errors import LSNetError

    ap = argparse.ArgumentParser(prog="python -m training.cache", description="Build or pack the slice cache.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="preprocess the datasets of a training configuration into data.cache_dir")
    b.add_argument("--config", required=True)
    b.add_argument("--set", dest="overrides", action="append", default=[])
    b.add_argument("--phantoms", type=int, default=0, help="also cache N synthetic phantoms (extra training data)")
    b.add_argument("--workers", type=int, default=0)
    p = sub.add_parser("pack", help="write a compressed, source-free copy of a cache")
    p.add_argument("cache")
    p.add_argument("dest")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.cmd == "build":
            from .config import add_phantoms, load_config, model_config
            from .datasets import cases_from_specs

            cfg = add_phantoms(load_config(args.config, args.overrides), args.phantoms)
            cases = cases_from_specs(cfg["data"]["datasets"] + cfg["data"]["extra_train_datasets"])
            cache = SliceCache(Path(cfg["data"]["cache_dir"]), CacheParams.from_model_config(model_config(cfg)))
            cache.build(cases, workers=args.workers, progress=sys.stderr.isatty())
            print(f"{len(cases)} cases cached in {cache.root}")
        else:
            root = Path(args.cache)
            index = json.loads((root / "index.json").read_text()) if (root / "index.json").exists() else None
            if index is None:
                raise CacheError(f"no slice cache in {root}")
            params = index["params"]
            cache = SliceCache(root, CacheParams(tuple(params["window"]), params["spacing"], params["pad_multiple"]))
            dest = cache.pack(args.dest)
            size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
            print(f"packed {len(index['cases'])} cases into {dest} ({size / 2**20:.1f} MiB)")
    except LSNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
