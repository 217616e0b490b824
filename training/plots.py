"""PNG of the training curves (loss per epoch, validation metrics per epoch).

Uses matplotlib when it is installed, else draws the same two panels with Pillow (always available:
it is an engine dependency), so a run never fails for want of a plotting library.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def _finite(vals):
    return [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]


def plot_curves(history: Sequence[dict], path, loss_keys: Sequence[str], metric_keys: Sequence[str], title: str = "") -> Path:
    """Two panels: ``loss_keys`` vs epoch (left), ``metric_keys`` vs epoch (right). Returns ``path``."""
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pillow(history, path, loss_keys, metric_keys, title)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys, name in ((axes[0], loss_keys, "loss"), (axes[1], metric_keys, "validation")):
        for k in keys:
            pts = [(h["epoch"], h[k]) for h in history if h.get(k) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_pillow(history, path: Path, loss_keys, metric_keys, title: str) -> Path:
    from PIL import Image, ImageDraw

    W, H = 1000, 420
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 5), title, fill="black")
    panels = [(loss_keys, "loss", (60, 40, 480, 360)), (metric_keys, "validation", (560, 40, 980, 360))]
    epochs = [h["epoch"] for h in history] or [0]
    e0, e1 = min(epochs), max(max(epochs), min(epochs) + 1)
    for keys, name, (x0, y0, x1, y1) in panels:
        d.rectangle((x0, y0, x1, y1), outline="black")
        d.text((x0 + (x1 - x0) // 2 - 20, y0 - 15), name, fill="black")
        d.text((x0 + (x1 - x0) // 2 - 15, y1 + 20), "epoch", fill="black")
        vals = _finite([h.get(k) for h in history for k in keys])
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        for t in range(5):  # y ticks
            v = lo + (hi - lo) * t / 4
            yy = y1 - (y1 - y0) * t / 4
            d.line((x0 - 4, yy, x0, yy), fill="black")
            d.text((x0 - 55, yy - 6), f"{v:.3g}", fill="black")
        for e in sorted(set(epochs)):  # x ticks
            xx = x0 + (x1 - x0) * (e - e0) / (e1 - e0)
            d.line((xx, y1, xx, y1 + 4), fill="black")
            if len(set(epochs)) <= 20 or e % 5 == 0:
                d.text((xx - 4, y1 + 6), str(e), fill="black")
        for n, k in enumerate(keys):
            pts = [(h["epoch"], h[k]) for h in history if _finite([h.get(k)])]
            xy = [(x0 + (x1 - x0) * (e - e0) / (e1 - e0), y1 - (y1 - y0) * (v - lo) / (hi - lo)) for e, v in pts]
            col = COLOURS[n % len(COLOURS)]
            if len(xy) > 1:
                d.line(xy, fill=col, width=2)
            for px, py in xy:
                d.ellipse((px - 3, py - 3, px + 3, py + 3), fill=col)
            d.text((x1 - 150, y0 + 8 + 14 * n), k, fill=col)
    img.save(path)
    return path
