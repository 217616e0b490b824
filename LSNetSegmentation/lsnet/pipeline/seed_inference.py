"""Volumes through the seed systems (RSTN, DSMS U-Net, RPN-FCN): :class:`SeedSegmenter` and
:func:`make_segmenter`, the runner for any weights file.

:class:`SeedSegmenter` is a :class:`lsnet.pipeline.inference.Segmenter` that only replaces the
per-batch network step (canonical reorientation, batching, CUDA OOM policy, progress, cancel, output
arrays and :class:`SegmentationResult` are the L-SNet code).  RSTN's coarse-to-fine iteration is
defined over the *volume* (the paper stops when the DSC between the volumes of two consecutive rounds
exceeds t), so for models with ``iterative = True`` the segmenter runs the rounds over all slices
(:meth:`SeedSegmenter._segment_volume_iterative`), keeping the previous round's probabilities as
float16 canvas maps on the CPU (``K x Hc x Wc x 2`` bytes, ~75 MB for 300 slices of 512 x 0.8 mm).
The interface every seed model implements is in ``lsnet.seeds.common``.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from lsnet.architectures import load_model
from lsnet.errors import CancelledError, InputError
from lsnet.io.geometry import to_canonical
from lsnet.pipeline.device import describe
from lsnet.pipeline.inference import Segmenter, check_volume_values, quantize_heatmap
from lsnet.pipeline.preprocess import (
    canvas_to_original,
    slice_grid,
    stack_channels,
    to_canvas,
    window,
)
from lsnet.results import RoiBox, SegmentationResult
from lsnet.seeds.common import SEED_ARCHITECTURES, dsc_counts, dsc_from_counts


class SeedSegmenter(Segmenter):
    """:class:`lsnet.pipeline.inference.Segmenter` for the seed architectures (see the module docstring)."""

    architectures = SEED_ARCHITECTURES

    @torch.inference_mode()
    def _run_batch(self, raw: np.ndarray, grid, want_heatmap: bool):
        x = self._canvas(raw, grid)
        with self._autocast():
            pred = self.model.predict_slices(x)
        return self._to_original(pred.prob, pred.boxes, pred.batch, pred.scores, grid, want_heatmap)

    def _canvas(self, raw: np.ndarray, grid) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(raw)).to(self.device, non_blocking=True)
        x = to_canvas(window(x, self.config.window), grid)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _to_original(self, prob, boxes, batch, scores, grid, want_heatmap: bool):
        p = canvas_to_original(prob.float(), grid)[:, 0]
        mask = (p > self.config.mask_threshold).to(torch.uint8)
        bx = grid.to_original_xyxy(boxes.float()) if len(boxes) else boxes
        return (
            mask.cpu().numpy(),
            quantize_heatmap(p).cpu().numpy() if want_heatmap else None,
            batch.cpu().numpy(),
            bx.cpu().numpy(),
            scores.float().cpu().numpy(),
        )

    def segment_volume(self, volume, progress=None, cancel=None, heatmap: bool = True, on_boxes=None) -> SegmentationResult:
        if getattr(self.model, "iterative", False):
            return self._segment_volume_iterative(volume, progress, cancel, heatmap, on_boxes)
        return super().segment_volume(volume, progress=progress, cancel=cancel, heatmap=heatmap, on_boxes=on_boxes)

    def segment_box(self, volume, slice_index, box):
        raise InputError(
            f"Segmenting inside a user box needs an L-SNet model; the loaded model is {self.config.architecture!r}. "
            "Load L-SNet weights for interactive box correction."
        )

    # ------------------------------------------------------------------ RSTN: rounds over the volume
    @torch.inference_mode()
    def _segment_volume_iterative(self, volume, progress, cancel, heatmap, on_boxes) -> SegmentationResult:
        """Coarse pass, then fine rounds until the inter-iteration DSC of the *volume* exceeds
        ``model.converge_t`` or ``model.max_rounds`` rounds ran (RSTN paper, "Training and Testing")."""
        t0 = time.perf_counter()
        check_volume_values(volume.array)
        can, reo = to_canonical(volume)
        arr = can.array
        k, h0, w0 = arr.shape
        c = self.config
        grid = slice_grid((h0, w0), (float(can.spacing[0]), float(can.spacing[1])), c.spacing, c.pad_multiple)
        hc, wc = grid.canvas_hw
        model = self.model
        bs = self.batch_size
        starts = list(range(0, k, bs))
        total = k * (2 + model.max_rounds)
        done = 0

        def batches():
            nonlocal done
            for start in starts:
                if cancel is not None and cancel.is_set():
                    raise CancelledError("Segmentation cancelled; nothing was written.")
                stop = min(k, start + bs)
                yield start, stop, self._canvas(stack_channels(arr, start, stop, c.in_channels), grid)
                done += stop - start
                if progress is not None:
                    progress(min(done, total), total, {"stage": stage})

        timings = {"preprocess": time.perf_counter() - t0}
        t1 = time.perf_counter()
        stage = "coarse"
        prev = torch.zeros(k, 1, hc, wc, dtype=torch.float16)
        for start, stop, x in batches():
            with self._autocast():
                prev[start:stop] = model.coarse_probs(x).float().cpu().half()
        last_boxes: list = []
        rounds, dscs = 0, []
        for r in range(1, model.max_rounds + 1):
            stage = f"fine round {r}"
            new = torch.zeros_like(prev)
            inter = tot = 0
            round_boxes = []
            for start, stop, x in batches():
                ref = prev[start:stop].to(self.device).float()
                with self._autocast():
                    p, boxes, has = model.refine(x, ref)
                p = p.float()
                new[start:stop] = p.cpu().half()
                i_, t_ = dsc_counts(p > 0.5, ref > 0.5)
                inter, tot = inter + i_, tot + t_
                idx = torch.nonzero(has).flatten()
                round_boxes.append((start + idx.cpu(), boxes[idx].float().cpu(), p.flatten(1).amax(1)[idx].cpu()))
            prev, last_boxes = new, round_boxes
            rounds, dsc = r, dsc_from_counts(inter, tot)
            dscs.append(dsc)
            if dsc > model.converge_t:
                break
        timings["network"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        stage = "output"
        mask = np.zeros(volume.array.shape, dtype=np.uint8)
        mask_c = reo.to_canonical_array(mask)
        heat = np.zeros(volume.array.shape, dtype=np.float32) if heatmap else None
        heat_c = reo.to_canonical_array(heat) if heatmap else None
        bidx = torch.cat([b[0] for b in last_boxes]) if last_boxes else torch.zeros(0, dtype=torch.long)
        bxy = torch.cat([b[1] for b in last_boxes]) if last_boxes else torch.zeros(0, 4)
        bsc = torch.cat([b[2] for b in last_boxes]) if last_boxes else torch.zeros(0)
        boxes_out: list[RoiBox] = []
        for start in starts:
            stop = min(k, start + bs)
            sel = (bidx >= start) & (bidx < stop)
            m, hm, bi, bx, sc = self._to_original(
                prev[start:stop].to(self.device), bxy[sel], bidx[sel] - start, bsc[sel], grid, heatmap
            )
            mask_c[start:stop] = m
            if heatmap:
                heat_c[start:stop] = hm
            new_boxes = [RoiBox(int(start + i), *map(float, b), float(s), 2.0 * model.crop_margin / grid.f[0], "rstn") for i, b, s in zip(bi, bx, sc)]
            boxes_out.extend(new_boxes)
            if on_boxes is not None:
                for s in sorted({b.slice_index for b in new_boxes}):
                    on_boxes(s, [b for b in new_boxes if b.slice_index == s])
        if progress is not None:
            progress(total, total, {"stage": "done", "rounds": rounds})
        timings["postprocess"] = time.perf_counter() - t2
        boxes_out, report = self._postprocess_volume(mask, mask_c, boxes_out, timings)
        timings["total"] = time.perf_counter() - t0
        timings["rstn_rounds"] = float(rounds)
        timings["rstn_inter_iteration_dsc"] = float(dscs[-1]) if dscs else float("nan")
        return SegmentationResult(volume, mask, heat, boxes_out, reo, self.card, describe(self.device), timings, report)


def make_segmenter(model=None, weights=None, device: str = "auto", batch_size: int = 8, amp: bool = True,
                   card: Optional[dict] = None, drop_small_components: bool = True) -> Segmenter:
    """A :class:`Segmenter` (L-SNet) or :class:`SeedSegmenter` (any seed architecture) for ``model`` or
    the weights file ``weights`` (card architecture name decides); ``drop_small_components``: see
    :class:`lsnet.pipeline.inference.Segmenter`."""
    if model is None:
        model, card = load_model(weights, device="cpu")
    cls = SeedSegmenter if model.config.architecture in SEED_ARCHITECTURES else Segmenter
    return cls(model=model, device=device, batch_size=batch_size, amp=amp, card=card, drop_small_components=drop_small_components)
