"""Screenshots of the module's results in real Slicer views, rendered offscreen (no X server, no Qt).

    python docs/screenshots/make_screenshots.py CT [--slices K0:K1] [--out docs/screenshots] [--device cpu]

``CT``: a DICOM series folder or a volume file (anything ``lsnet.read_volume`` reads).  The scene is
a real slicer-core scene (``Testing/slicer_scene.py``); the module's own logic segments the CT
(``LSNetSegmentationLogic.process``: child process, bundled model) and puts the results into MRML;
trame-slicer's offscreen views draw them with Slicer's displayable managers (VTK picks EGL when
``DISPLAY`` is unset).  ``--slices`` keeps only those array slices (saves CPU; the geometry is kept).

Writes, under ``--out``:

* ``slicer-axial.png``: axial view on the slice of the best RoI: CT, heatmap overlay, the RoI boxes
  of that slice with their score labels, the segment outline;
* ``slicer-coronal.png``: coronal view through the same RoI (segment and heatmap);
* ``slicer-3d.png``: 3-D view of the segment's closed surface;
* ``slicer-corrected.png``: axial view after the best RoI was widened by 10 mm and re-segmented
  (``resegmentBoxes``), the box drawn as a user box.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "LSNetSegmentation")]

import slicer_scene  # noqa: E402


def parse_slices(text):
    if not text:
        return None
    first, last = (int(v) for v in text.split(":"))
    return slice(first, last)


def load_ct(path, slices):
    """``(array (K, J, I), IJKToRAS (4, 4))`` of the CT, optionally only ``slices`` of it."""
    import numpy as np
    from lsnet import read_volume
    from LSNetSegmentationLib import geometry_bridge

    volume = read_volume(path)
    ijk_to_ras = geometry_bridge.ijk_to_ras_from_volume(volume)
    array = volume.array
    if slices is not None:
        start = slices.start or 0
        array = array[slices]
        ijk_to_ras = ijk_to_ras.copy()
        ijk_to_ras[:3, 3] = (ijk_to_ras @ [0.0, 0.0, start, 1.0])[:3]
    return np.ascontiguousarray(array), ijk_to_ras


def save_png(view, path: Path) -> None:
    import vtk

    view.render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(view.render_window())
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    print("wrote", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ct", help="DICOM series folder or CT volume file")
    parser.add_argument("--slices", help="K0:K1, array slices to keep (default: all)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--size", type=int, default=640, help="view size in pixels")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    why = slicer_scene.import_error()
    if why:
        raise SystemExit(why)
    scene = slicer_scene.RealScene(slice_logics=False)  # the views below make the slice logics
    import numpy as np
    import slicer
    from trame_slicer.core.view_manager import ViewManager
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    from LSNetSegmentationLib import results
    from LSNetSegmentationLib.logic import LSNetSegmentationLogic

    for factory in (slicer.vtkMRMLThreeDViewDisplayableManagerFactory, slicer.vtkMRMLSliceViewDisplayableManagerFactory):
        factory.GetInstance().SetMRMLApplicationLogic(scene.appLogic)
    views = ViewManager(scene.scene, scene.appLogic)
    views.register_factory(DirectViewFactory(do_render_offscreen=True))
    axial = views.create_view(ViewLayoutDefinition.axial_view())
    coronal = views.create_view(ViewLayoutDefinition.coronal_view())
    threed = views.create_view(ViewLayoutDefinition.threed_view())
    for view in (axial, coronal, threed):
        view.render_window().SetSize(args.size, args.size)

    array, ijk_to_ras = load_ct(args.ct, parse_slices(args.slices))
    name = Path(args.ct.rstrip("/")).name.split(".")[0]
    volume = slicer.util.addVolumeFromArray(array, ijk_to_ras, name)
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(400, 40)  # abdomen window
    slicer.util.setSliceViewerLayers(background=volume, fit=True)

    logic = LSNetSegmentationLogic()
    t0 = time.monotonic()
    result = logic.process(volume, device=args.device, batchSize=4, timeoutSeconds=3600, heatmapOpacity=0.4)
    print(f"segmented {array.shape} in {time.monotonic() - t0:.1f} s: {len(result.table)} RoIs, {result.summary}")

    best = max(result.table.rows(), key=lambda r: r.box.score)
    markups = results.RoiMarkups(result.table, result.canonicalizer, result.folderItem)
    markups.show_slice(best.box.slice_index)
    centre = result.table.jump_target_ras(best.id, result.canonicalizer.ijk_to_ras)
    for view in (axial, coronal):
        node = view.mrml_view_node if hasattr(view, "mrml_view_node") else view.get_view_node()
        node.JumpSliceByCentering(*centre)
        view.fit_view_to_content()
        node.JumpSliceByCentering(*centre)
        fov = node.GetFieldOfView()
        node.SetFieldOfView(fov[0] * 0.6, fov[1] * 0.6, fov[2])  # zoom in on the abdomen
    save_png(axial, out / "slicer-axial.png")
    save_png(coronal, out / "slicer-coronal.png")

    segmentation = result.segmentationNode
    segmentation.GetDisplayNode().SetVisibility3D(True)
    bounds = [0.0] * 6
    segmentation.GetRASBounds(bounds)
    threed.renderer().ResetCamera(bounds)
    camera = threed.renderer().GetActiveCamera()
    camera.Elevation(-60)  # look from anterior-inferior
    threed.renderer().ResetCamera(bounds)
    camera.Zoom(2.2)
    save_png(threed, out / "slicer-3d.png")

    # correct: widen the best RoI by 10 mm each way, re-segment it (S-Net in this process)
    node = markups.node(best.id)
    size = node.GetSize()
    node.SetSize(size[0] + 10.0, size[1] + 10.0, size[2])
    edited = markups.box_from_node(best.id)
    result.table.update(best.id, edited)
    changed = logic.resegmentBoxes(result, [edited], device=args.device)
    markups.refresh(best.id)
    print(f"re-segmented RoI {best.id}: {changed} voxels changed")
    save_png(axial, out / "slicer-corrected.png")
    print(f"heatmap colour map: {result.heatmapNode.GetDisplayNode().GetColorNodeID()}, "
          f"Dice not computed (no label given); segment voxels after correction: {int(np.count_nonzero(result.canonicalizer.view(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, result.segmentIds[0], volume))))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
