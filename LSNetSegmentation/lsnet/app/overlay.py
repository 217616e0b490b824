"""PNG overview of a result: a few canonical axial slices with heatmap, RoI boxes and mask outline.

Pillow only (no matplotlib).  Slices shown: those with the largest segmented area, plus the slice with
the strongest RoI, up to ``n``.  Each panel: CT in a soft-tissue window, heatmap (0-1) in an
inferno-like ramp blended where > 0.05, mask outline in the pancreas colour, RoI boxes in red with
their score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PANCREAS_RGB = (249, 180, 111)
REFERENCE_RGB = (60, 220, 60)  # a reference label (the demo: the manual segmentation)
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def _colormap(v: np.ndarray) -> np.ndarray:
    x = np.clip(v, 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(x.astype(int), len(_RAMP) - 2)
    t = (x - i)[..., None]
    return (_RAMP[i] * (1 - t) + _RAMP[i + 1] * t).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask > 0
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def choose_slices(result, n: int = 4) -> list[int]:
    mask_c = result.reorientation.to_canonical_array(result.mask)
    area = np.array([np.count_nonzero(mask_c[k]) for k in range(mask_c.shape[0])])
    picks = [int(k) for k in np.argsort(-area, kind="stable")[:n] if area[k] > 0]
    if result.boxes:
        best = max(result.boxes, key=lambda b: b.score).slice_index
        if best not in picks:
            picks = picks[: n - 1] + [best]
    if not picks:
        picks = [mask_c.shape[0] // 2]
    # spread: sorted
    return sorted(set(picks))[:n]


def render_overlay(result, path, n: int = 4, panel: int = 320, window=(-160.0, 240.0), reference=None) -> Path:
    """Write the overview PNG to ``path`` and return it; ``reference``: an optional label array in the
    input's order (e.g. a manual segmentation), outlined in green under the result's red outline."""
    can = result.reorientation.to_canonical_array(result.volume.array)
    mask_c = result.reorientation.to_canonical_array(result.mask)
    ref_c = result.reorientation.to_canonical_array(reference) if reference is not None else None
    heat_c = result.reorientation.to_canonical_array(result.heatmap) if result.heatmap is not None else None
    slices = choose_slices(result, n)
    tiles = []
    for k in slices:
        ct = np.asarray(can[k], dtype=np.float32)
        g = np.clip((ct - window[0]) / (window[1] - window[0]), 0, 1)
        rgb = np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2).astype(np.float32)
        if heat_c is not None:
            hm = np.asarray(heat_c[k], dtype=np.float32)
            a = (np.clip(hm, 0, 1) * 0.6)[..., None] * (hm > 0.05)[..., None]
            rgb = rgb * (1 - a) + _colormap(hm).astype(np.float32) * a
        if ref_c is not None:
            rgb[_outline(np.asarray(ref_c[k]))] = REFERENCE_RGB
        rgb[_outline(mask_c[k])] = PANCREAS_RGB
        img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
        h, w = ct.shape
        scale = panel / max(h, w)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        d = ImageDraw.Draw(img)
        for b in result.boxes:
            if b.slice_index != k:
                continue
            d.rectangle([b.x0 * scale, b.y0 * scale, b.x1 * scale, b.y1 * scale], outline=(255, 40, 40), width=2)
            d.text((b.x0 * scale + 2, max(0, b.y0 * scale - 12)), f"{b.score:.2f}", fill=(255, 80, 80))
        d.text((4, 4), f"slice {k}", fill=(255, 255, 255))
        tiles.append(img)
    width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
    height = max(t.height for t in tiles)
    sheet = Image.new("RGB", (width, height), (0, 0, 0))
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return path
