"""One user's LSNet session on a real slicer-core scene (no trame here; ``app`` is the page).

The MRML side is the Slicer module's own code: the same ``LSNetSegmentationLib.workflow`` functions
that ``LSNetSegmentationLib.logic`` calls, so the two front ends cannot drift apart:

* Segment: ``process.build_segment_command`` / ``child_environment`` / ``SegmentationProcess`` (the
  engine CLI ``lsnet segment --progress-json`` in a child process, polled, cancellable);
* results: ``workflow.load_results`` (segmentation with SNOMED CT terminology, heatmap and its display,
  the results folder, the RoI table), then ``results.RoiMarkups`` (one ROI node per box, per slice);
* correction: ``RoiMarkups.box_from_node`` (the box as drawn), ``workflow.resegment_boxes`` with
  ``lsnet.api.load_segmenter`` (S-Net in this process), ``workflow.delete_box_mask``.

What is web-specific: where files come from (``paths.DataRoot``, uploads, the sample CT), the
per-session working folder, and export of the segmentation node as bytes for a download.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from LSNetSegmentationLib import geometry_bridge, parameters, process, results, roi_table, workflow
from lsnet.errors import LSNetError

from . import paths, shims

ENGINE_PARENT = Path(__file__).resolve().parent.parent
"""``LSNetSegmentation/``: the folder holding ``lsnet`` (put on the child's PYTHONPATH, as Slicer does)."""


class SessionError(LSNetError):
    """A user-facing error of the web session (one line, shown in the page)."""


@dataclass
class Opened:
    path: Path  # the file or DICOM folder the engine reads
    label: str  # what the page shows
    dicom: bool


def read_input(path: Path):
    """Read a CT with the CLI's own checks and messages (``lsnet.app.cli._read_input``)."""
    from lsnet.app.cli import _read_input

    return _read_input(types.SimpleNamespace(dicom_seg=False, allow_non_ct=False), path)


class WebSession:
    """A scene, the CT shown in it, the last Segment run's results and the RoI list."""

    def __init__(self, slicer_app, data_root: paths.DataRoot, upload_limit_bytes: int, workdir: Optional[Path] = None,
                 device: str = "cpu", batch_size: int = 8):
        self.app = slicer_app
        self.scene = slicer_app.scene
        shims.install(slicer_app)
        self.data_root = data_root
        self.upload_limit_bytes = int(upload_limit_bytes)
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lsnet-web-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.device, self.batch_size = device, batch_size
        self.opened: Optional[Opened] = None
        self.volume_node = None
        self.result: Optional[workflow.LSNetResult] = None  # what the last Segment put in the scene
        self.canonicalizer: Optional[geometry_bridge.Canonicalizer] = None
        self.markups: Optional[results.RoiMarkups] = None
        self.proc: Optional[process.SegmentationProcess] = None
        self.run_dir: Optional[Path] = None
        self.run_started: Optional[float] = None
        self.last_run_seconds: Optional[float] = None
        self.done_outputs: dict = {}
        self._segmenter = None
        self._runs = 0

    # --- inputs ---------------------------------------------------------------------------------------
    def open_relative(self, relative: str):
        """Open a CT file or DICOM folder under the data root (checked by ``DataRoot.resolve``)."""
        path = self.data_root.resolve(relative)
        from lsnet.io.dicom_info import is_dicom_input

        return self._open(path, relative, is_dicom_input(path))

    def open_sample(self):
        from lsnet.samples.sample_ct import sample_ct_paths

        ct, _label = sample_ct_paths()
        return self._open(ct, f"sample CT {ct.name}", False)

    def open_upload(self, name: str, content: bytes):
        paths.check_upload_size(len(content), self.upload_limit_bytes)
        safe = paths.upload_name(name)
        folder = self.workdir / "uploads" / f"{len(list((self.workdir / 'uploads').glob('*'))) if (self.workdir / 'uploads').exists() else 0}"
        folder.mkdir(parents=True, exist_ok=False)
        target = folder / safe
        target.write_bytes(content)
        return self._open(target, f"upload {safe}", False)

    def _open(self, path: Path, label: str, dicom: bool):
        import slicer

        self.cancel()
        volume, _info = read_input(path)  # raises InputError with the CLI's message
        self.clear_results()
        if self.volume_node is not None and self.volume_node.GetScene() is not None:
            self.scene.RemoveNode(self.volume_node)
        ijk_to_ras = geometry_bridge.ijk_to_ras_from_volume(volume)
        name = Path(path).name.split(".")[0] or "CT"
        node = slicer.util.addVolumeFromArray(np.ascontiguousarray(volume.array), ijk_to_ras, name)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevel(400, 40)  # abdomen soft tissue
        self._ensure_sh_item(node)
        self.volume_node = node
        self.opened = Opened(Path(path), label, dicom)
        array_shape = volume.array.shape
        self.canonicalizer = geometry_bridge.Canonicalizer(ijk_to_ras, array_shape)
        return node

    def _ensure_sh_item(self, node) -> None:
        """Real Slicer's subject-hierarchy Qt plugins create an item for every data node; slicer-core does not."""
        sh = self.scene.GetSubjectHierarchyNode()
        if sh is not None and not sh.GetItemByDataNode(node):
            sh.CreateItem(sh.GetSceneItemID(), node)

    # --- Segment (child process) ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and not self.proc.finished and not self.proc.cancelled

    def start_segment(self) -> None:
        if self.opened is None:
            raise SessionError("Open a CT first.")
        if self.running:
            raise SessionError("A segmentation is already running.")
        self._runs += 1
        self.run_dir = self.workdir / f"run-{self._runs}"
        command = process.build_segment_command(sys.executable, self.opened.path, self.run_dir, device=self.device,
                                                batch_size=self.batch_size, overwrite=False)
        if self.opened.dicom:
            command.append("--dicom-seg")
        env = process.child_environment(None, ENGINE_PARENT)
        self.proc = process.SegmentationProcess(command, env=env)
        self.proc.start()
        self.run_started = time.monotonic()

    def poll(self) -> list:
        return self.proc.poll() if self.proc is not None else []

    def cancel(self) -> None:
        if self.proc is not None and not self.proc.finished:
            self.proc.cancel()
            self.proc.poll()

    def failure_message(self) -> str:
        proc = self.proc
        if proc is None:
            return ""
        if proc.cancelled:
            return "Cancelled; the scene is unchanged."
        return process.explain_failure(proc.error_message(), self.batch_size, self.device).message

    def load_results(self) -> dict:
        """Put a finished run's outputs into the scene (``workflow.load_results``, as the desktop logic)."""
        proc = self.proc
        if proc is None or not proc.succeeded:
            raise SessionError(self.failure_message() or "The segmentation did not finish.")
        self.last_run_seconds = time.monotonic() - self.run_started
        self.done_outputs = dict(proc.done_event.data.get("outputs") or {})
        self.clear_results()
        self.result = workflow.load_results(self.run_dir, self.done_outputs, self.volume_node, None, False, True,
                                            parameters.DEFAULT_HEATMAP_OPACITY)
        self.markups = results.RoiMarkups(self.table, self.canonicalizer, self.result.folderItem)
        return self.summary

    # the parts of ``self.result`` the page reads (None / empty before the first Segment)
    @property
    def segmentation_node(self):
        return self.result.segmentationNode if self.result else None

    @property
    def segment_ids(self) -> list:
        return self.result.segmentIds if self.result else []

    @property
    def heatmap_node(self):
        return self.result.heatmapNode if self.result else None

    @property
    def table(self) -> Optional[roi_table.RoiTableModel]:
        return self.result.table if self.result else None

    @property
    def summary(self) -> dict:
        return self.result.summary if self.result else {}

    def store_boxes(self) -> None:
        workflow.store_boxes(self.result)

    def _update_summary(self) -> None:
        self.result.summary = workflow.mask_summary(self.result) or {"voxels": 0, "slices": 0}

    def describe(self) -> str:
        n = len(self.table) if self.table is not None else 0
        return results.describe_result(self.summary, n, self.device, self.last_run_seconds)

    def clear_results(self) -> None:
        if self.markups is not None:
            self.markups.clear()
        for node in (self.segmentation_node, self.heatmap_node):
            if node is not None and node.GetScene() is not None:
                self.scene.RemoveNode(node)
        self.result, self.markups = None, None

    # --- display ----------------------------------------------------------------------------------------
    def apply_heatmap(self, show: bool, opacity: float) -> None:
        if self.heatmap_node is not None:
            results.apply_heatmap_display(self.heatmap_node, self.volume_node, bool(show), float(opacity))

    def slice_of_ras(self, ras) -> Optional[int]:
        return self.canonicalizer.slice_of_ras(ras) if self.canonicalizer is not None else None

    def show_rois_of_slice(self, slice_index: Optional[int]) -> None:
        if self.markups is not None:
            self.markups.show_slice(slice_index)

    def roi_rows(self, slice_index: Optional[int] = None) -> list[dict]:
        """The RoI list for the page: id, slice, score, size (``RoiTableModel.display_rows``)."""
        if self.table is None:
            return []
        out = []
        for row_id, (slice_text, score_text, size_text) in self.table.display_rows(slice_index):
            box = self.table.row(row_id).box
            out.append({"id": row_id, "slice": slice_text, "score": score_text, "size": size_text,
                        "source": box.source, "on_slice": int(box.slice_index)})
        return out

    def jump_target(self, row_id: int) -> np.ndarray:
        return self.table.jump_target_ras(row_id, self.canonicalizer.ijk_to_ras)

    def select(self, row_id: Optional[int]) -> None:
        if self.markups is not None:
            self.markups.select(row_id)

    # --- correction -------------------------------------------------------------------------------------
    def _require_results(self) -> None:
        if self.table is None or not self.segment_ids:
            raise SessionError("Segment first: there is no result to correct.")

    def move_box(self, row_id: int, dx: float = 0.0, dy: float = 0.0, dw: float = 0.0, dh: float = 0.0) -> object:
        """Shift / resize a box (canonical pixels) through its ROI node, as a drag in a view would."""
        self._require_results()
        box = self.current_box(row_id)
        x0, y0, x1, y1 = box.x0 + dx - dw / 2, box.y0 + dy - dh / 2, box.x1 + dx + dw / 2, box.y1 + dy + dh / 2
        K, J, I = self.canonicalizer.shape
        x0, x1 = max(0.0, x0), min(float(I), x1)
        y0, y1 = max(0.0, y0), min(float(J), y1)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise SessionError("The RoI would have no area inside the slice.")
        self.table.update(row_id, replace(box, x0=x0, y0=y0, x1=x1, y1=y1, source="user"))
        self.markups.node(row_id)
        self.markups.refresh(row_id)
        self.store_boxes()
        return self.table.row(row_id).box

    def current_box(self, row_id: int):
        """The box as drawn now (the user may have dragged its ROI handles in a view)."""
        box = self.markups.box_from_node(row_id)
        if box != self.table.row(row_id).box:
            self.table.update(row_id, box)
        return box

    def add_box(self, slice_index: int, ras_center=None, size_mm: float = 60.0) -> int:
        self._require_results()
        if ras_center is None:
            K, J, I = self.canonicalizer.shape
            ras_center = (self.canonicalizer.ijk_to_ras @ np.array([I / 2 - 0.5, J / 2 - 0.5, slice_index, 1.0]))[:3]
        box = geometry_bridge.default_box_at(ras_center, self.canonicalizer, size_mm=size_mm)
        row_id = self.table.add(box)
        self.markups.node(row_id)
        self.markups.show_slice(self.markups.currentSlice)
        self.store_boxes()
        return row_id

    def _get_segmenter(self):
        if self._segmenter is None:
            from lsnet.api import load_segmenter  # torch, in this process (as the desktop logic)

            self._segmenter = load_segmenter(device=self.device, batch_size=1)
        return self._segmenter

    def resegment(self, row_id: int, first: Optional[int] = None, last: Optional[int] = None) -> int:
        """S-Net inside the box on its slice, or on every slice of ``first..last``; returns changed voxels."""
        self._require_results()
        box = self.current_box(row_id)
        lo = box.slice_index if first is None else int(first)
        hi = lo if last is None else int(last)
        K = self.canonicalizer.shape[0]
        if not (0 <= lo <= hi < K):
            raise SessionError(f"Slice range {lo}..{hi} is outside the volume (0..{K - 1}).")
        boxes = [roi_table.with_slice(box, k) for k in range(lo, hi + 1)]
        changed = workflow.resegment_boxes(self.result, self._get_segmenter(), boxes)
        self._update_summary()
        return changed

    def delete_box(self, row_id: int) -> int:
        """Erase the segment inside a (false) box on its slice and remove the box; returns erased voxels."""
        self._require_results()
        box = self.current_box(row_id)
        changed = workflow.delete_box_mask(self.result, box)
        self.markups.remove(row_id)
        self.table.remove(row_id)
        self.store_boxes()
        self._update_summary()
        return changed

    # --- export -----------------------------------------------------------------------------------------
    def export_seg_nrrd(self) -> tuple[str, bytes]:
        """The segmentation node as it is now (corrections included), written by Slicer's storage node."""
        import slicer

        self._require_results()
        target = self._export_target("segmentation.seg.nrrd")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(target.as_posix())
        if not storage.WriteData(self.segmentation_node):
            raise SessionError("Could not write the segmentation.")
        name = f"{self.volume_node.GetName()}_lsnet.seg.nrrd"
        return name, target.read_bytes()

    def export_dicom_seg(self) -> tuple[str, bytes]:
        """DICOM SEG of the segmentation as it is now (corrections included), referencing the opened
        DICOM series: the engine's own writer (``lsnet.io.dicom_seg``, highdicom) on the segment's mask."""
        from lsnet.io.dicom_seg import build_segmentation, save_atomic
        from lsnet.io.outputs import labels_from_card
        from lsnet.io.weights import checked_card
        from lsnet.results import SegmentationResult

        self._require_results()
        if not (self.opened and self.opened.dicom):
            raise SessionError("DICOM SEG needs a DICOM series as input.")
        card, _weights = checked_card()  # the bundled model's, as the Segment run and the correction use
        value = int(labels_from_card(card)[0].get("value", 1))
        mask, _canonical = results.canonical_mask(self.segmentation_node, self.segment_ids[0], self.volume_node,
                                                  self.canonicalizer)
        corrected = SegmentationResult(workflow.engine_volume(self.result), (np.asarray(mask) > 0).astype(np.uint8) * value,
                                       None, [], None, card)
        target = self._export_target("segmentation.dcm")
        save_atomic(build_segmentation(corrected, self.opened.path), target)
        return f"{self.volume_node.GetName()}_lsnet_seg.dcm", target.read_bytes()

    def _export_target(self, name: str) -> Path:
        """``name`` in a fresh folder of the working folder (no export overwrites another)."""
        folder = self.workdir / f"export-{time.monotonic_ns()}"
        folder.mkdir(parents=True)
        return folder / name

    def close(self) -> None:
        self.cancel()
        shutil.rmtree(self.workdir, ignore_errors=True)
