"""The trame page of ``lsnet web``: real Slicer views (trame-slicer) and the LSNet workflow.

State the page reads (also what the browser test checks): ``status``, ``error`` (one line),
``opened`` (label of the open CT), ``progress`` (0-100), ``running``, ``rois`` (rows of the RoI list),
``selected_roi``, ``current_slice``, ``has_result``, ``voxels``.  Every action is a controller
method; errors are caught, turned into their one-line message and shown in the page.

One ``lsnet web`` process holds one scene (``session.WebSession``) and one working folder; the
engine runs in a child process polled from an asyncio task, so the page stays responsive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Optional

from lsnet.errors import LSNetError

from . import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_UPLOAD_LIMIT_MB, paths
from .gateway import warn_if_exposed
from .session import WebSession

LOG = logging.getLogger("lsnet.web")

FAVICON = ("data:image/svg+xml;utf8,<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'>"
           "<rect width='16' height='16' rx='3' fill='%23263238'/><path d='M4 3v10h8v-2H6V3z' fill='%23ffb300'/></svg>")
"""Our own favicon as a data URL: trame-slicer's default one is fetched from an outside address."""

POLL_S = 0.2


def _message(exc: BaseException) -> str:
    if isinstance(exc, (LSNetError, ValueError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"internal error: {type(exc).__name__}: {exc}"


class LSNetWebApp:
    """The page, its state and its actions, on one :class:`WebSession`."""

    def __init__(self, server=None, data_root=".", upload_limit_mb: int = DEFAULT_UPLOAD_LIMIT_MB,
                 device: str = "cpu", rca_encoder: str = "png"):
        from trame.app import get_server
        from trame_rca.encoders.image_encoder import RcaImageEncoder
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.server = server or get_server(None, client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.data_root = paths.DataRoot(data_root)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder=RcaImageEncoder(rca_encoder))
        self.session = WebSession(self.slicer_app, self.data_root, int(upload_limit_mb) * 1024 * 1024, device=device)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self._poll_task: Optional[asyncio.Task] = None
        self._init_state()
        self._build_ui()
        self.layout_manager.set_layout("Quad View")
        self._axial = None
        for view in self.slicer_app.view_manager.get_slice_views():
            if view.get_orientation() == "Axial":
                self._axial = view
                view.modified.connect(self._on_axial_modified)

    # --- state ------------------------------------------------------------------------------------------
    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "LSNet segmentation"
        s.trame__favicon = FAVICON
        s.update(dict(
            status="Open a CT: the sample, a file under the data root, or an upload.", error="", opened="",
            entries=[e.path for e in self.data_root.entries()], chosen_path="", upload=None,
            progress=0, running=False, has_result=False, voxels=0, rois=[], selected_roi=None,
            current_slice=None, show_heatmap=True, heatmap_opacity=0.5, range_first=0, range_last=0,
            is_dicom=False, data_root=str(self.data_root.root), upload_limit_mb=self.session.upload_limit_bytes // 2**20,
        ))
        self.state.change("show_heatmap", "heatmap_opacity")(self._on_heatmap)
        self.state.change("upload")(self._on_upload)

    def _guard(self, action, *args):
        try:
            with self.state:
                self.state.error = ""
                return action(*args)
        except Exception as exc:  # one line in the page, the traceback in the server log
            LOG.debug("action failed: %s", traceback.format_exc())
            with self.state:
                self.state.error = _message(exc)
            return None

    def _after_open(self, node) -> None:
        s = self.state
        self.slicer_app.display_manager.show_volume_in_slice_background(node)
        self.slicer_app.display_manager.show_volume_in_slice_foreground(None)
        self.slicer_app.display_manager.reset_views()
        s.opened = self.session.opened.label
        s.is_dicom = self.session.opened.dicom
        s.has_result, s.rois, s.selected_roi, s.voxels, s.progress = False, [], None, 0, 0
        s.status = f"Opened {s.opened} ({' x '.join(str(n) for n in self.session.canonicalizer.shape)}). Press Segment."
        self._update_slice()

    # --- actions ----------------------------------------------------------------------------------------
    def open_sample(self):
        self._guard(lambda: self._after_open(self.session.open_sample()))

    def open_path(self, relative: Optional[str] = None):
        self._guard(lambda: self._after_open(self.session.open_relative(relative if relative is not None else self.state.chosen_path)))

    def _on_upload(self, upload=None, **_):
        if not upload:
            return
        files = upload if isinstance(upload, list) else [upload]
        f = files[0]

        def do():
            size = int(f.get("size") or len(f.get("content") or b""))
            paths.check_upload_size(size, self.session.upload_limit_bytes)
            content = f.get("content") or b""
            if isinstance(content, list):
                content = b"".join(content)
            self._after_open(self.session.open_upload(f.get("name", ""), bytes(content)))
        self._guard(do)
        self.state.upload = None

    def segment(self):
        def do():
            self.session.start_segment()
            self.state.running, self.state.progress = True, 0
            self.state.status = "Segmenting (engine in a child process)..."
            self._poll_task = asyncio.ensure_future(self._poll())
        self._guard(do)

    def cancel(self):
        self._guard(self.session.cancel)

    async def _poll(self):
        session = self.session
        while session.proc is not None and not session.proc.finished:
            for event in session.poll():
                if event.kind == "progress":
                    from LSNetSegmentationLib.process import progress_percent

                    with self.state:
                        self.state.progress = progress_percent(event.data.get("done", 0), event.data.get("total", 0))
            await asyncio.sleep(POLL_S)
        session.poll()
        with self.state:
            self.state.running = False
        if session.proc.succeeded:
            self._guard(self._show_results)
        else:
            with self.state:
                self.state.error = session.failure_message()
                self.state.status = "No result."

    def _show_results(self):
        s = self.state
        self.session.load_results()
        s.has_result, s.progress = True, 100
        s.status = self.session.describe()
        s.voxels = self.session.summary.get("voxels", 0)
        for view in self.slicer_app.view_manager.get_threed_views():
            view.reset_camera()  # the segment's surface is the 3-D view's content
            view.schedule_render()
        self._update_slice(force=True)

    def _refresh_rois(self):
        self.state.rois = self.session.roi_rows()
        self.state.voxels = self.session.summary.get("voxels", 0)

    def _on_heatmap(self, show_heatmap=True, heatmap_opacity=0.5, **_):
        self._guard(lambda: self.session.apply_heatmap(bool(show_heatmap), float(heatmap_opacity)))

    def _on_axial_modified(self, *_):
        self._update_slice()

    def _update_slice(self, force: bool = False):
        if self._axial is None or self.session.canonicalizer is None:
            return
        from LSNetSegmentationLib.results import current_slice_center_ras

        k = self.session.slice_of_ras(current_slice_center_ras(self._axial.get_view_node()))
        if k == self.state.current_slice and not force:
            return
        with self.state:
            self.state.current_slice = k
            self.session.show_rois_of_slice(k)
            self._refresh_rois()

    def jump_to(self, row_id):
        def do():
            row_id_i = int(row_id)
            ras = self.session.jump_target(row_id_i)

            for view in self.slicer_app.view_manager.get_slice_views():
                view.get_view_node().JumpSliceByCentering(*ras)
            self.session.select(row_id_i)
            self.state.selected_roi = row_id_i
            box = self.session.table.row(row_id_i).box
            self.state.range_first = self.state.range_last = int(box.slice_index)
            self._update_slice(force=True)
        self._guard(do)

    def move(self, dx=0, dy=0, dw=0, dh=0):
        def do():
            rid = self._selected()
            self.session.move_box(rid, float(dx), float(dy), float(dw), float(dh))
            self._refresh_rois()
            self.state.status = f"RoI {rid} moved; press Re-segment to run S-Net in it."
        self._guard(do)

    def _selected(self) -> int:
        if self.state.selected_roi is None:
            raise LSNetError("Select a RoI in the list first.")
        return int(self.state.selected_roi)

    def resegment(self, use_range: bool = False):
        def do():
            rid = self._selected()
            if use_range:
                changed = self.session.resegment(rid, int(self.state.range_first), int(self.state.range_last))
            else:
                changed = self.session.resegment(rid)
            self._refresh_rois()
            self.state.status = f"Re-segmented RoI {rid}: {changed} voxels changed."
        self._guard(do)

    def delete(self):
        def do():
            rid = self._selected()
            changed = self.session.delete_box(rid)
            self.state.selected_roi = None
            self._refresh_rois()
            self.state.status = f"Deleted RoI {rid}: {changed} voxels erased."
        self._guard(do)

    def add_box(self):
        def do():
            k = self.state.current_slice
            if k is None:
                raise LSNetError("Scroll the axial view onto the volume first.")
            rid = self.session.add_box(int(k))
            self.session.select(rid)
            self.state.selected_roi = rid
            self.state.range_first = self.state.range_last = int(k)
            self._refresh_rois()
            self.state.status = f"Added RoI {rid} on slice {k}; move it onto the organ and press Re-segment."
        self._guard(do)

    def download_seg(self):
        result = self._guard(self.session.export_seg_nrrd)
        if result is None:
            return None
        name, data = result
        return {"name": name, "data": self.server.protocol.addAttachment(data)}

    def download_dicom_seg(self):
        result = self._guard(self.session.export_dicom_seg)
        if result is None:
            return None
        name, data = result
        return {"name": name, "data": self.server.protocol.addAttachment(data)}

    # --- page -------------------------------------------------------------------------------------------
    def _build_ui(self):
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v

        ctrl = self.ctrl
        trig = ctrl.trigger_name
        dl = "(r) => { if (r) { utils.download(r.name, r.data, 'application/octet-stream'); } }"
        with SinglePageWithDrawerLayout(self.server, theme="dark") as layout:
            layout.title.set_text("LSNet segmentation")
            with layout.toolbar:
                v.VSpacer()
                html.Div("{{ opened }}", classes="text-caption mr-4", id="opened")
            with layout.drawer as drawer:
                drawer.width = 380
                with html.Div(classes="pa-2"):
                    v.VAlert(v_if="error", type="error", density="compact", text=("error",), id="error", classes="mb-2")
                    html.Div("{{ status }}", id="status", classes="text-body-2 mb-2")
                    v.VBtn("Open sample CT", click=self.open_sample, id="open-sample", block=True, classes="mb-2")
                    v.VCombobox(v_model=("chosen_path",), items=("entries",), label="File or DICOM folder under the data root",
                                density="compact", hide_details=True, id="path-input")
                    v.VBtn("Open", click=self.open_path, id="open-path", block=True, classes="my-2")
                    v.VFileInput(v_model=("upload",), label=("`Upload a CT file (limit ${upload_limit_mb} MB)`",),
                                 density="compact", hide_details=True, id="upload", show_size=True)
                    v.VDivider(classes="my-2")
                    with html.Div(classes="d-flex"):
                        v.VBtn("Segment", click=self.segment, disabled=("!opened || running",), color="primary", id="segment")
                        v.VBtn("Cancel", click=self.cancel, disabled=("!running",), id="cancel", classes="ml-2")
                    v.VProgressLinear(model_value=("progress",), height=8, classes="my-2", id="progress",
                                      color="primary")
                    v.VCheckbox(v_model=("show_heatmap",), label="Heatmap", density="compact", hide_details=True,
                                disabled=("!has_result",), id="show-heatmap")
                    v.VSlider(v_model=("heatmap_opacity",), min=0, max=1, step=0.05, label="Opacity", density="compact",
                              hide_details=True, disabled=("!has_result",), id="heatmap-opacity")
                    v.VDivider(classes="my-2")
                    html.Div("RoIs ({{ rois.length }}) - axial slice {{ current_slice }}", classes="text-subtitle-2")
                    with v.VList(density="compact", style="max-height: 180px; overflow-y: auto", id="roi-list"):
                        v.VListItem(
                            v_for="r in rois", key="r.id",
                            title=("`RoI ${r.id}: slice ${r.slice}, score ${r.score}, ${r.size}${r.source === 'user' ? ' (user)' : ''}`",),
                            active=("selected_roi === r.id",),
                            click=(self.jump_to, "[r.id]"),
                            classes=("`roi-row ${r.on_slice === current_slice ? 'text-amber' : ''}`",),
                        )
                    with html.Div(v_if="has_result", classes="mt-2", id="correct"):
                        html.Div("Selected RoI {{ selected_roi }}", classes="text-caption")
                        with html.Div(classes="d-flex flex-wrap"):
                            for label, args, ident in (("left", "[-5,0,0,0]", "left"), ("right", "[5,0,0,0]", "right"),
                                                       ("up", "[0,-5,0,0]", "up"), ("down", "[0,5,0,0]", "down"),
                                                       ("grow", "[0,0,6,6]", "grow"), ("shrink", "[0,0,-6,-6]", "shrink")):
                                v.VBtn(label, size="small", click=(self.move, args), id=f"move-{ident}", classes="ma-1",
                                       disabled=("selected_roi === null",))
                        with html.Div(classes="d-flex align-center"):
                            v.VBtn("Re-segment slice", size="small", click=(self.resegment, "[false]"), id="reseg",
                                   disabled=("selected_roi === null",), classes="ma-1")
                            v.VBtn("Delete RoI", size="small", click=self.delete, id="delete", color="error",
                                   disabled=("selected_roi === null",), classes="ma-1")
                        with html.Div(classes="d-flex align-center"):
                            v.VTextField(v_model_number=("range_first",), type="number", label="from", density="compact",
                                         hide_details=True, style="max-width: 80px", id="range-first")
                            v.VTextField(v_model_number=("range_last",), type="number", label="to", density="compact",
                                         hide_details=True, style="max-width: 80px", id="range-last")
                            v.VBtn("Re-segment range", size="small", click=(self.resegment, "[true]"), id="reseg-range",
                                   disabled=("selected_roi === null",), classes="ma-1")
                        v.VBtn("Add RoI on this slice", size="small", click=self.add_box, id="add-roi", classes="ma-1")
                        v.VDivider(classes="my-2")
                        v.VBtn("Download .seg.nrrd", id="download-seg", block=True, classes="mb-1",
                               click=f"trigger('{trig(self.download_seg)}').then({dl})")
                        v.VBtn("Download DICOM SEG", id="download-dicom-seg", block=True,
                               v_if="is_dicom", click=f"trigger('{trig(self.download_dicom_seg)}').then({dl})")
                    html.Div("Data root: {{ data_root }}", classes="text-caption mt-4")
            with layout.content:
                with html.Div(style="height: calc(100vh - 90px); position: relative;", id="views"):
                    self.layout_manager.initialize_layout_grid(layout)
            self.ui = layout

    def start(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **kwargs):
        return self.server.start(host=host, port=port, open_browser=False, **kwargs)

    def close(self):
        self.session.close()


def serve(data_root, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, upload_limit_mb: int = DEFAULT_UPLOAD_LIMIT_MB,
          device: str = "cpu", exit_with_parent: Optional[int] = None) -> int:
    """``lsnet web --single-session``: build the page and serve it until interrupted.

    ``exit_with_parent``: the gateway's pid; this process stops itself when that process is gone.
    """
    warn_if_exposed(host, port)
    app = LSNetWebApp(data_root=data_root, upload_limit_mb=upload_limit_mb, device=device)
    if exit_with_parent:
        _watch_parent(int(exit_with_parent))
    print(f"lsnet web: data root {app.data_root.root}; open http://{host}:{port}/ in a browser", file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stopped by the gateway: clean up as after Ctrl-C
    try:
        app.start(host=host, port=port)
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.close()
    return 0


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _watch_parent(pid: int, period_s: float = 2.0) -> None:
    """SIGTERM to this process when ``pid`` is no longer its parent (the gateway died without stopping it)."""
    def watch():
        while os.getppid() == pid:
            time.sleep(period_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="lsnet-web-parent-watch", daemon=True).start()
