"""Volume inference: canonical axial slices streamed in batches through L-Net -> decode -> RR -> S-Net -> theta^-1.

Memory is bounded by the batch, not by the volume: the input stays in its own array (the canonical
view is a view), slices are windowed/resampled per batch on the compute device, and outputs are
written straight into preallocated ``uint8`` mask (and optional ``float32`` heatmap) arrays in the
input's order.  Nothing per slice is kept except the RoI boxes.

Merging several RoIs on one slice (the paper does not say): each RoI's S-Net probability map is pasted
back with theta^-1 (0 outside the RoI) and the slice probability is the pixel-wise **maximum** over
its RoIs; the mask is ``probability > mask_threshold``.  Max never lets a confident RoI be diluted by an
overlapping one that does not cover the organ.

Speed on CUDA: bf16 autocast, channels-last, decoding and pasting on the GPU, S-Net skipped for batches
without RoIs, one host copy per batch.  CUDA out-of-memory halves the batch and retries; at batch 1 it
falls back to the CPU with a warning.

After the last batch, volumes drop 3-D connected components smaller than a quarter of the largest one
per label (``postprocess.py``; not in the paper, on by default, ``drop_small_components=False`` turns it off).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch

from lsnet.architectures import load_model
from lsnet.config import ModelConfig
from lsnet.errors import CancelledError, InputError, WeightsError
from lsnet.io.dicom_info import check_field_of_view
from lsnet.io.geometry import Volume, to_canonical
from lsnet.io.volume import read_volume
from lsnet.method.decode import decode
from lsnet.method.model import box_prompt_snet, pool_to_lnet
from lsnet.method.recalibration import (
    paste_back,
    recalibrate,
    theta_from_box,
    theta_from_xyxy,
)
from lsnet.pipeline.device import describe, resolve_device
from lsnet.pipeline.postprocess import boxes_on_mask, keep_large_components
from lsnet.pipeline.preprocess import (
    SliceGrid,
    canvas_to_original,
    slice_grid,
    stack_channels,
    to_canvas,
    window,
)
from lsnet.results import RoiBox, SegmentationResult

log = logging.getLogger("lsnet")

ProgressFn = Callable[[int, int, dict], None]

HEATMAP_LEVELS = 255
"""The heatmap returned (and written to heatmap.nrrd) is rounded to multiples of 1/255: it is for display
only (every decision — components, boxes, masks — uses the exact values first), the error is at most
0.002, and the rounded float32 volume compresses ~15x smaller and ~10x faster (measured on a 129-slice
CT: 114 MB / 3.7 s -> 7.4 MB / 0.34 s at gzip level 1), which dominated the write time of long CTs."""


def quantize_heatmap(heat: torch.Tensor) -> torch.Tensor:
    """``heat`` in [0, 1] rounded to multiples of ``1 / HEATMAP_LEVELS`` (same shape and dtype)."""
    return torch.round(heat * HEATMAP_LEVELS) / HEATMAP_LEVELS


def merge_max(prob_rois: torch.Tensor, batch: torch.Tensor, b: int) -> torch.Tensor:
    """The merge rule (module docstring): pixel-wise max of per-RoI maps ``(N, H, W)`` into ``(b, H, W)``."""
    h, w = prob_rois.shape[-2:]
    out = prob_rois.new_zeros(b, h * w)
    if prob_rois.shape[0]:
        idx = batch.view(-1, 1).expand(-1, h * w)
        out = out.scatter_reduce(0, idx, prob_rois.reshape(prob_rois.shape[0], -1), "amax")
    return out.view(b, h, w)


def lsnet_predict(model, x: torch.Tensor, out_hw=None, scale=(1.0, 1.0), autocast=nullcontext):
    """The inference rule of section 2.5 on a preprocessed batch (one code path for the engine and
    the training validation).

    ``x`` ``(B, C, H, W)`` windowed canvas slices -> ``(prob (B, H', W'), heat (B, 1, H/4f, W/4f), rois)``:
    L-Net (on ``x`` pooled by ``f = config.roi_source_factor``; ``x`` itself when f = 1, the paper) ->
    ``decode`` -> RR from ``x`` -> S-Net -> theta^-1 into the ``out_hw`` grid (default: ``x``'s; see
    ``recalibration.paste_back`` for ``scale``) -> max over the RoIs of each slice.  ``rois.boxes``
    are in pixels of ``x``.
    """
    c = model.config
    f = c.roi_source_factor
    b = x.shape[0]
    out_hw = tuple(out_hw or x.shape[-2:])
    small = pool_to_lnet(x, f)
    with autocast():
        logits, T = model.lnet(small)
    heat = torch.sigmoid(logits.float())
    rois = decode(heat, T.float(), c.heatmap_threshold, c.min_box_size)
    if not len(rois):
        return torch.zeros(b, *out_hw, device=x.device), heat, rois
    theta = theta_from_box(rois.keypoints, rois.ltrb, tuple(small.shape[-2:]), c.alpha)
    prob = snet_on_rois(model, x, theta, rois.batch, out_hw, scale, autocast)
    if f != 1:
        rois = replace(rois, boxes=rois.boxes * f)
    return prob, heat, rois


def snet_on_rois(model, x: torch.Tensor, theta: torch.Tensor, batch: torch.Tensor, out_hw: tuple, scale=(1.0, 1.0),
                 autocast=nullcontext, net=None) -> torch.Tensor:
    """RR (Eqs. 2-3) of the RoIs ``theta`` ``(N, 2, 3)`` from ``x[batch]``, S-Net (or ``net``, e.g. the
    box-prompt S-Net), theta^-1 (Eq. 4) into ``out_hw``, max over the RoIs of each slice -> probability
    ``(B, H', W')`` (B = ``x.shape[0]``).

    With ``config.roi_zooms`` other than ``(1.0,)`` (ours, test-time augmentation) each RoI is sampled
    once per zoom factor (theta's scales times the factor, same centre), and its pasted-back
    probabilities are averaged before the max over RoIs."""
    c = model.config
    zooms = tuple(getattr(c, "roi_zooms", (1.0,)))
    n = theta.shape[0]
    if zooms != (1.0,):
        z = torch.tensor(zooms, dtype=theta.dtype, device=theta.device).repeat_interleave(n)
        theta = theta.repeat(len(zooms), 1, 1)
        theta[:, 0, 0] = theta[:, 0, 0] * z
        theta[:, 1, 1] = theta[:, 1, 1] * z
    roi = recalibrate(x[batch.repeat(len(zooms))], theta, (c.roi_size, c.roi_size))
    with autocast():
        m = (model.snet if net is None else net)(roi)
    pasted = paste_back(torch.sigmoid(m.float()[:, :1]), theta, out_hw, scale)[:, 0]
    if len(zooms) > 1:
        pasted = pasted.view(len(zooms), n, *pasted.shape[-2:]).mean(0)
    return merge_max(pasted, batch, x.shape[0])


def box_prompt_predict(model, x: torch.Tensor, boxes: torch.Tensor, batch: torch.Tensor, out_hw=None,
                       scale=(1.0, 1.0), autocast=nullcontext) -> torch.Tensor:
    """S-Net alone inside given boxes (a user's RoIs; the box-prompt path of ``Segmenter.segment_box``):
    the model's box-prompt S-Net when it has one (``config.box_snet_width``, ours), else S-Net.

    ``x`` ``(B, C, H, W)`` canvas slices as for :func:`lsnet_predict`; ``boxes`` ``(N, 4)`` ``(x0, y0,
    x1, y1)`` in pixels of ``x``; ``batch`` ``(N,)`` slice of each box.  The RoI sampled is the box
    plus the alpha margin (in L-Net pixels), as in training.  Returns the probability ``(B, H', W')``
    on ``out_hw`` (default ``x``'s grid), 0 outside every box, max over the boxes of a slice.
    """
    c = model.config
    f = c.roi_source_factor
    b = x.shape[0]
    out_hw = tuple(out_hw or x.shape[-2:])
    if not len(boxes):
        return torch.zeros(b, *out_hw, device=x.device)
    lnet_hw = (x.shape[-2] // f, x.shape[-1] // f)
    theta = theta_from_xyxy(boxes.float() / f, lnet_hw, c.alpha)
    return snet_on_rois(model, x, theta, batch, out_hw, scale, autocast, box_prompt_snet(model))


class Segmenter:
    """Runs a loaded L-SNet on volumes, slices or user boxes. One instance per model and device.

    Args:
        model: an ``LSNet`` (e.g. from ``weights.load_model``) — or None to load ``weights``.
        weights: path of a .safetensors file (default: the bundled model) when ``model`` is None.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: slices per batch.
        amp: bf16 autocast on CUDA (ignored on CPU).
        drop_small_components: in a volume with more than one slice, drop the 3-D connected components
            smaller than ``postprocess.MIN_FRACTION`` of the largest one of their label, and their RoIs
            (``postprocess.py``; not in the paper).

    Other architectures' cards (RSTN, DSMS U-Net, RPN-FCN) load with ``lsnet.load_segmenter``.
    """

    architectures: tuple = ("lsnet",)

    def __init__(self, model=None, weights=None, device: str = "auto", batch_size: int = 8, amp: bool = True,
                 card: Optional[dict] = None, drop_small_components: bool = True):
        self.drop_small_components = bool(drop_small_components)
        self.device = resolve_device(device)
        if model is None:
            model, card = load_model(weights, device="cpu")
        if model.config.architecture not in self.architectures:
            raise WeightsError(
                f"{type(self).__name__} runs {', '.join(self.architectures)} models, not {model.config.architecture!r}: "
                "use lsnet.load_segmenter(weights=...), which picks the right runner from the model card."
            )
        self.card = card or {"name": "in-memory model", "config": model.config.to_dict()}
        self.model = model.eval()
        self.config: ModelConfig = model.config
        self.batch_size = max(1, int(batch_size))
        self.amp = amp
        self._to_device(self.device)

    def _to_device(self, device: torch.device) -> None:
        self.device = device
        # channels-last on every device: ~2x faster convolutions on CPU too (benchmarks/, docs/benchmarks.md)
        self.model.to(device).to(memory_format=torch.channels_last)

    def _autocast(self):
        if self.device.type == "cuda" and self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _grid(self, original_hw: tuple, spacing_xy: tuple) -> SliceGrid:
        """The canvas the network input is built on: L-Net's (``config.spacing`` mm), or with
        ``roi_source_factor = f`` the RoI-source canvas ``f`` times finer (L-Net pools it by ``f``)."""
        c = self.config
        return slice_grid(original_hw, spacing_xy, c.roi_source_spacing, c.pad_multiple * c.roi_source_factor)

    # ------------------------------------------------------------------ the per-batch core
    @torch.inference_mode()
    def _run_batch(self, raw: np.ndarray, grid: SliceGrid, want_heatmap: bool):
        """``raw`` ``(B, C, H0, W0)`` HU -> mask ``(B, H0, W0)`` uint8, heatmap ``(B, H0, W0)`` or None, RoIs on the original grid."""
        c = self.config
        dev = self.device
        x = torch.from_numpy(np.array(raw, order="C")).to(dev, non_blocking=True)
        x = to_canvas(window(x, c.window), grid)
        x = x.contiguous(memory_format=torch.channels_last)
        prob, heat, rois = lsnet_predict(self.model, x, grid.original_hw, grid.paste_scale(), self._autocast)
        mask = (prob > c.mask_threshold).to(torch.uint8)
        hm = quantize_heatmap(canvas_to_original(heat, grid)[:, 0]) if want_heatmap else None
        boxes = grid.to_original_xyxy(rois.boxes) if len(rois) else rois.boxes
        out = (
            mask.cpu().numpy(),
            hm.cpu().numpy() if hm is not None else None,
            rois.batch.cpu().numpy(),
            boxes.cpu().numpy(),
            rois.scores.float().cpu().numpy(),
        )
        return out

    def _run_batch_safe(self, raw, grid, want_heatmap):
        """``_run_batch`` with the CUDA OOM policy: halve the batch, then fall back to the CPU."""
        try:
            return self._run_batch(raw, grid, want_heatmap)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if raw.shape[0] > 1:
                half = raw.shape[0] // 2
                self.batch_size = max(1, half)
                log.warning("CUDA out of memory: retrying with batch size %d", self.batch_size)
                a = self._run_batch_safe(raw[:half], grid, want_heatmap)
                bb = self._run_batch_safe(raw[half:], grid, want_heatmap)
                return (
                    np.concatenate([a[0], bb[0]]),
                    None if a[1] is None else np.concatenate([a[1], bb[1]]),
                    np.concatenate([a[2], bb[2] + half]),
                    np.concatenate([a[3], bb[3]]),
                    np.concatenate([a[4], bb[4]]),
                )
            log.warning("CUDA out of memory even with batch size 1: falling back to the CPU (slower)")
            self._to_device(torch.device("cpu"))
            return self._run_batch(raw, grid, want_heatmap)

    # ------------------------------------------------------------------ public API
    def segment_volume(
        self,
        volume,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[threading.Event] = None,
        heatmap: bool = True,
        on_boxes: Optional[Callable[[int, list], None]] = None,
    ) -> SegmentationResult:
        """Segment a :class:`lsnet.io.geometry.Volume` (any orientation; a 1-slice volume is fine).

        ``progress(done_slices, total_slices, info)`` is called after every batch; setting ``cancel``
        stops at the next batch with :class:`CancelledError` (nothing is returned or written).
        ``on_boxes(slice_index, [RoiBox])`` is called for every slice with RoIs as soon as it is done.
        """
        t0 = time.perf_counter()
        check_volume_values(volume.array)
        check_field_of_view(volume)
        can, reo = to_canonical(volume)
        arr = can.array
        k, h0, w0 = arr.shape
        spacing_xy = (float(can.spacing[0]), float(can.spacing[1]))
        grid = self._grid((h0, w0), spacing_xy)
        mask = np.zeros(volume.array.shape, dtype=np.uint8)
        mask_c = reo.to_canonical_array(mask)
        heat = np.zeros(volume.array.shape, dtype=np.float32) if heatmap else None
        heat_c = reo.to_canonical_array(heat) if heatmap else None
        boxes: list[RoiBox] = []
        margin = self.config.alpha * self.config.roi_source_factor / grid.f[0]  # alpha is in L-Net pixels
        timings = {"preprocess": time.perf_counter() - t0, "network": 0.0, "postprocess": 0.0}
        start = 0
        while start < k:
            if cancel is not None and cancel.is_set():
                raise CancelledError("Segmentation cancelled; nothing was written.")
            stop = min(k, start + self.batch_size)
            raw = stack_channels(arr, start, stop, self.config.in_channels)
            t1 = time.perf_counter()
            m, hm, bidx, bxy, sc = self._run_batch_safe(raw, grid, heatmap)
            t2 = time.perf_counter()
            mask_c[start:stop] = m
            if heatmap:
                heat_c[start:stop] = hm
            new = [
                RoiBox(int(start + bi), float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(s), margin)
                for bi, b, s in zip(bidx, bxy, sc)
            ]
            boxes.extend(new)
            if on_boxes is not None:
                for s in sorted({bx.slice_index for bx in new}):
                    on_boxes(s, [bx for bx in new if bx.slice_index == s])
            timings["network"] += t2 - t1
            timings["postprocess"] += time.perf_counter() - t2
            start = stop
            if progress is not None:
                progress(start, k, {"rois": len(boxes)})
        boxes, report = self._postprocess_volume(mask, mask_c, boxes, timings)
        timings["total"] = time.perf_counter() - t0
        return SegmentationResult(volume, mask, heat, boxes, reo, self.card, describe(self.device), timings, report)

    def _postprocess_volume(self, mask: np.ndarray, mask_c: np.ndarray, boxes: list, timings: dict) -> tuple:
        """The volume step of ``postprocess.py`` on the finished mask (in place; ``mask_c`` is its
        canonical view) -> (kept boxes, report dict, empty when the step did not run)."""
        if not self.drop_small_components or mask.shape[0] < 2:
            return boxes, {}
        t = time.perf_counter()
        report = keep_large_components(mask).as_dict()
        kept = boxes_on_mask(boxes, mask_c) if report["removed_voxels"] else boxes
        report.update({"step": "large_components", "removed_rois": len(boxes) - len(kept)})
        timings["volume_step"] = time.perf_counter() - t
        timings["postprocess"] = timings.get("postprocess", 0.0) + timings["volume_step"]
        return kept, report

    def segment_file(self, path, **kwargs) -> SegmentationResult:
        """Read ``path`` (NIfTI, NRRD, MHA, DICOM folder) and segment it; ``timings['read']`` is added."""
        t0 = time.perf_counter()
        vol = read_volume(path)
        t_read = time.perf_counter() - t0
        res = self.segment_volume(vol, **kwargs)
        res.timings["read"] = t_read
        return res

    @torch.inference_mode()
    def segment_box(self, volume, slice_index: int, box: RoiBox) -> tuple[np.ndarray, np.ndarray]:
        """S-Net alone inside a user-given box on one canonical slice (interactive correction).

        ``box`` is in the original canonical slice grid (like the boxes of a result); the RoI sampled
        is the box plus the alpha margin, as during training.  Returns ``(mask (J, I) uint8,
        probability (J, I) float32)`` on the canonical slice, zero outside the RoI.
        """
        can, _ = to_canonical(volume)
        k = can.array.shape[0]
        if not 0 <= slice_index < k:
            raise InputError(f"Slice {slice_index} is outside the volume (0..{k - 1}).")
        if not (box.x1 > box.x0 and box.y1 > box.y0):
            raise InputError("The RoI box is empty: draw a box with a positive width and height.")
        c = self.config
        h0, w0 = can.array.shape[1:]
        grid = self._grid((h0, w0), (float(can.spacing[0]), float(can.spacing[1])))
        raw = stack_channels(can.array, slice_index, slice_index + 1, c.in_channels)
        x = to_canvas(window(torch.from_numpy(np.array(raw, order="C")).to(self.device), c.window), grid)
        xyxy = grid.to_canvas_xyxy(torch.tensor([[box.x0, box.y0, box.x1, box.y1]], dtype=torch.float32, device=self.device))
        batch = torch.zeros(1, dtype=torch.long, device=self.device)
        p = box_prompt_predict(self.model, x, xyxy, batch, (h0, w0), grid.paste_scale(), self._autocast)[0]
        p = p.cpu().numpy()
        return (p > c.mask_threshold).astype(np.uint8), p

    def segment_slice(self, slice_hu: np.ndarray, spacing_xy=(1.0, 1.0)):
        """One 2-D canonical slice ``(J, I)`` in HU -> ``(mask (J, I), heatmap (J, I), [RoiBox])``."""
        a = np.asarray(slice_hu)
        if a.ndim != 2:
            raise InputError(f"segment_slice expects a 2-D slice (rows, columns); got shape {a.shape}.")
        vol = Volume(a[None], (float(spacing_xy[0]), float(spacing_xy[1]), 1.0), (0.0, 0.0, 0.0), np.eye(3))
        res = self.segment_volume(vol)
        return res.mask[0], res.heatmap[0], res.boxes


def check_volume_values(arr: np.ndarray) -> None:
    """Refuse volumes the networks cannot handle (empty, non-finite) with an actionable message."""
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise InputError(f"Expected a non-empty 3-D volume (slices, rows, columns); got shape {tuple(arr.shape)}.")
    if np.issubdtype(arr.dtype, np.floating):
        bad = 0
        for k in range(arr.shape[0]):  # per slice: no full-volume temporary
            bad += int(np.count_nonzero(~np.isfinite(arr[k])))
        if bad:
            raise InputError(
                f"The volume contains {bad} NaN/infinite voxels. Fix or mask them (e.g. replace with -1024 HU) before segmenting."
            )
